"""tokensparse.utils: atomic writes (every file the package writes) and the progress bar."""
from __future__ import annotations

import ast
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save

import tokensparse.utils
from tokensparse.errors import TokenSparseError
from tokensparse.utils import atomic_write, progress_bar


def test_atomic_write_binary_text_and_new_folders(tmp_path):
    ckpt = atomic_write(tmp_path / "a" / "b" / "ckpt.pt", lambda f: torch.save({"x": torch.arange(3)}, f))
    assert ckpt == tmp_path / "a" / "b" / "ckpt.pt"
    assert torch.equal(torch.load(ckpt, weights_only=True)["x"], torch.arange(3))
    tensors = atomic_write(tmp_path / "p.safetensors", lambda f: f.write(save({"w": torch.ones(2)})))
    assert torch.equal(load_file(tensors)["w"], torch.ones(2))
    text = atomic_write(str(tmp_path / "d.json"), lambda f: json.dump({"é": 1}, f, ensure_ascii=False), text=True)
    assert json.loads(text.read_text(encoding="utf-8")) == {"é": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d.json", "p.safetensors"]


def test_atomic_write_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "x.json", lambda f: f.write("{}"), text=True)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # as any new file, not mkstemp's 0o600


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "out.json"
    path.write_text("old content")

    def disk_full(f):
        f.write(b"half of the new cont")
        raise OSError(28, "No space left on device")

    with pytest.raises(TokenSparseError, match=r"cannot write checkpoint .*out.json.*No space left"):
        atomic_write(path, disk_full, what="checkpoint")
    assert path.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]

    def bug(f):
        f.write(b"x")
        raise KeyError("not an I/O error")

    with pytest.raises(KeyError):  # other errors propagate unchanged, the temp file still goes
        atomic_write(path, bug)
    assert path.read_text() == "old content"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_unwritable_folder_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(TokenSparseError, match="cannot write .*file/out.csv"):
        atomic_write(tmp_path / "file" / "out.csv", lambda f: f.write("a,b\n"), text=True)


def test_progress_bar_info_text_completed_and_disabled(capsys):
    with progress_bar("train", 5, completed=2, transient=False) as advance:
        advance()
        advance(2, "loss 0.123")
    err = capsys.readouterr().err
    assert "train" in err and "5/5" in err and "loss 0.123" in err  # a lasting bar: final state in logs
    with progress_bar("quiet", 3) as advance:  # transient: only on a terminal
        advance(3)
    with progress_bar("off", 3, enabled=False, transient=False) as advance:
        advance(3, "x")
    assert capsys.readouterr().err == ""


def test_utils_is_a_leaf_module():
    tree = ast.parse(Path(tokensparse.utils.__file__).read_text())
    internal = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert [(n.module, [a.name for a in n.names]) for n in internal] == [("errors", ["TokenSparseError"])]
