"""Every Python code block of the README runs as written.

The blocks run in a scratch folder that holds what they name: ``vit_tiny.safetensors`` (the
shared ViT-Tiny weights), ``images/`` (eight of the shared photos) and ``wnids.txt``. Only
these changes are made to the text, each of which must still match the README (so a
renamed call cannot slip past): timm's ``pretrained=True`` loads the shared weights file
instead of a hub, training runs a few steps instead of 30 epochs, and ``tune`` a few seconds
at a small batch.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from conftest import VIT_TINY

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = {  # README text -> what the test runs instead (each must occur in the README)
    "CalibrateConfig()": "CalibrateConfig(epochs=1, imitation_epochs=1, batch_size=4)",
    "TrainConfig(epochs=30)": "TrainConfig(epochs=1, batch_size=4, max_steps=2, num_workers=0)",
    "speedup=1.5)": "speedup=1.2, batch_size=4, runs=1, budget=0.05)",
}


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


def test_readme_has_python_blocks():
    blocks = python_blocks(README.read_text())
    assert len(blocks) >= 2
    joined = "\n".join(blocks)
    for text in [*FAST, "pretrained=True"]:
        assert text in joined, f"the README no longer contains {text!r}; update tests/test_readme.py"


@pytest.mark.parametrize("index", range(len(python_blocks(README.read_text()))))
def test_readme_block_runs(index, tmp_path, vit_tiny_weights, sample_images, sample_wnids, monkeypatch, capsys):
    code = python_blocks(README.read_text())[index]
    (tmp_path / "vit_tiny.safetensors").symlink_to(vit_tiny_weights)
    (tmp_path / "wnids.txt").symlink_to(sample_wnids)
    (tmp_path / "images").mkdir()
    for photo in sorted(sample_images.iterdir())[:8]:
        (tmp_path / "images" / photo.name).symlink_to(photo)
    overlay = f"pretrained=True, pretrained_cfg_overlay=dict(file={str(vit_tiny_weights)!r})"
    code = code.replace("pretrained=True", overlay)
    for old, new in FAST.items():
        code = code.replace(old, new)
    assert VIT_TINY in code or "create_model" not in code  # the only weights there are
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    exec(compile(code, f"README.md python block {index}", "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code
    capsys.readouterr()
    assert os.getcwd() == str(tmp_path)
