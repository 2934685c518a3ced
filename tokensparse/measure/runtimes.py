"""Where timed models run: eager PyTorch, ``torch.compile`` or onnxruntime (the exported file).

:func:`prepare_runtime` turns the eager variants into what is timed and measures the one-off
cost of getting there (compiling, or exporting and checking), which is reported on its own and
never part of the throughput.
"""
from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import TokenSparseError
from ..export import export_onnx
from ..utils import eval_mode

RUNTIMES = ("eager", "compile", "onnxruntime")
"""``eager``: the PyTorch models as they are; ``compile``: ``torch.compile(fullgraph=True)``;
``onnxruntime``: each model exported to ONNX (fixed batch) and run by an onnxruntime session."""


class OrtModel(nn.Module):
    """An onnxruntime session as a module: ``forward(images)`` returns the file's first output."""

    def __init__(self, session: Any) -> None:
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_name = session.get_outputs()[0].name

    def forward(self, x: Tensor) -> Tensor:
        out = self.session.run([self.output_name], {self.input_name: x.detach().cpu().float().numpy()})
        return torch.from_numpy(out[0])


def _session(path: Path, threads: int | None) -> Any:
    import onnxruntime
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    # no busy-waiting between runs: spinning threads would slow the PyTorch models timed in between
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compile_options(freeze: bool) -> contextlib.AbstractContextManager:
    """Inductor's settings while a model compiles (its first call): ``freezing`` when ``freeze``."""
    if not freeze:
        return contextlib.nullcontext()
    return torch._inductor.config.patch(freezing=True)  # torch loads inductor on first use


def prepare_runtime(models: Mapping[str, nn.Module], runtime: str, batch_size: int,
                    input_size: Sequence[int], threads: int | None = None, device: torch.device | None = None,
                    dtype: str = "fp32", backend: str = "inductor", progress: Callable[[], Any] | None = None,
                    ) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """``(models to time, seconds each took to prepare)`` for ``runtime`` (:data:`RUNTIMES`).

    ``compile``: each model compiled with ``fullgraph=True`` (``backend``) and run once on a
    ``batch_size`` batch, the compile time measured (shapes stay fixed: no recompilation while
    timing). On a CPU, inductor compiles with freezing (weights folded in as constants and
    linear layers pre-packed: inductor's CPU inference setting, which the models, in eval mode
    under ``inference_mode``, allow). ``onnxruntime``: each model exported at ``batch_size`` and checked
    (:func:`~tokensparse.export.export_onnx`), then loaded in a session with ``threads`` threads
    (CPU, fp32 only); the time is the export's and the check's. ``progress()`` runs after each model.
    """
    if runtime not in RUNTIMES:
        raise TokenSparseError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "eager":
        return dict(models), {}
    if runtime == "onnxruntime" and ((device is not None and device.type != "cpu") or dtype != "fp32"):
        raise TokenSparseError("the onnxruntime runtime times on the CPU in fp32 (give --device cpu --dtype fp32)")
    seconds: dict[str, float] = {}
    out: dict[str, nn.Module] = {}
    if runtime == "compile":
        x = torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0))
        # the models share their forward's code: each compile adds one entry to its cache, and
        # dynamo's default limit (8) would stop a 9th model under fullgraph=True
        limit = max(torch._dynamo.config.recompile_limit, len(models) + 8)
        for name, model in models.items():
            if device is not None:
                model.to(device)
            compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=backend)
            freeze = backend == "inductor" and (device is None or device.type == "cpu")
            start = time.perf_counter()
            with eval_mode(model), torch.inference_mode(), compile_options(freeze), \
                    torch._dynamo.config.patch(recompile_limit=limit):
                compiled(x.to(device) if device is not None else x)
            seconds[name] = time.perf_counter() - start
            out[name] = compiled
            if progress is not None:
                progress()
        return out, seconds
    with tempfile.TemporaryDirectory(prefix="tokensparse-ort-") as folder:  # a session keeps its model in memory
        for i, (name, model) in enumerate(models.items()):
            start = time.perf_counter()
            report = export_onnx(model.cpu(), Path(folder) / f"model{i}.onnx", batch_size=batch_size,
                                 dynamic_batch=False, image_size=tuple(input_size[1:]))
            seconds[name] = time.perf_counter() - start
            out[name] = OrtModel(_session(report.path, threads))
            if progress is not None:
                progress()
    return out, seconds


__all__ = ["RUNTIMES", "OrtModel", "prepare_runtime"]
