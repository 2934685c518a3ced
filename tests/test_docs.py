"""The documentation: the site builds with ``mkdocs build --strict`` (no broken link, reference or API
page), the README stays short, and every Python code block of the README and of the site's pages
runs as written.

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
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import VIT_TINY

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
README_LINES = 150
FAST = {  # README text -> what the test runs instead (each must occur in the README)
    "CalibrateConfig()": "CalibrateConfig(epochs=1, imitation_epochs=1, batch_size=4)",
    "TrainConfig(epochs=30)": "TrainConfig(epochs=1, batch_size=4, max_steps=2, num_workers=0)",
    "speedup=1.5)": "speedup=1.2, batch_size=4, runs=1, budget=0.05)",
    "config=DiffRateConfig())": "config=DiffRateConfig(epochs=1, batch_size=4, flip=False))",
}


def python_blocks(text: str) -> list[str]:
    """The ```python fenced blocks of a Markdown text."""
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.DOTALL | re.MULTILINE)


BLOCKS = [(page, i) for page in PAGES for i in range(len(python_blocks(page.read_text())))]


def test_the_site_builds_strictly(tmp_path):
    """Every page in the navigation, every link and anchor, every API page resolves (warnings are errors)."""
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    for page in ("index.html", "api/index.html", "cli/index.html", "methods/pitome/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    cli = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "tokensparse calibrate" in cli and "--gmacs" in cli  # generated from the parsers
    assert "tokensparse.api.patch" in (tmp_path / "site" / "api" / "index.html").read_text()


def test_readme_is_short_and_links_into_the_site():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_LINES, f"the README has {len(lines)} lines; keep it at most {README_LINES}"
    assert "docs/" in README.read_text()


def test_pages_have_python_blocks():
    blocks = [b for page in PAGES for b in python_blocks(page.read_text())]
    assert len(python_blocks(README.read_text())) >= 1 and len(blocks) >= 4
    joined = "\n".join(blocks)
    for text in [*FAST, "pretrained=True"]:
        assert text in joined, f"no page contains {text!r} any more; update tests/test_docs.py"


@pytest.mark.parametrize(("page", "index"), BLOCKS, ids=[f"{p.relative_to(ROOT)}-{i}" for p, i in BLOCKS])
def test_python_block_runs(page, index, tmp_path, vit_tiny_weights, sample_images, sample_wnids, monkeypatch,
                           capsys):
    code = python_blocks(page.read_text())[index]
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
    exec(compile(code, f"{page.name} python block {index}", "exec"), {"__name__": "__docs__"})  # noqa: S102 - the docs' own code
    capsys.readouterr()
    assert os.getcwd() == str(tmp_path)
