"""DynamicViT training and calibration against a user's mistakes and accidents (issue 14, section 2):
an existing run folder is never overwritten by accident, non-finite options and losses are clear
errors that write nothing, a resume with a new horizon or learning rate rebuilds the schedule,
an unwritable output fails before any work, and killed or damaged checkpoints are cleaned up or
detected."""
from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset, TensorDataset

import tokensparse.train.finetune as finetune_mod
from tokensparse import TokenSparseError
from tokensparse.cli import main
from tokensparse.methods.dynamicvit import DynamicViTOutputs
from tokensparse.train import CalibrateConfig, DynamicViTLoss, TrainConfig, calibrate_dynamicvit, finetune_dynamicvit
from tokensparse.train import load_checkpoint as load
from tokensparse.train.finetune import WarmupCosine
from tokensparse.utils import atomic_write, check_writable_folder, remove_stale_temp_files

UNWRITABLE = "/proc/tokensparse-test/x"  # /proc takes no new folders, even for root


def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2,
                             num_classes=5).eval()


def data(n: int = 16) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g))


def cfg(**kw) -> TrainConfig:
    """4 steps per epoch on ``data(16)``; 2 warm-up steps."""
    base = {"epochs": 1, "batch_size": 4, "lr": 1e-3, "backbone_lr_scale": 0.1, "warmup_epochs": 0.5, "num_workers": 0}
    return TrainConfig(**{**base, **kw})


def train(out: Path, config: TrainConfig | None = None, **kw) -> torch.nn.Module:
    return finetune_dynamicvit(tiny(), data(), out, "dynamicvit", config or cfg(), progress=False, **kw)


def all_finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


class Counting(Dataset):
    """A dataset that counts how often it is read (0: nothing was computed)."""

    def __init__(self, inner: Dataset) -> None:
        self.inner, self.reads = inner, 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, i: int):
        self.reads += 1
        return self.inner[i]


def cli_error(argv: list[str], capsys) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# ----------------------------------------------------------------------------- 1. no accidental overwrite

def test_an_existing_checkpoint_is_never_replaced_without_resume_or_overwrite(tmp_path):
    train(tmp_path, cfg(epochs=2))
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    assert load(path)["global_step"] == 8
    with pytest.raises(TokenSparseError, match=r"already holds a training checkpoint.*--resume.*--overwrite"):
        train(tmp_path)
    other = tmp_path / "elsewhere"
    train(other, cfg(max_steps=1))
    with pytest.raises(TokenSparseError, match="already holds a training checkpoint"):  # resuming another run here
        train(tmp_path, cfg(max_steps=2), resume=other / "checkpoint.pt")
    with pytest.raises(TokenSparseError, match="give one of them"):
        train(tmp_path, resume=True, overwrite=True)
    with pytest.raises(TokenSparseError, match="overwrite must be True or False"):
        train(tmp_path, overwrite="yes")
    assert path.read_bytes() == good
    train(tmp_path, resume=True)  # resuming the folder's own checkpoint is allowed (a finished run: nothing to do)
    assert load(path)["global_step"] == 8
    train(tmp_path, cfg(max_steps=1), overwrite=True)  # explicitly starting over is allowed
    assert load(path)["global_step"] == 1


def test_cli_train_refuses_an_existing_run_folder_and_overwrite_starts_over(image_folder, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--model", "test_vit", "--images", str(image_folder), "--out", str(run), "--epochs", "1",
            "--batch-size", "2", "--workers", "0", "--max-steps", "2"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    good = (run / "checkpoint.pt").read_bytes()
    err = cli_error([*argv[:-1], "1"], capsys)
    assert "already holds a training checkpoint" in err and "--resume" in err and "--overwrite" in err
    assert (run / "checkpoint.pt").read_bytes() == good
    cli_error([*argv, "--resume", "--overwrite"], capsys)
    assert main([*argv[:-1], "1", "--overwrite"]) == 0, capsys.readouterr().err
    assert load(run / "checkpoint.pt")["global_step"] == 1


# ----------------------------------------------------------------------------- 2. non-finite options and losses

BAD_NUMBERS = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("bad", BAD_NUMBERS)
@pytest.mark.parametrize("config,name", [
    *[(TrainConfig, n) for n in ("lr", "weight_decay", "warmup_epochs", "min_lr", "ratio_weight", "distill_weight",
                                 "token_weight", "backbone_lr_scale", "ce_weight", "clip_grad")],
    *[(CalibrateConfig, n) for n in ("lr", "weight_decay", "warmup_epochs", "min_lr", "ratio_weight",
                                     "distill_weight", "token_weight", "imitation_lr")]])
def test_every_numeric_option_must_be_finite(config, name, bad):
    with pytest.raises(TokenSparseError, match=rf"^{name} must be a number .*finite, got -?(nan|inf)$"):
        config(**{name: bad}).validate()


@pytest.mark.parametrize("config,kw,match", [
    (TrainConfig, {"seed": 1 << 63}, "seed must be an integer from"),
    (CalibrateConfig, {"seed": -(1 << 63) - 1}, "seed must be an integer from"),
    (CalibrateConfig, {"seed": 1.5}, "seed must be an integer"),
    (TrainConfig, {"bf16": "no"}, "bf16 must be True or False, got 'no'"),
    (CalibrateConfig, {"flip": 1}, "flip must be True or False, got 1"),
    (CalibrateConfig, {"imitation_lr": 0.0}, "imitation_lr must be a number > 0"),
    (TrainConfig, {"clip_grad": -1.0}, "clip_grad must be a number >= 0"),
    (TrainConfig, {"ce_weight": 0.0, "ratio_weight": 0.0, "distill_weight": 0.0, "token_weight": 0.0},
     "at least one loss weight must be > 0"),
    (CalibrateConfig, {"ratio_weight": 0.0, "distill_weight": 0.0, "token_weight": 0.0},
     "at least one loss weight must be > 0"),
])
def test_options_out_of_range(config, kw, match):
    with pytest.raises(TokenSparseError, match=match):
        config(**kw).validate()


def test_range_edges_stay_allowed():
    TrainConfig(seed=(1 << 63) - 1, ce_weight=0.0, distill_weight=0.0, token_weight=0.0).validate()  # ratio left
    TrainConfig(seed=-(1 << 63), clip_grad=0.0, lr=0.0).validate()
    CalibrateConfig(epochs=0, ratio_weight=0.0, distill_weight=0.0, token_weight=0.0).validate()  # nothing to learn


@pytest.mark.parametrize("name", ["ratio_weight", "distill_weight", "token_weight", "ce_weight"])
@pytest.mark.parametrize("bad", BAD_NUMBERS)
def test_loss_weights_must_be_finite(name, bad):
    with pytest.raises(TokenSparseError, match=rf"{name} must be a number >= 0 and finite, got -?(nan|inf)"):
        DynamicViTLoss(**{name: bad})


@pytest.mark.parametrize("bad", [1.0, -0.1, math.nan, "0.1"])
def test_label_smoothing_range(bad):
    with pytest.raises(TokenSparseError, match=r"label_smoothing must be a number in \[0, 1\)"):
        DynamicViTLoss(label_smoothing=bad)
    outs = DynamicViTOutputs([torch.ones(2, 4)], [0.5], torch.zeros(2, 5, 3), 1)
    total, _ = DynamicViTLoss(label_smoothing=0.1, distill_weight=0, token_weight=0)(
        torch.randn(2, 7), torch.tensor([0, 1]), outs)
    assert torch.isfinite(total)


@pytest.mark.parametrize("argv,match", [
    (["train", "--distill-weight", "nan"], "distill_weight must be a number >= 0 and finite, got nan"),
    (["train", "--token-weight", "inf"], "token_weight must be a number >= 0 and finite, got inf"),
    (["train", "--lr=-inf"], "lr must be a number >= 0 and finite, got -inf"),
    (["calibrate", "--lr", "inf"], "lr must be a number >= 0 and finite, got inf"),
    (["calibrate", "--warmup-epochs", "nan"], "warmup_epochs must be a number >= 0 and finite, got nan"),
    (["calibrate", "--ratio-weight", "inf"], "ratio_weight must be a number >= 0 and finite, got inf"),
])
def test_cli_non_finite_options_exit_2_before_loading_anything(argv, match, image_folder, tmp_path, capsys,
                                                               monkeypatch):
    def no_model(*a, **kw):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(timm, "create_model", no_model)
    out = tmp_path / ("run" if argv[0] == "train" else "sub/p.safetensors")
    err = cli_error([argv[0], "--model", "test_vit", "--images", str(image_folder), "--out", str(out), *argv[1:]],
                    capsys)
    assert match in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "sub").exists()  # nothing written


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny()
    weight = model.blocks[0].attn.qkv.weight

    def poison_after(step_no: int):
        def on_step(step: int, parts: dict) -> None:
            if step == step_no:
                with torch.no_grad():
                    weight[0, 0] = math.nan  # as if the update had diverged
        return on_step

    # step 5 poisons the weights: step 6's loss is NaN; the epoch-1 checkpoint (step 4) stays
    with pytest.raises(TokenSparseError, match=r"step 6 \(epoch 2\): the loss is not finite.*step 4\), is kept"):
        finetune_dynamicvit(model, data(), tmp_path, "dynamicvit", cfg(epochs=2), on_step=poison_after(5),
                            progress=False)
    ckpt = load(tmp_path / "checkpoint.pt")
    assert ckpt["global_step"] == 4 and all_finite(ckpt["model"].values())
    predictors = load_file(tmp_path / "predictors.safetensors")
    assert predictors and all_finite(predictors.values())
    # a resume from it continues from step 4
    resumed = train(tmp_path, cfg(epochs=2), resume=True)
    assert load(tmp_path / "checkpoint.pt")["global_step"] == 8 and all_finite(resumed.state_dict().values())

    # non-finite parameters right before a checkpoint (end of epoch 1): nothing is written at all
    fresh = tmp_path / "fresh"
    model = tiny()
    weight = model.blocks[0].attn.qkv.weight
    with pytest.raises(TokenSparseError,
                       match=r"step 4 \(epoch 1\): the parameters are not finite.*no checkpoint was written by this run"):
        finetune_dynamicvit(model, data(), fresh, "dynamicvit", cfg(epochs=2), on_step=poison_after(4),
                            progress=False)
    assert sorted(p.name for p in fresh.iterdir()) == []


def test_non_finite_weights_from_the_start_write_nothing(tmp_path):
    model = tiny()
    with torch.no_grad():
        model.patch_embed.proj.bias[0] = math.inf
    with pytest.raises(TokenSparseError, match=r"step 1 \(epoch 1\): the loss is not finite"):
        finetune_dynamicvit(model, data(), tmp_path, "dynamicvit", cfg(), progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("imitation_epochs,match", [(1, r"the warm-start \(imitation\) loss is not finite"),
                                                   (0, "the loss is not finite")])
def test_a_non_finite_calibration_loss_writes_no_predictors(tmp_path, imitation_epochs, match):
    model = tiny()
    with torch.no_grad():
        model.patch_embed.proj.bias[0] = math.nan
    out = tmp_path / "p.safetensors"
    config = CalibrateConfig(epochs=1, imitation_epochs=imitation_epochs, batch_size=4)
    with pytest.raises(TokenSparseError, match=rf"calibration stopped in epoch 1: {match}.*no predictors were written"):
        calibrate_dynamicvit(model, data(8), "dynamicvit:rho=0.5", config, out=out, progress=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- 4. resume with new options

def lrs(path: Path) -> list[float]:
    return [g["lr"] for g in load(path)["optimizer"]["param_groups"]]


def test_resume_with_more_epochs_rebuilds_the_schedule_for_the_new_horizon(tmp_path):
    train(tmp_path, cfg(epochs=1))  # 4 steps: the cosine reached its floor
    path = tmp_path / "checkpoint.pt"
    floor = 1e-6 / 1e-3
    assert lrs(path)[0] == pytest.approx(1e-3 * floor)
    train(tmp_path, cfg(epochs=2, max_steps=5), resume=True)
    factor = WarmupCosine(2, 8, floor)(5)  # the 2-epoch schedule, 5 steps in
    assert factor > 0.3
    # groups: new parts without / with weight decay, backbone without / with
    assert lrs(path) == [pytest.approx(v * factor) for v in (1e-3, 1e-3, 1e-4, 1e-4)]
    assert load(path)["scheduler"]["lr_lambdas"][0]["total"] == 8
    train(tmp_path, cfg(epochs=2), resume=True)  # and on to the end of the new horizon, at its floor
    assert load(path)["global_step"] == 8 and lrs(path)[0] == pytest.approx(1e-3 * floor)


def test_resume_with_a_new_lr_and_weight_decay_uses_them(tmp_path, capsys):
    train(tmp_path, cfg(epochs=2, max_steps=4))
    path = tmp_path / "checkpoint.pt"
    before = load(path)["model"]
    finetune_dynamicvit(tiny(), data(), tmp_path, "dynamicvit", cfg(epochs=2, max_steps=5, lr=5e-4, weight_decay=0.1),
                        resume=True, progress=True)
    assert "note: resuming with lr 0.001 -> 0.0005, weight_decay 0.05 -> 0.1" in capsys.readouterr().err
    factor = WarmupCosine(2, 8, 1e-6 / 5e-4)(5)
    assert lrs(path) == [pytest.approx(v * factor) for v in (5e-4, 5e-4, 5e-5, 5e-5)]
    assert [g["weight_decay"] for g in load(path)["optimizer"]["param_groups"]] == [0.0, 0.1, 0.0, 0.1]
    key = "blocks.1.ts_reducer.predictor.in_conv.1.weight"
    assert not torch.equal(load(path)["model"][key], before[key])  # the weights carried over and moved on


def test_resume_with_the_same_options_stays_bit_exact(tmp_path):
    full = train(tmp_path / "full", cfg(epochs=2))
    train(tmp_path / "run", cfg(epochs=2, max_steps=5))
    resumed = train(tmp_path / "run", cfg(epochs=2), resume=True)
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert lrs(tmp_path / "full" / "checkpoint.pt") == lrs(tmp_path / "run" / "checkpoint.pt")


def test_resume_refuses_options_that_change_the_data_order_or_the_optimizer(tmp_path):
    train(tmp_path, cfg(epochs=2, max_steps=2))
    good = (tmp_path / "checkpoint.pt").read_bytes()
    with pytest.raises(TokenSparseError, match=r"seed 0; resume with the same.*seed 1\)"):
        train(tmp_path, cfg(epochs=2, seed=1), resume=True)
    with pytest.raises(TokenSparseError, match=r"batch_size 4.*same.*batch_size 2"):
        train(tmp_path, cfg(epochs=2, batch_size=2), resume=True)
    with pytest.raises(TokenSparseError, match="backbone_lr_scale 0.1 and this run has 0.0: 0 freezes the backbone"):
        train(tmp_path, cfg(epochs=2, backbone_lr_scale=0.0), resume=True)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


# ----------------------------------------------------------------------------- 6. unwritable output, checked first

def test_an_unwritable_output_fails_before_any_training_step(tmp_path):
    steps: list[int] = []
    ds = Counting(data())
    with pytest.raises(TokenSparseError, match=f"cannot write output folder '{UNWRITABLE}'"):
        finetune_dynamicvit(tiny(), ds, UNWRITABLE, "dynamicvit", cfg(), on_step=lambda s, p: steps.append(s),
                            progress=False)
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(TokenSparseError, match="it is a file, not a folder"):
        finetune_dynamicvit(tiny(), ds, tmp_path / "file", "dynamicvit", cfg(), progress=False)
    assert steps == [] and ds.reads == 0


def test_calibrate_checks_its_output_before_caching_the_teacher(tmp_path):
    ds = Counting(data(8))
    config = CalibrateConfig(epochs=1, imitation_epochs=0, batch_size=4)
    with pytest.raises(TokenSparseError, match=f"cannot write output folder '{UNWRITABLE}'"):
        calibrate_dynamicvit(tiny(), ds, "dynamicvit", config, out=f"{UNWRITABLE}/p.safetensors", progress=False)
    with pytest.raises(TokenSparseError, match="is a folder; give a file name"):
        calibrate_dynamicvit(tiny(), ds, "dynamicvit", config, out=tmp_path, progress=False)
    assert ds.reads == 0


@pytest.mark.parametrize("command,out", [("train", UNWRITABLE), ("calibrate", f"{UNWRITABLE}/p.safetensors")])
def test_cli_unwritable_out_exits_2(command, out, image_folder, capsys):
    err = cli_error([command, "--model", "test_vit", "--images", str(image_folder), "--out", out, "--epochs", "1",
                     "--batch-size", "2", "--workers", "0"], capsys)
    assert f"cannot write output folder '{UNWRITABLE}'" in err


def test_check_writable_folder_creates_and_probes(tmp_path):
    assert check_writable_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list((tmp_path / "a" / "b").iterdir()) == []  # the probe file is gone
    with pytest.raises(TokenSparseError, match=f"cannot write results '{UNWRITABLE}': it cannot be created"):
        check_writable_folder(UNWRITABLE, "results")
    with pytest.raises(TokenSparseError, match="cannot write output folder '/proc/self': no file can be created in it"):
        check_writable_folder("/proc/self")  # exists, takes no new files


# ----------------------------------------------------------------------------- 7. leftovers and corruption

KILLED_WRITE = """
import os, signal, sys
from tokensparse.utils import atomic_write

def write(f):
    f.write(b"half a checkpoint" * 1000)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the write

atomic_write(os.path.join(sys.argv[1], sys.argv[2]), write)
"""


def test_temp_files_of_a_killed_checkpoint_write_are_removed_when_training_starts(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(KILLED_WRITE)
    run = tmp_path / "run"
    run.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(run), "checkpoint.pt"], capture_output=True, timeout=120,
                          check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = [p.name for p in run.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".checkpoint.pt.") and leftovers[0].endswith(".tmp")
    (run / ".predictors.safetensors.0123456789ab.tmp").write_bytes(b"x")  # as a killed predictors write leaves
    unrelated = [".checkpoint.pt.notours.tmp", "notes.txt", ".other.pt.0123456789ab.tmp"]
    for name in unrelated:
        (run / name).write_text("keep me")
    train(run, cfg(max_steps=1))
    assert sorted(p.name for p in run.iterdir()) == sorted(["checkpoint.pt", "predictors.safetensors", *unrelated])


def test_calibrate_removes_the_temp_files_of_its_output(tmp_path):
    (tmp_path / ".p.safetensors.0123456789ab.tmp").write_bytes(b"x")
    (tmp_path / ".q.safetensors.0123456789ab.tmp").write_bytes(b"x")
    calibrate_dynamicvit(tiny(), data(8), "dynamicvit", CalibrateConfig(epochs=1, imitation_epochs=0, batch_size=4),
                         out=tmp_path / "p.safetensors", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".q.safetensors.0123456789ab.tmp", "p.safetensors"]


def test_remove_stale_temp_files_matches_only_atomic_writes_names(tmp_path):
    (tmp_path / "sub").mkdir()
    names = [".a.pt.0123456789ab.tmp", ".a.pt.0123456789ab.tmp.bak", ".a.pt.0123456789a.tmp", "a.pt",
             ".b.pt.0123456789ab.tmp", ".axpt.0123456789ab.tmp"]
    for n in names:
        (tmp_path / n).write_text("x")
    assert remove_stale_temp_files(tmp_path, ["a.pt"]) == [tmp_path / ".a.pt.0123456789ab.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names[1:], "sub"])
    assert remove_stale_temp_files(tmp_path / "missing", ["a.pt"]) == []


def test_flipped_bytes_in_a_checkpoint_are_a_corrupt_checkpoint_error(tmp_path):
    train(tmp_path, cfg(epochs=2, max_steps=4))
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()
    assert isinstance(load(path)["checksum"], str)
    for where in (0.25, 0.5, 0.75):
        bad = bytearray(good)
        middle = int(len(bad) * where)
        bad[middle:middle + 4] = bytes(b ^ 0xFF for b in bad[middle:middle + 4])
        path.write_bytes(bytes(bad))
        with pytest.raises(TokenSparseError, match="is corrupt: its content does not match the checksum"):
            load(path)
    with pytest.raises(TokenSparseError, match="corrupt"):
        train(tmp_path, cfg(epochs=2), resume=True)
    assert path.read_bytes() != good  # the damaged file was left for inspection, not replaced
    path.write_bytes(good)
    assert load(path)["global_step"] == 4


def test_checkpoints_without_a_checksum_still_load_and_a_newer_format_is_refused(tmp_path):
    train(tmp_path, cfg(max_steps=1))
    path = tmp_path / "checkpoint.pt"
    payload = load(path)
    old = {k: v for k, v in payload.items() if k != "checksum"}
    torch.save({**old, "version": 1}, path)
    assert load(path)["global_step"] == 1
    torch.save({**old, "version": 1, "checksum": "0" * 64}, path)  # a checksum, when present, is checked
    with pytest.raises(TokenSparseError, match="corrupt"):
        load(path)
    torch.save({**old, "version": finetune_mod.CHECKPOINT_VERSION + 1}, path)
    with pytest.raises(TokenSparseError, match="format version"):
        load(path)


def test_atomic_write_temp_names_are_what_the_cleanup_removes(tmp_path, monkeypatch):
    seen: list[str] = []

    def spy(src, dst):
        seen.append(Path(src).name)
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "replace", spy)
    with pytest.raises(TokenSparseError, match="I/O error"):
        atomic_write(tmp_path / "checkpoint.pt", lambda f: f.write(b"x"))
    monkeypatch.undo()
    assert len(seen) == 1
    (tmp_path / seen[0]).write_bytes(b"x")  # as a kill would have left it
    assert remove_stale_temp_files(tmp_path, ["checkpoint.pt"]) == [tmp_path / seen[0]]


# ----------------------------------------------------------------------------- under torchrun: every rank stops

DDP_WORKER = """
import os, sys
import timm, torch
from torch.utils.data import TensorDataset
from tokensparse import TokenSparseError
from tokensparse.train import TrainConfig, finetune_dynamicvit

existing, fresh, report = sys.argv[1:4]
rank = os.environ["RANK"]
torch.set_num_threads(1)
g = torch.Generator().manual_seed(1)
ds = TensorDataset(torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 5, (32,), generator=g))
cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, warmup_epochs=0, num_workers=0)
for out, mode in ((existing, "refuse"), (fresh, "poison")):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", img_size=32, patch_size=8, depth=4, embed_dim=32, num_heads=2,
                              num_classes=5)

    def on_step(step, parts):
        if mode == "poison" and step == 2 and rank == "1":  # only rank 1 diverges
            with torch.no_grad():
                model.blocks[0].attn.qkv.weight[0, 0] = float("nan")

    try:
        finetune_dynamicvit(model, ds, out, "dynamicvit:gumbel=false", cfg, on_step=on_step, progress=False)
    except TokenSparseError as exc:
        with open(os.path.join(report, f"{mode}-rank{rank}.txt"), "w") as f:
            f.write(str(exc))
torch.distributed.barrier()  # no rank is left waiting in a collective
"""


def test_under_torchrun_a_refusal_or_a_non_finite_loss_on_one_rank_stops_every_rank(tmp_path):
    """Errors found on one rank reach all of them (no rank waits forever in a collective)."""
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    train(tmp_path / "existing", cfg(max_steps=1))
    report = tmp_path / "report"
    report.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
         f"--master_port={port}", str(script), str(tmp_path / "existing"), str(tmp_path / "poison"), str(report)],
        capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    errors = {p.name: p.read_text() for p in report.iterdir()}
    assert sorted(errors) == ["poison-rank0.txt", "poison-rank1.txt", "refuse-rank0.txt", "refuse-rank1.txt"]
    assert all("already holds a training checkpoint" in errors[f"refuse-rank{r}.txt"] for r in "01"), errors
    assert all("step 3 (epoch 1): the loss is not finite" in errors[f"poison-rank{r}.txt"] for r in "01"), errors
    assert load(tmp_path / "existing" / "checkpoint.pt")["global_step"] == 1
    assert sorted(p.name for p in (tmp_path / "poison").iterdir()) == []
