"""DynamicViT training: losses, torchrun DDP equivalence, exact resume, checkpoint faults, CLI."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image

import tokensparse
import tokensparse.train.finetune as finetune_mod
from tokensparse import TokenSparseError
from tokensparse.cli import main
from tokensparse.methods.dynamicvit import DynamicViTOutputs
from tokensparse.train import (
    CalibrateConfig,
    DynamicViTLoss,
    LearningConfig,
    TrainConfig,
    finetune_dynamicvit,
    load_checkpoint,
)
from tokensparse.train.losses import ratio_loss, token_distillation

MODEL_SRC = """
import torch, timm
from torch.utils.data import TensorDataset

def tiny():
    torch.manual_seed(0)
    return timm.create_model("test_vit", img_size=32, patch_size=8, depth=4, embed_dim=32,
                             num_heads=2, num_classes=5).eval()

def data(n=32):
    g = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 5, (n,), generator=g))
"""
_ns: dict = {}
exec(MODEL_SRC, _ns)  # noqa: S102 - the same source runs in the torchrun worker scripts
tiny, data = _ns["tiny"], _ns["data"]


def cfg(**kw) -> TrainConfig:
    base = {"epochs": 2, "batch_size": 4, "lr": 1e-3, "backbone_lr_scale": 0.1, "warmup_epochs": 0.5, "num_workers": 0}
    return TrainConfig(**{**base, **kw})


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- losses

def test_loss_parts_and_weights():
    masks = [torch.tensor([[1., 1., 0., 0.], [1., 1., 1., 1.]]), torch.tensor([[1., 0., 0., 0.], [1., 1., 0., 0.]])]
    # (0.5-0.5)^2, (1-0.5)^2 -> 0.125 ; (0.25-0.25)^2, (0.5-0.25)^2 -> 0.03125
    assert ratio_loss(masks, [0.5, 0.25]).item() == pytest.approx(0.125 + 0.03125)
    s, t = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    t[1, :2] = 3.0
    # image 0: kept tokens err 1 ; image 1: kept tokens 0,1 -> err 9
    assert token_distillation(s, t, masks[1] > 0).item() == pytest.approx(5.0)
    outs = DynamicViTOutputs(masks, [0.5, 0.25], torch.zeros(2, 5, 3), 1)
    logits, teacher = torch.randn(2, 7), torch.randn(2, 7)
    total, parts = DynamicViTLoss(ratio_weight=2, distill_weight=0.5, token_weight=0.5)(
        logits, torch.tensor([0, 1]), outs, teacher, torch.ones(2, 5, 3))
    expect = parts["ce"] + 2 * parts["ratio"] + 0.5 * parts["kl"] + 0.5 * parts["token"]
    assert total.item() == pytest.approx(expect.item())
    assert parts["kl"].item() > 0 and parts["token"].item() == pytest.approx(1.0)
    only_ce, parts = DynamicViTLoss(ratio_weight=0, distill_weight=0, token_weight=0)(logits, torch.tensor([0, 1]), outs)
    assert only_ce.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])).item())
    with pytest.raises(TokenSparseError, match="ratio_weight"):
        DynamicViTLoss(ratio_weight=-1)


def test_param_groups_new_parts_then_backbone_no_decay_first():
    """timm's param_groups_weight_decay per part gives the same deterministic groups as before."""
    model = tokensparse.patch(tiny(), "dynamicvit")
    groups = finetune_mod.param_groups(model, lr=1e-3, backbone_lr_scale=0.1, weight_decay=0.05)
    new = {id(p) for p in finetune_mod.dv.learned_parameters(model)}
    expected = []
    for is_new in (True, False):
        for no_decay in (True, False):
            params = [p for p in model.parameters() if (id(p) in new) == is_new and (p.ndim <= 1) == no_decay]
            expected.append((params, 1e-3 if is_new else 1e-4, 0.0 if no_decay else 0.05))
    assert [([id(p) for p in g["params"]], g["lr"], g["weight_decay"]) for g in groups] == \
        [([id(p) for p in params], pytest.approx(lr), wd) for params, lr, wd in expected]
    frozen = finetune_mod.param_groups(model, lr=1e-3, backbone_lr_scale=0.0, weight_decay=0.05)
    assert [g["lr"] for g in frozen] == [1e-3, 1e-3]


# ----------------------------------------------------------------------------- distributed

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = MODEL_SRC + """
import os, sys
from tokensparse.train import TrainConfig, finetune_dynamicvit
out, batch, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
cfg = TrainConfig(epochs=1, batch_size=batch, lr=1e-3, backbone_lr_scale=0.1, warmup_epochs=0,
                  num_workers=0, max_steps=steps, seed=3)
model = finetune_dynamicvit(tiny(), data(), out, "dynamicvit:gumbel=false", cfg, progress=False)
torch.save(model.state_dict(), os.path.join(out, f"params_rank{os.environ.get('RANK', '0')}.pt"))
"""


def test_torchrun_two_processes_match_one_process_on_the_concatenated_batch(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
         str(script), str(tmp_path / "ddp"), "4", "3"],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "ddp" / "params_rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "ddp" / "params_rank1.pt", weights_only=True)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    # one process, batch 8 = the two ranks' batches of 4: same samples per step (DistributedSampler)
    one = finetune_dynamicvit(tiny(), data(), tmp_path / "one", "dynamicvit:gumbel=false",
                   cfg(epochs=1, batch_size=8, warmup_epochs=0, max_steps=3, seed=3), progress=False)
    start = tiny().state_dict()
    moved = 0
    for k, v in one.state_dict().items():
        assert torch.allclose(v, r0[k], atol=2e-5, rtol=1e-4), (k, (v - r0[k]).abs().max())
        if k in start and not torch.equal(start[k], v):
            moved += 1
    assert moved > 10  # the backbone was really updated
    ckpt = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")
    assert ckpt["global_step"] == 3 and ckpt["world_size"] == 2


# ----------------------------------------------------------------------------- faults and resume

KILL_WORKER = MODEL_SRC + """
import os, signal, sys
from tokensparse.train import TrainConfig, finetune_dynamicvit
out, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
torch.set_num_threads(1)
cfg = TrainConfig(epochs=2, batch_size=4, lr=1e-3, backbone_lr_scale=0.1, warmup_epochs=0.5, num_workers=0,
                  checkpoint_every=3)

def on_step(step, parts):
    if step == kill_at:  # die like a pre-empted job: no exception handling, no cleanup
        os.kill(os.getpid(), signal.SIGKILL)

model = finetune_dynamicvit(tiny(), data(16), out, "dynamicvit", cfg, resume=resume, on_step=on_step, progress=False)
torch.save(model.state_dict(), os.path.join(out, "final.pt"))
"""


def run_worker(script: Path, out: Path, kill_at: int, resume: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), str(out), str(kill_at), "resume" if resume else "fresh"],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)


def test_killed_training_resumes_to_the_same_weights(tmp_path):
    """SIGKILL between checkpoints (4 steps per epoch, 8 in all, checkpoints every 3 steps and per epoch)."""
    script = tmp_path / "worker.py"
    script.write_text(KILL_WORKER)
    full = run_worker(script, tmp_path / "full", kill_at=0, resume=False)
    assert full.returncode == 0, full.stderr[-3000:]
    killed = run_worker(script, tmp_path / "run", kill_at=7, resume=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "run" / "final.pt").exists()
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")  # the step-6 checkpoint; step 7 was lost
    assert (ckpt["global_step"], ckpt["epoch"], ckpt["step_in_epoch"]) == (6, 1, 2)
    resumed = run_worker(script, tmp_path / "run", kill_at=0, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = torch.load(tmp_path / "full" / "final.pt", weights_only=True)
    b = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    key = "blocks.1.ts_reducer.predictor.in_conv.1.weight"
    assert not torch.equal(b[key], ckpt["model"][key])  # steps 7 and 8 really ran after the resume
    assert (tmp_path / "run" / "predictors.safetensors").is_file()
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["global_step"] == 8


def test_corrupt_checkpoint_is_a_clear_error_and_a_failed_save_keeps_the_previous(tmp_path, monkeypatch):
    ds = data(16)
    finetune_dynamicvit(tiny(), ds, tmp_path, "dynamicvit", cfg(epochs=1), progress=False)
    path = tmp_path / "checkpoint.pt"
    good = path.read_bytes()

    def broken_save(obj, f, *a, **kw):
        f.write(good[: len(good) // 3])  # a partial write, then the disk "fails"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(finetune_mod.torch, "save", broken_save)
    with pytest.raises(TokenSparseError, match="No space left"):
        finetune_dynamicvit(tiny(), ds, tmp_path, "dynamicvit", cfg(epochs=2), resume=True, progress=False)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert load_checkpoint(path)["global_step"] == 4

    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(TokenSparseError, match="truncated or corrupt"):
        finetune_dynamicvit(tiny(), ds, tmp_path, "dynamicvit", cfg(), resume=True, progress=False)
    with pytest.raises(TokenSparseError, match="not found"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(TokenSparseError, match="same"):
        path.write_bytes(good)
        finetune_dynamicvit(tiny(), ds, tmp_path, "dynamicvit", cfg(batch_size=2), resume=True, progress=False)


def test_bad_training_input():
    with pytest.raises(TokenSparseError, match="dynamicvit"):
        finetune_dynamicvit(tiny(), data(8), "/tmp/unused", "tome", cfg(), progress=False)
    with pytest.raises(TokenSparseError, match="fewer than one batch"):
        finetune_dynamicvit(tiny(), data(2), "/tmp/unused", "dynamicvit", cfg(), progress=False)
    with pytest.raises(TokenSparseError, match="epochs"):
        finetune_dynamicvit(tiny(), data(8), "/tmp/unused", "dynamicvit", cfg(epochs=0), progress=False)


# ----------------------------------------------------------------------------- CLI

def test_cli_calibrate_and_train(image_folder, tmp_path, capsys):
    """timm's 6-block ``test_vit`` (160 px, 100 patches) with random weights: a smoke run of both commands."""
    rc = main(["calibrate", "--model", "test_vit", "--images", str(image_folder), "--method", "dynamicvit:rho=0.5",
               "--out", str(tmp_path / "p.safetensors"), "--epochs", "1", "--split", "even", "--batch-size", "3"])
    assert rc == 0, capsys.readouterr().err
    assert "calibrated 3 images" in capsys.readouterr().out
    model = tokensparse.patch(timm.create_model("test_vit"), "dynamicvit:rho=0.5",
                              predictors=str(tmp_path / "p.safetensors"))
    assert model(torch.randn(1, 3, 160, 160)).shape == (1, 1000)
    rc = main(["train", "--model", "test_vit", "--images", str(image_folder), "--out", str(tmp_path / "run"),
               "--epochs", "1", "--batch-size", "2", "--workers", "0", "--max-steps", "1"])
    assert rc == 0, capsys.readouterr().err
    assert load_checkpoint(tmp_path / "run" / "checkpoint.pt")["global_step"] == 1


@pytest.mark.parametrize("argv,match", [
    (["calibrate", "--model", "test_vit", "--images", "/nonexistent", "--out", "x.safetensors"],
     "not found"),
    (["calibrate", "--model", "test_vit", "--method", "tome", "--out", "x.safetensors"], "dynamicvit"),
    (["train", "--model", "test_vit", "--images", "/nonexistent", "--out", "o"], "not found"),
    (["train", "--model", "test_vit", "--out", "o", "--resume", "/nonexistent.pt", "--images", "."],
     "error"),
    (["calibrate", "--model", "test_vit"], "--out"),
])
def test_cli_errors_exit_2(argv, match, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and match in err and "Traceback" not in err


def test_cli_calibrate_on_an_unlabelled_folder(tmp_path, capsys):
    """calibrate reads every image under --images, whatever its name, with no class list (a wnids.txt
    beside it is not needed and not used); an unreadable file is skipped and counted."""
    root = tmp_path / "photos"
    g = torch.Generator().manual_seed(0)
    for name in ("holiday.jpg", "IMG 2.png", "trip/day1/beach.JPEG", "scan.webp"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()).save(root / name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (root / "notes.txt").write_text("not an image")
    (tmp_path / "wnids.txt").write_text("n01440764 tench\n")  # a class list beside the folder: ignored
    rc = main(["calibrate", "--model", "test_vit", "--images", str(root), "--method", "dynamicvit:rho=0.5",
               "--out", str(tmp_path / "p.safetensors"), "--epochs", "1", "--imitation-epochs", "1",
               "--batch-size", "2", "--no-flip"])
    assert rc == 0, capsys.readouterr().err
    out = " ".join(capsys.readouterr().out.split())
    assert "calibrated 4 images; skipped 1 unreadable image" in out and "broken.jpg" in out
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    rc = main(["calibrate", "--model", "test_vit", "--images", str(empty), "--out", str(tmp_path / "q.safetensors")])
    assert rc == 2 and "no images found" in capsys.readouterr().err


def test_config_defaults_and_shared_validation():
    assert asdict(TrainConfig()) == {
        "epochs": 30, "batch_size": 64, "lr": 1e-3, "backbone_lr_scale": 0.01, "weight_decay": 0.05,
        "warmup_epochs": 5.0, "min_lr": 1e-6, "ratio_weight": None, "distill_weight": 0.5, "token_weight": 0.5,
        "ce_weight": 1.0, "clip_grad": None, "bf16": False, "seed": 0, "num_workers": 2, "checkpoint_every": None,
        "max_steps": None}
    assert asdict(CalibrateConfig()) == {
        "epochs": 6, "batch_size": 32, "lr": 1e-3, "weight_decay": 0.05, "warmup_epochs": 1.0, "min_lr": 1e-5,
        "ratio_weight": None, "distill_weight": 0.5, "token_weight": 0.5, "flip": True, "views": 4, "holdout": 0.1,
        "imitation_epochs": 15, "imitation_lr": 1e-3, "imitation_target": "rollout", "seed": 0, "num_workers": 0}
    assert issubclass(TrainConfig, LearningConfig) and issubclass(CalibrateConfig, LearningConfig)
    CalibrateConfig(epochs=0).validate()  # calibration may skip the end-to-end epochs
    for config, kw, match in [
            (TrainConfig, {"epochs": 0}, "epochs must be a positive integer"),
            (CalibrateConfig, {"epochs": -1}, "epochs must be an integer >= 0"),
            (TrainConfig, {"batch_size": True}, "batch_size"),
            (CalibrateConfig, {"weight_decay": -1.0}, "weight_decay must be a number >= 0"),
            (TrainConfig, {"ratio_weight": float("nan")}, "ratio_weight"),
            (CalibrateConfig, {"num_workers": -1}, "num_workers"),
            (TrainConfig, {"max_steps": 0}, "max_steps"),
            (CalibrateConfig, {"lr": 0.0}, "lr must be > 0"),
            (CalibrateConfig, {"imitation_epochs": -1}, "imitation_epochs"),
            (CalibrateConfig, {"views": -1}, "views"),
            (CalibrateConfig, {"holdout": 1.0}, "holdout must be a number in"),
            (CalibrateConfig, {"imitation_target": "gradient"}, "imitation_target must be one of")]:
        with pytest.raises(TokenSparseError, match=match):
            config(**kw).validate()


def test_holdout_split_is_disjoint_covers_every_image_and_is_seeded():
    from tokensparse.train.calibrate import holdout_split
    train, held = holdout_split(25, 0.1, seed=3)
    assert len(held) == 3 and sorted(train + held) == list(range(25))
    assert holdout_split(25, 0.1, seed=3) == (train, held) and holdout_split(25, 0.1, seed=4) != (train, held)
    assert holdout_split(9, 0.5, seed=0) == (list(range(9)), [])  # too few images: none held out
    assert holdout_split(25, 0.0, seed=0)[1] == []


def test_random_views_are_seeded_in_range_and_differ_from_the_image():
    from tokensparse.train.calibrate import random_views
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    pixels = torch.rand(2, 3, 16, 16)
    images = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    views = random_views(images, 3, mean, std, torch.Generator().manual_seed(0))
    again = random_views(images, 3, mean, std, torch.Generator().manual_seed(0))
    assert len(views) == 3 and all(v.shape == images.shape for v in views)
    assert all(torch.equal(v, w) for v, w in zip(views, again))
    assert all(not torch.allclose(v, images) for v in views)
    for v in views:  # back in pixel space every value is a valid pixel
        back = v * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
        assert back.min() >= -1e-5 and back.max() <= 1 + 1e-5


def test_learned_state_round_trips():
    from tokensparse.methods import dynamicvit as dv
    model = tokensparse.patch(tiny(), "dynamicvit:rho=0.7")
    saved = {k: v.clone() for k, v in dv.learned_state(model).items()}
    with torch.no_grad():
        for p in dv.learned_parameters(model):
            p.add_(1.0)
    assert not all(torch.equal(saved[k], v) for k, v in dv.learned_state(model).items())
    dv.load_learned_state(model, saved)
    assert all(torch.equal(saved[k], v) for k, v in dv.learned_state(model).items())
