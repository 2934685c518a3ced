"""FLOPs / MACs counted from a real forward pass (data-dependent token counts included)."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..data import input_size
from ..errors import TokenSparseError
from ..utils import eval_mode

_aten = torch.ops.aten


def _attention_flops(query_shape: Sequence[int], key_shape: Sequence[int],
                     value_shape: Sequence[int]) -> int:
    """2*B*H*Nq*Nk*D (Q K^T) + 2*B*H*Nq*Nk*Dv (attention @ V); key/value heads broadcast."""
    *batch_heads, n_q, d = query_shape
    n_k, d_v = key_shape[-2], value_shape[-1]
    bh = 1
    for s in batch_heads:
        bh *= int(s)
    return 2 * bh * int(n_q) * int(n_k) * (int(d) + int(d_v))


def _sdpa_formula(query_shape: Sequence[int], key_shape: Sequence[int],
                  value_shape: Sequence[int], *args: Any, out_shape: Any = None,
                  **kwargs: Any) -> int:
    """FlopCounterMode formula (receives shapes) for fused attention kernels it skips."""
    return _attention_flops(query_shape, key_shape, value_shape)


def attention_flop_mapping() -> dict[Any, Callable[..., int]]:
    """Custom FlopCounterMode formulas for attention kernels torch counts as 0 (CPU/XPU)."""
    names = ("_scaled_dot_product_flash_attention_for_cpu",
             "_scaled_dot_product_fused_attention_overrideable")
    return {getattr(_aten, n): _sdpa_formula for n in names if hasattr(_aten, n)}


def count_flops(model: nn.Module, inputs: torch.Tensor) -> int:
    """Total FLOPs (multiply and add counted separately) of ``model(inputs)``, eval mode."""
    counter = FlopCounterMode(display=False, custom_mapping=attention_flop_mapping())
    with eval_mode(model), torch.inference_mode(), counter:
        model(inputs)
    return int(counter.get_total_flops())


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the model's input (:func:`tokensparse.data.input_size`)."""
    return input_size(model)


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first parameter (CPU/float32 if none)."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float32


def gmacs(model: nn.Module, input_size: Sequence[int] | None = None,
          batch_size: int = 1) -> float:
    """GMACs per image (FLOPs / 2 / 1e9 / batch) from one real forward pass.

    ``input_size`` is (C, H, W); ``None`` takes it from the model's timm data config.
    """
    if batch_size < 1:
        raise TokenSparseError(f"batch_size must be >= 1, got {batch_size}")
    size = tuple(input_size) if input_size is not None else model_input_size(model)
    if len(size) != 3 or any(int(s) < 1 for s in size):
        raise TokenSparseError(f"input_size must be (C, H, W) with positive sizes, got {size}")
    device, dtype = model_device_dtype(model)
    x = torch.randn(batch_size, *size, device=device, dtype=dtype)
    return count_flops(model, x) / 2 / 1e9 / batch_size
