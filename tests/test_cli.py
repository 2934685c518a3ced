"""The ``tokensparse`` command line: bench output, JSON, and one-line errors (exit 2)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from safetensors.torch import save_file

from tokensparse.cli import main

VIT_TINY = "vit_tiny_patch16_224.augreg_in21k_ft_in1k"
JSON_KEYS = {"method", "gmacs", "img_per_s", "latency_ms", "compile_s", "speedup", "top1", "top5", "agreement", "cosine",
             "speedup_low", "speedup_high", "random_predictors", "eager_speedup", "eager_latency_ms"}
FAST = ["bench", "--model", "vit_tiny_patch16_224", "--batch-size", "2", "--runs", "1",
        "--warmup", "0"]


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_clean_error(code: int, out: str, err: str, *fragments: str) -> None:
    assert code == 2
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bench_baseline_only_no_weights(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    code, out, err = _run(capsys, FAST + ["--method", "none", "--json", str(out_json)])
    assert code == 0, err
    assert "accuracy columns need weights" in out
    assert "GMACs" in out and "img/s" in out and "none" in out
    rows = json.loads(out_json.read_text())
    assert len(rows) == 1 and set(rows[0]) == JSON_KEYS
    assert rows[0]["method"] == "none" and rows[0]["speedup"] == 1.0
    assert rows[0]["gmacs"] == pytest.approx(1.2537, rel=1e-3)
    assert rows[0]["img_per_s"] > 0
    assert rows[0]["top1"] is None and rows[0]["agreement"] is None


def test_bench_methods_no_weights(capsys, tmp_path):  # needs the core patch API
    out_json = tmp_path / "bench.json"
    code, out, err = _run(capsys, FAST + ["--method", "tome:r=8", "--method", "topk",
                                          "--json", str(out_json)])
    assert code == 0, err
    rows = json.loads(out_json.read_text())
    assert [r["method"] for r in rows] == ["none", "tome:r=8", "topk"]
    for r in rows:
        assert set(r) == JSON_KEYS and r["img_per_s"] > 0 and r["top1"] is None
    assert rows[1]["gmacs"] < rows[0]["gmacs"] and rows[2]["gmacs"] < rows[0]["gmacs"]
    assert "tome:r=8" in out


def test_bench_default_methods_are_supported_ones(capsys, tmp_path):  # needs the core
    import tokensparse
    out_json = tmp_path / "bench.json"
    code, _, err = _run(capsys, FAST + ["--json", str(out_json)])
    assert code == 0, err
    model = timm.create_model("vit_tiny_patch16_224")
    expected = [m.name for m in tokensparse.list_methods() if m.supports(model) and not m.needs_training]
    assert [r["method"] for r in json.loads(out_json.read_text())] == ["none", *expected]


def test_bench_accuracy_with_weights(capsys, tmp_path, vit_tiny_weights, sample_images):
    out_json = tmp_path / "bench.json"  # needs the core patch API (tome row)
    code, out, err = _run(capsys, [
        "bench", "--model", VIT_TINY, "--weights", str(vit_tiny_weights),
        "--images", str(sample_images), "--limit", "8", "--batch-size", "4", "--runs", "1",
        "--warmup", "0", "--method", "tome:r=4", "--json", str(out_json)])
    assert code == 0, err
    assert "note:" not in out
    none, tome = json.loads(out_json.read_text())
    assert none["agreement"] == 100.0 and 0 <= none["top1"] <= 100
    assert none["top5"] >= none["top1"]
    assert tome["method"] == "tome:r=4" and 0 <= tome["agreement"] <= 100


def test_bench_images_without_weights_notes_and_skips(capsys, tmp_path, sample_images):
    out_json = tmp_path / "bench.json"
    code, out, err = _run(capsys, FAST + ["--method", "none", "--images", str(sample_images),
                                          "--json", str(out_json)])
    assert code == 0, err
    assert "accuracy columns need weights" in out
    assert json.loads(out_json.read_text())[0]["top1"] is None


def test_missing_weights_file(capsys, tmp_path):
    _assert_clean_error(*_run(capsys, FAST + ["--weights", str(tmp_path / "absent.pth")]),
                        "absent.pth", "not found")


def test_corrupt_weights_file(capsys, tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"\x00\x13garbage bytes" * 50)
    _assert_clean_error(*_run(capsys, FAST + ["--weights", str(bad)]),
                        "garbage.safetensors", "could not read")


def test_mismatched_weights_file(capsys, tmp_path):
    path = tmp_path / "deit_tiny.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224").state_dict(), str(path))
    argv = FAST + ["--weights", str(path)]
    argv[argv.index("vit_tiny_patch16_224")] = "vit_small_patch16_224"
    _assert_clean_error(*_run(capsys, argv), "deit_tiny.safetensors", "vit_small_patch16_224",
                        "shape mismatch")


def test_empty_image_folder(capsys, tmp_path):
    (tmp_path / "images").mkdir()
    _assert_clean_error(*_run(capsys, FAST + ["--images", str(tmp_path / "images")]),
                        "no images found")


def test_missing_wnids_file(capsys, tmp_path, sample_images):
    _assert_clean_error(*_run(capsys, FAST + ["--images", str(sample_images), "--wnids",
                                              str(tmp_path / "w.txt")]), "w.txt", "not found")


@pytest.mark.parametrize("extra, fragment", [
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--batch-size", "0"], "--batch-size"),
    (["--runs", "x"], "--runs"),
    (["--dtype", "fp16"], "--dtype"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--weights", "a", "--pretrained"], "not allowed with"),
    (["--method", "tome:r"], "bad option"),
])
def test_bad_arguments(capsys, extra, fragment):
    _assert_clean_error(*_run(capsys, FAST + extra), fragment)


def test_unknown_method(capsys):  # the message comes from the core's tokensparse.patch
    _assert_clean_error(*_run(capsys, FAST + ["--method", "nosuchmethod"]), "nosuchmethod")


def test_no_command_and_help(capsys):
    _assert_clean_error(*_run(capsys, []), "COMMAND")
    assert main(["bench", "--help"]) == 0
    assert "--method" in capsys.readouterr().out


def test_python_dash_m_error_exit_code(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "tokensparse", "bench", "--model", "vit_tiny_patch16_224",
         "--weights", str(tmp_path / "absent.safetensors")],
        capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith("error: weights file")


def test_bench_unsupported_family_without_methods_is_an_error(capsys):
    assert main(["bench", "--model", "resnet18", "--runs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model family not supported: ResNet") and "convnext" in err
