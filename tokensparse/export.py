"""ONNX export of a (reduced) model, checked against PyTorch with onnxruntime.

Every method's eval path has fixed token counts per location and no data-dependent Python
control flow, so ``torch.onnx.export(..., dynamo=True)`` captures the whole reduced model,
with the batch dimension dynamic if asked. :func:`export_onnx` writes the file (atomically:
a file already at ``path`` stays until the new one has passed its check), runs it with
onnxruntime on a random batch (one image more than the export batch when the batch is
dynamic) and raises a :class:`~tokensparse.errors.TokenSparseError` if it differs from
PyTorch by more than ``atol``. Needs ``pip install "tokensparse[export]"`` (onnx,
onnxscript, onnxruntime).
"""
from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .data import input_size
from .errors import TokenSparseError, first_line
from .families import slot
from .utils import check_writable_folder, eval_mode, remove_stale_temp_files, temp_path

INPUT_NAME = "images"
"""The name of the exported model's input (``(B, C, H, W)`` float images, preprocessed)."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote: the file, its inputs and outputs as ``(name, shape)`` (a
    dynamic dimension is a name such as ``"batch"``), and the largest absolute difference
    from PyTorch on the check batch (None when not checked)."""
    path: Path
    inputs: list[tuple[str, list[int | str]]] = field(default_factory=list)
    outputs: list[tuple[str, list[int | str]]] = field(default_factory=list)
    max_difference: float | None = None
    check_batch: int | None = None


class TensorOutputs(nn.Module):
    """``model`` returning a tuple of tensors: a timm model's output as is, a transformers
    output's tensor fields in order (their names in :attr:`names` after a first call)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names: list[str] = []

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.model(x)
        if isinstance(out, Tensor):
            self.names = ["logits"]
            return (out,)
        if isinstance(out, dict):  # transformers ModelOutput
            items = [(k, v) for k, v in out.items() if isinstance(v, Tensor)]
            self.names = [k for k, _ in items]
            return tuple(v for _, v in items)
        if isinstance(out, (tuple, list)) and all(isinstance(v, Tensor) for v in out):
            self.names = [f"output_{i}" for i in range(len(out))]
            return tuple(out)
        raise TokenSparseError(f"cannot export a model whose output is a {type(out).__name__}")


def _onnx_runtime() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise TokenSparseError('ONNX export needs onnx, onnxscript and onnxruntime: pip install "tokensparse[export]"') \
            from None
    return onnxruntime


def _check_size(image_size: Sequence[int] | None, model: nn.Module) -> tuple[int, int, int]:
    channels, h, w = input_size(model)
    if image_size is None:
        return channels, h, w
    if len(image_size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in image_size):
        raise TokenSparseError(f"image_size must be two positive integers (height, width), got {image_size!r}")
    return channels, int(image_size[0]), int(image_size[1])


def export_onnx(model: nn.Module, path: str | os.PathLike[str], *, batch_size: int = 2, dynamic_batch: bool = True,
                image_size: Sequence[int] | None = None, check: bool = True, atol: float = 1e-4,
                seed: int = 0, optimize: bool = True) -> ExportReport:
    """Export ``model`` (patched or not, in eval mode) to the ONNX file ``path`` and check it.

    ``batch_size``: the batch the model is traced with (and the file's fixed batch without
    ``dynamic_batch``). ``image_size``: ``(H, W)`` of the input (default: the model's own).
    ``check``: run the file with onnxruntime on a random batch (``batch_size + 1`` images when
    the batch is dynamic) and raise if any output differs from PyTorch by more than ``atol``;
    the file is only moved to ``path`` once it passed. ``optimize``: run the ONNX optimizer
    (constant folding, fusions; a smaller, faster file) after the translation. Returns an
    :class:`ExportReport`.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TokenSparseError(f"batch_size must be a positive integer, got {batch_size!r}")
    if dynamic_batch and batch_size < 2:
        raise TokenSparseError("a dynamic batch is traced with batch_size >= 2 (a batch of 1 would be taken as "
                               "fixed); give batch_size 2 or more, or dynamic_batch=False")
    out = Path(path).expanduser()
    if out.is_dir():
        raise TokenSparseError(f"cannot write ONNX file {str(out)!r}: it is a folder; give a file name")
    ort = _onnx_runtime() if check else None
    check_writable_folder(out.parent, "folder for the ONNX file")
    remove_stale_temp_files(out.parent, (out.name,))
    size = _check_size(image_size, model)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, *size, generator=generator).to(device)
    wrapped = TensorOutputs(model).eval()
    with eval_mode(model), torch.no_grad():
        try:
            wrapped(x)  # names the outputs
        except (AssertionError, ValueError, RuntimeError) as exc:
            if image_size is None:
                raise
            own = input_size(model)
            raise TokenSparseError(f"the model does not take {size[1]}x{size[2]} images ({first_line(exc)}); its "
                                   f"input size is {own[1]}x{own[2]}: leave out the image size, or build a timm "
                                   f"model with dynamic_img_size=True") from None
        names = list(wrapped.names)
        dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(wrapped, (x,), dynamo=True, dynamic_shapes=dynamic,
                                            input_names=[INPUT_NAME], output_names=names, optimize=optimize,
                                            verbose=False)
            except ImportError as exc:
                raise TokenSparseError(f'ONNX export needs onnx and onnxscript: pip install "tokensparse[export]" '
                                       f'({exc})') from None
            except torch.onnx.errors.OnnxExporterError as exc:  # export / conversion errors carry long traces
                s = slot(model)
                kind = (s.original if s is not None and s.original is not None else type(model)).__name__
                raise TokenSparseError(f"ONNX export of this {kind} failed: {first_line(exc)}") from None
    tmp = temp_path(out)
    try:
        program.save(str(tmp))
        report = ExportReport(out)
        if ort is not None:
            session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            report.inputs = [(i.name, _shape_of(i)) for i in session.get_inputs()]
            report.outputs = [(o.name, _shape_of(o)) for o in session.get_outputs()]
            n = batch_size + 1 if dynamic_batch else batch_size
            probe = torch.randn(n, *size, generator=generator)
            got = session.run(None, {session.get_inputs()[0].name: probe.numpy()})
            with eval_mode(model), torch.no_grad():
                want = wrapped(probe.to(device))
            diff = max(float((torch.from_numpy(g) - w.float().cpu()).abs().max()) for g, w in zip(got, want))
            report.max_difference, report.check_batch = diff, n
            if not diff <= atol:
                raise TokenSparseError(
                    f"the exported model differs from PyTorch by {diff:.3g} (more than {atol:g}) on a batch of {n}; "
                    f"nothing was written to {str(out)!r}")
        os.replace(tmp, out)
        return report
    finally:
        tmp.unlink(missing_ok=True)


def _shape_of(arg: Any) -> list[int | str]:
    return [d if isinstance(d, int) else str(d) for d in arg.shape]


__all__ = ["INPUT_NAME", "ExportReport", "TensorOutputs", "export_onnx"]
