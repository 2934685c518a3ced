"""DynamicViT: learned token sparsification with prediction modules (METHODS.md §5).

A small prediction module before each location scores the patch tokens. In ``train()`` it
samples hard keep masks (Gumbel-softmax, straight-through) and the blocks mask attention
instead of removing tokens, so the whole thing is differentiable. In ``eval()`` the top
``int(N0 * ratio)`` tokens by keep score are gathered and the rest dropped (real savings).

Predictor weights are ordinary parameters (``blocks.<l>.ts_reducer.predictor.*`` in the
model's state dict); :func:`save_predictors` / the ``predictors=FILE`` option move them
through safetensors files.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import TokenSparseError
from ..ops import gather_tokens, keep_assignment, topk_indices, with_prefix
from ..patch.base import swap_class
from ..patch.vit import ReducedAttention, ReducedBlock, ReducedVisionTransformer, check_vit, uninstall
from ..state import TokenState
from .base import Method, OptionInfo, check_bool, check_keep_rate, per_location, resolve_locations

FILE_FORMAT = "tokensparse-dynamicvit-predictors"


# ----------------------------------------------------------------------------- pure functions

def stage_ratios(rho: float, n: int) -> list[float]:
    """Cumulative keep ratios ``rho, rho^2, ..., rho^n`` of the original patch count."""
    return [rho ** (i + 1) for i in range(n)]


def keep_tokens(n0: int, ratio: float) -> int:
    """Patch tokens kept at ``ratio`` of the original ``n0``: ``int(n0 * ratio)``, at least 1."""
    return max(1, min(n0, int(n0 * ratio + 1e-6)))


def hard_keep_mask(log_probs: Tensor, prev: Tensor, gumbel: bool = True) -> Tensor:
    """Hard 0/1 keep mask ``(B, n, 1)`` with straight-through gradients, times ``prev``.

    ``log_probs``: ``(B, n, 2)`` keep/drop log-probabilities. With ``gumbel`` the decision is
    sampled (hard Gumbel-softmax); without, it is the argmax (deterministic).
    """
    if gumbel:
        hard = F.gumbel_softmax(log_probs, hard=True)
    else:
        soft = log_probs.exp()
        hard = F.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype) - soft.detach() + soft
    return hard[..., :1] * prev


def policy_softmax(logits: Tensor, policy: Tensor, eps: float = 1e-12) -> Tensor:
    """Softmax over keys where only kept keys (``policy`` ``(B, N)`` = 1) and the query itself count.

    ``logits``: ``(B, H, N, N)``. Computed in fp32 as ``softmax * allow`` renormalised, which
    is multiplicative, so gradients reach ``policy`` (the authors' formulation). With an
    all-ones policy this is ``softmax`` up to rounding.
    """
    n = logits.shape[-1]
    keys = policy.float().reshape(policy.shape[0], 1, 1, n)
    eye = torch.eye(n, dtype=torch.float32, device=logits.device)
    allow = keys + (1.0 - keys) * eye
    weights = logits.float().softmax(dim=-1) * allow
    return weights / (weights.sum(dim=-1, keepdim=True) + eps)


def masked_attention(attn: nn.Module, x: Tensor, policy: Tensor) -> Tensor:
    """timm ``Attention`` on ``x`` ``(B, N, C)`` with attention masked by ``policy`` ``(B, N)``.

    This is the one place DynamicViT materialises the full attention matrix (training only).
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    weights = policy_softmax((q * attn.scale) @ k.transpose(-2, -1), policy)
    out = attn.attn_drop(weights).to(v.dtype) @ v
    out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


# ----------------------------------------------------------------------------- modules

class Predictor(nn.Module):
    """Keep/drop log-probabilities ``(B, n, 2)`` for tokens ``(B, n, C)`` (index 0 = keep).

    LayerNorm -> Linear(C, C) -> GELU; the first half of the channels stays per token, the
    second half is averaged over the kept tokens (``mask``; all tokens when None); then
    MLP C -> C/2 -> C/4 -> 2 with GELU and log-softmax.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
            nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, glob = x[..., :half], x[..., half:]
        if mask is None:
            glob = glob.mean(dim=1, keepdim=True)
        else:
            glob = (glob * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        return self.out_conv(torch.cat([local, glob.expand_as(x[..., half:])], dim=-1))


class DynamicViTState(TokenState):
    """:class:`TokenState` plus what training needs: the masks and the final tokens.

    ``policy``: current ``(B, N0, 1)`` patch keep mask (training only, None before the first
    location); ``masks``: the mask of every location this pass (with gradients);
    ``features``: the last ``forward_features`` output.
    """

    def __init__(self, num_prefix: int) -> None:
        super().__init__(num_prefix)
        self.policy: Optional[Tensor] = None
        self.masks: list[Tensor] = []
        self.features: Optional[Tensor] = None

    def start(self, x: Tensor) -> None:
        super().start(x)
        self.policy, self.masks, self.features = None, [], None

    def __deepcopy__(self, memo: dict) -> "DynamicViTState":
        """A fresh state: the records of a pass (with autograd history) are not copied."""
        return DynamicViTState(self.num_prefix)

    def attn_policy(self) -> Optional[Tensor]:
        """``(B, N)`` keep mask over the whole sequence (prefix = 1), or None."""
        if self.policy is None:
            return None
        p = self.policy.squeeze(-1)
        return torch.cat([p.new_ones(p.shape[0], self.num_prefix), p], dim=1)


class DynamicViTStage(nn.Module):
    """The prediction step before one block: masks (train) or gathers (eval) patch tokens."""

    def __init__(self, dim: int, ratio: float, gumbel: bool = True) -> None:
        super().__init__()
        self.predictor = Predictor(dim)
        self.ratio, self.gumbel = ratio, gumbel

    def extra_repr(self) -> str:
        return f"ratio={self.ratio:.4g}, gumbel={self.gumbel}"

    def forward(self, x: Tensor, state: DynamicViTState, block: int) -> Tensor:
        P = state.num_prefix
        B, N, _ = x.shape
        n0 = state.patch_to_token.shape[1]
        if self.training:
            prev = state.policy if state.policy is not None else x.new_ones(B, N - P, 1)
            mask = hard_keep_mask(self.predictor(x[:, P:], prev), prev, self.gumbel)
            state.policy = mask
            state.masks.append(mask.squeeze(-1))
            state.record(block, x, keep_mask=mask.squeeze(-1) > 0.5)
            return x
        k = keep_tokens(n0, self.ratio)
        if k >= N - P:
            state.record(block, x)
            return x
        score = self.predictor(x[:, P:])[..., 0]
        keep = with_prefix(topk_indices(score, k), P)
        size = None if state.size is None else gather_tokens(state.size, keep)
        state.update(keep_assignment(keep, N, P), size)
        x = gather_tokens(x, keep)
        state.record(block, x, keep_score=score)
        return x


class DynamicViTBlock(ReducedBlock):
    """timm ``Block`` with a DynamicViT stage *before* it and policy-masked attention in training."""

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        if attn_mask is not None or is_causal:
            raise TokenSparseError("token reduction does not support attention masks or causal attention")
        state: DynamicViTState = self._ts_state
        state.ensure_started(x)
        stage: Optional[DynamicViTStage] = getattr(self, "ts_reducer", None)
        if stage is not None:
            x = stage(x, state, self._ts_index)
        policy = state.attn_policy()
        if policy is None:
            y, _ = self.attn.forward_extras(self.norm1(x))
        else:
            y = masked_attention(self.attn, self.norm1(x), policy)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


class DynamicViTModel(ReducedVisionTransformer):
    """Keeps the final tokens for the losses; average pooling counts only kept tokens."""

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        out = super().forward_features(x, attn_mask=attn_mask, is_causal=is_causal)
        self._ts_state.features = out
        return out

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        policy = self._ts_state.policy
        if policy is not None and self.attn_pool is None and pool_type == "avg" and not self.pool_include_prefix:
            p = self.num_prefix_tokens
            return (x[:, p:] * policy).sum(dim=1) / policy.sum(dim=1).clamp_min(1.0)
        return super().pool(x, pool_type)


# ----------------------------------------------------------------------------- what the losses read

@dataclass
class DynamicViTOutputs:
    """What a training-mode forward exposes to :class:`tokensparse.train.DynamicViTLoss`.

    ``masks``: per location ``(B, N0)`` keep masks (straight-through gradients);
    ``targets``: their target keep ratios; ``features``: ``(B, N, C)`` final tokens (all
    tokens, original order); ``num_prefix``: prefix tokens at the front of ``features``.
    """
    masks: list[Tensor]
    targets: list[float]
    features: Tensor
    num_prefix: int

    @property
    def keep_ratios(self) -> list[float]:
        """Mean keep ratio of each location in this batch."""
        return [m.detach().float().mean().item() for m in self.masks]


def stages(model: nn.Module) -> dict[int, DynamicViTStage]:
    """``{block: stage}`` of a model patched with ``dynamicvit`` (error otherwise)."""
    found = {i: blk.ts_reducer for i, blk in enumerate(getattr(model, "blocks", []))
             if isinstance(getattr(blk, "ts_reducer", None), DynamicViTStage)}
    if not found:
        raise TokenSparseError("model is not patched with 'dynamicvit' (call tokensparse.patch(model, 'dynamicvit'))")
    return found


def train_outputs(model: nn.Module) -> DynamicViTOutputs:
    """The masks and final tokens of the last training-mode forward of a ``dynamicvit`` model."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    st = stages(model)
    state = model._ts_state
    if not state.masks or state.features is None:
        raise TokenSparseError("no training-mode forward recorded: call model.train() and run a forward pass first")
    return DynamicViTOutputs(list(state.masks), [s.ratio for s in st.values()], state.features, state.num_prefix)


def predictor_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every prediction module."""
    return [p for s in stages(getattr(model, "module", model)).values() for p in s.predictor.parameters()]


# ----------------------------------------------------------------------------- files

def predictor_state(model: nn.Module) -> dict[str, Tensor]:
    """``{"blocks.<l>.<param>": tensor}`` of every predictor (as saved in files)."""
    return {f"blocks.{i}.{k}": v.detach().cpu().contiguous()
            for i, s in stages(getattr(model, "module", model)).items() for k, v in s.predictor.state_dict().items()}


def save_predictors(model: nn.Module, path: str | Path) -> Path:
    """Write the predictors of a ``dynamicvit`` model to a safetensors file (atomically)."""
    from safetensors.torch import save_file
    path = Path(path).expanduser()
    tensors = predictor_state(model)
    locs = sorted(stages(getattr(model, "module", model)))
    meta = {"format": FILE_FORMAT, "locations": ",".join(map(str, locs)),
            "embed_dim": str(next(iter(tensors.values())).shape[-1])}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except OSError as exc:
        raise TokenSparseError(f"cannot write predictors file {str(path)!r}: {exc.strerror or exc}") from None
    return path


def read_predictors(path: str | Path) -> dict[int, dict[str, Tensor]]:
    """``{block: predictor state dict}`` from a file written by :func:`save_predictors`."""
    from safetensors import safe_open
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "not found"
        raise TokenSparseError(f"predictors file {str(p)!r} {what}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TokenSparseError(f"predictors file {str(p)!r} is not a valid safetensors file ({first})") from None
    if meta.get("format") != FILE_FORMAT:
        raise TokenSparseError(
            f"{str(p)!r} is not a DynamicViT predictors file (write one with "
            f"tokensparse.methods.dynamicvit.save_predictors or 'tokensparse calibrate')")
    out: dict[int, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        head, block, rest = (key.split(".", 2) + ["", ""])[:3]
        if head != "blocks" or not block.isdigit() or not rest:
            raise TokenSparseError(f"predictors file {str(p)!r} has an unexpected key {key!r}")
        out.setdefault(int(block), {})[rest] = value
    return out


def load_predictors(stage_map: dict[int, DynamicViTStage], path: str | Path) -> None:
    """Load a predictors file into ``stage_map``; clear error if it does not fit."""
    from ..models import describe_mismatch
    saved = read_predictors(path)
    if sorted(saved) != sorted(stage_map):
        raise TokenSparseError(
            f"predictors file {str(path)!r} has predictors before blocks {sorted(saved)}, but the "
            f"method is configured for locations {sorted(stage_map)} (set locations=[...] to match)")
    for block, state in saved.items():
        predictor = stage_map[block].predictor
        mismatch = describe_mismatch(predictor, state)
        if mismatch:
            raise TokenSparseError(
                f"predictors file {str(path)!r} does not fit this model at block {block}: {mismatch}")
        predictor.load_state_dict(state)


# ----------------------------------------------------------------------------- the method

class DynamicViT(Method):
    name = "dynamicvit"
    summary = ("DynamicViT: learned prediction modules drop uninformative tokens (needs trained predictors: "
               "'tokensparse calibrate' or 'tokensparse train'; random ones otherwise)")
    options = (
        OptionInfo("rho", 0.7, "base keep ratio: locations keep rho, rho^2, rho^3, ... of the original patches"),
        OptionInfo("ratios", None, "explicit cumulative keep ratios, one per location (overrides rho)"),
        OptionInfo("locations", None, "block indices the predictors run before; default 1/4, 1/2, 3/4 of the depth"),
        OptionInfo("predictors", None, "safetensors file with trained predictors (default: random initialisation)"),
        OptionInfo("gumbel", True, "training: sample keep masks with Gumbel noise (false: deterministic argmax)"),
    )

    def validate(self) -> None:
        c = self.config
        check_keep_rate(c["rho"], "rho")
        if c["ratios"] is not None:
            ratios = c["ratios"] if isinstance(c["ratios"], (list, tuple)) else [c["ratios"]]
            for r in ratios:
                check_keep_rate(r, "ratios")
            if any(b > a for a, b in zip(ratios, ratios[1:])):
                raise TokenSparseError(f"ratios are cumulative and must not increase, got {list(ratios)}")
        check_bool(c["gumbel"], "gumbel")
        if c["predictors"] is not None and not isinstance(c["predictors"], (str, Path)):
            raise TokenSparseError(f"predictors must be a file path, got {c['predictors']!r}")

    def schedule(self, depth: int) -> dict[int, float]:
        """``{block: cumulative keep ratio}`` for a model with ``depth`` blocks."""
        c = self.config
        locs = resolve_locations(c["locations"], depth)
        ratios = stage_ratios(c["rho"], len(locs)) if c["ratios"] is None else \
            per_location(c["ratios"], len(locs), "ratios")
        return dict(zip(locs, (float(r) for r in ratios)))

    def build_stages(self, model: nn.Module) -> dict[int, DynamicViTStage]:
        """Fresh (or loaded) stages on the model's device and dtype."""
        ref = next(model.parameters())
        out = {l: DynamicViTStage(model.embed_dim, r, self.config["gumbel"]).to(ref.device, ref.dtype)
               for l, r in self.schedule(len(model.blocks)).items()}
        if self.config["predictors"] is not None:
            load_predictors(out, self.config["predictors"])
        for s in out.values():
            s.train(model.training)
        return out

    def apply(self, model: nn.Module) -> None:
        check_vit(model, False, self.name)
        built = self.build_stages(model)
        state = DynamicViTState(num_prefix=model.num_prefix_tokens)
        swap_class(model, DynamicViTModel)
        model._ts_state = state
        for i, blk in enumerate(model.blocks):
            swap_class(blk, DynamicViTBlock)
            swap_class(blk.attn, ReducedAttention)
            blk._ts_state = state
            blk._ts_index = i
            if i in built:
                blk.ts_reducer = built[i]

    def remove(self, model: nn.Module) -> None:
        uninstall(model)


def describe(model: nn.Module) -> dict[str, Any]:
    """Locations, keep ratios and token counts of a ``dynamicvit`` model (for logs)."""
    st = stages(model)
    n0 = model.patch_embed.num_patches if hasattr(model, "patch_embed") else None
    return {"locations": list(st), "ratios": [s.ratio for s in st.values()],
            "tokens": [keep_tokens(n0, s.ratio) for s in st.values()] if n0 else None}
