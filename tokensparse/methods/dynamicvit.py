"""DynamicViT: learned token sparsification with prediction modules (METHODS.md §5 and §6).

ViT (§5): a small prediction module before each location scores the patch tokens. In
``train()`` it samples hard keep masks (Gumbel-softmax, straight-through) and the blocks mask
attention instead of removing tokens, so the whole thing is differentiable. In ``eval()`` the
top ``int(N0 * ratio)`` tokens by keep score (the keep/drop logit margin, :func:`keep_margin`)
are gathered and the rest dropped (real savings).

ConvNeXt and Swin (§6, dynamic spatial sparsification): prediction modules inside the third
stage pick, per image, the positions whose blocks take their full ("slow") path; the others
take a cheap :class:`FastPath` (new trainable parameters). Nothing is dropped, so the feature
map keeps its shape for dense prediction; see :mod:`tokensparse.families.routed`.

Learned parts are ordinary parameters (``blocks.<l>.ts_reducer.predictor.*`` in a ViT's
state dict; ``...blocks.<i>.ts_predictor.predictor.*`` and ``...blocks.<i>.ts_fast.*`` in the
third stage of a ConvNeXt / Swin); :func:`save_predictors` and the ``predictors=FILE`` option
move them through safetensors files.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

from ..errors import TokenSparseError
from ..families import HOOK, BlockHook, Route, RoutedFamily, TokenFamily, get_family, model_state
from ..families.routed import FAST, PREDICTOR
from ..models import describe_mismatch
from ..ops import gather_tokens, keep_assignment, split_topk, topk_indices, with_prefix
from ..state import TokenState
from ..utils import atomic_write
from .base import Method
from .options import OptionInfo, check_bool, check_keep_rate, keep_count, per_location, resolve_locations

FILE_FORMAT = "tokensparse-dynamicvit-predictors"


# ----------------------------------------------------------------------------- pure functions

def stage_ratios(rho: float, n: int) -> list[float]:
    """ViT: cumulative keep ratios ``rho, rho^2, ..., rho^n`` of the original patch count."""
    return [rho ** (i + 1) for i in range(n)]


def spatial_ratios(rho: float, n: int) -> list[float]:
    """ConvNeXt / Swin: slow-path ratios ``rho, rho - 0.2, rho - 0.4, ...`` (not cumulative)."""
    return [round(rho - 0.2 * i, 10) for i in range(n)]


def keep_tokens(n0: int, ratio: float) -> int:
    """Patch tokens kept at ``ratio`` of the original ``n0``: ``int(n0 * ratio)`` (the authors'
    rounding, down), at least 1."""
    return keep_count(ratio, n0, "floor")


def keep_margin(log_probs: Tensor) -> Tensor:
    """The keep score tokens are ranked by: ``log p(keep) - log p(drop)`` (the logit margin) of
    ``log_probs`` ``(B, n, 2)``. Unlike ``log p(keep)``, which rounds to exactly 0 for every
    confident token in fp32 (their order then decided by ties), it does not saturate; it ranks
    tokens the same way wherever ``log p(keep)`` has no ties (both increase with the margin)."""
    return log_probs[..., 0] - log_probs[..., 1]


def hard_keep_mask(log_probs: Tensor, prev: Tensor | None = None, gumbel: bool = True) -> Tensor:
    """Hard 0/1 keep mask ``(B, n, 1)`` with straight-through gradients, times ``prev`` if given.

    ``log_probs``: ``(B, n, 2)`` keep/drop log-probabilities. With ``gumbel`` the decision is
    sampled (hard Gumbel-softmax); without, it is the argmax (deterministic).
    """
    if gumbel:
        hard = F.gumbel_softmax(log_probs, hard=True)
    else:
        soft = log_probs.exp()
        hard = F.one_hot(soft.argmax(dim=-1), 2).to(soft.dtype) - soft.detach() + soft
    return hard[..., :1] if prev is None else hard[..., :1] * prev


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

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.in_conv(x)
        half = x.shape[-1] // 2
        local, glob = x[..., :half], x[..., half:]
        if mask is None:
            glob = glob.mean(dim=1, keepdim=True)
        else:
            glob = (glob * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1.0)
        return self.out_conv(torch.cat([local, glob.expand_as(x[..., half:])], dim=-1))


class PredictionModule(nn.Module):
    """A :class:`Predictor` and the keep ratio it serves at one location."""

    def __init__(self, dim: int, ratio: float, gumbel: bool = True) -> None:
        super().__init__()
        self.predictor = Predictor(dim)
        self.ratio, self.gumbel = ratio, gumbel

    def extra_repr(self) -> str:
        return f"ratio={self.ratio:.4g}, gumbel={self.gumbel}"


class TokenPruner(PredictionModule, BlockHook):
    """Token families: the prediction step before one block; masks (train) or gathers (eval) patch tokens.

    Ratios are cumulative (of the original patch count) and masks multiply the previous one.
    In training the mask also masks attention and pooling (``TokenState.policy``).
    """

    def before(self, x: Tensor, state: TokenState, block: int) -> Tensor:
        return self(x, state, block)

    def forward(self, x: Tensor, state: TokenState, block: int) -> Tensor:
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
        score = keep_margin(self.predictor(x[:, P:]))
        keep = with_prefix(topk_indices(score, k), P)
        size = None if state.size is None else gather_tokens(state.size, keep)
        state.update(keep_assignment(keep, N, P), size)
        x = gather_tokens(x, keep)
        state.record(block, x, keep_score=score)
        return x


class PositionRouter(PredictionModule):
    """ConvNeXt / Swin: picks the positions of a feature map that take the slow path.

    Ratios are per location (not cumulative); the global half of the predictor averages over
    every position. ``train()``: a hard Gumbel-softmax mask (straight-through); ``eval()``:
    the top ``int(N * ratio)`` positions by keep score (:func:`keep_margin`).
    """

    def forward(self, tokens: Tensor, state: TokenState) -> Route:
        log_probs = self.predictor(tokens)
        if self.training:
            mask = hard_keep_mask(log_probs, None, self.gumbel)
            state.masks.append(mask.squeeze(-1))
            return Route(mask=mask)
        slow, fast = split_topk(keep_margin(log_probs), keep_tokens(tokens.shape[1], self.ratio))
        return Route(slow_idx=slow, fast_idx=fast)


class FastPath(nn.Module):
    """The cheap path of unimportant positions: LayerNorm -> Linear(C, C), times a layer scale.

    The layer scale starts at ``init_scale`` (1e-6, as the authors'), so an untrained fast
    path leaves its positions almost unchanged.
    """

    def __init__(self, dim: int, init_scale: float = 1e-6) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), init_scale))
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x)) * self.gamma


# ----------------------------------------------------------------------------- what the losses read

@dataclass
class DynamicViTOutputs:
    """What a training-mode forward exposes to :class:`tokensparse.train.DynamicViTLoss`.

    ``masks``: per location ``(B, N)`` keep masks (straight-through gradients); ``targets``:
    their target keep ratios; ``features``: ``(B, N, C)`` final tokens (ViT: all tokens in the
    original order; ConvNeXt / Swin: the positions of the final feature map); ``num_prefix``:
    prefix tokens at the front of ``features``; ``feature_mask``: ``(B, N - num_prefix)`` which
    final tokens the token distillation covers (ViT: the kept ones), None for all of them
    (ConvNeXt / Swin: feature-map distillation).
    """
    masks: list[Tensor]
    targets: list[float]
    features: Tensor
    num_prefix: int
    feature_mask: Tensor | None = None

    @property
    def keep_ratios(self) -> list[float]:
        """Mean keep ratio of each location in this batch."""
        return [m.detach().float().mean().item() for m in self.masks]


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that carry DynamicViT's parts: a ViT's blocks, a hierarchical model's routed stage."""
    try:
        return list(get_family(model).blocks)
    except TokenSparseError:
        return []


def prediction_modules(model: nn.Module) -> dict[int, PredictionModule]:
    """``{block: prediction module}`` of a model patched with ``dynamicvit`` (error otherwise).

    For ConvNeXt and Swin, ``block`` indexes the blocks of the third stage.
    """
    found = {}
    for i, blk in enumerate(_blocks(_unwrap(model))):
        module = blk._modules.get(HOOK) or blk._modules.get(PREDICTOR)
        if isinstance(module, PredictionModule):
            found[i] = module
    if not found:
        raise TokenSparseError("model is not patched with 'dynamicvit' (call tokensparse.patch(model, 'dynamicvit'))")
    return found


def learned_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every trainable part DynamicViT adds, by name: ``blocks.<i>.predictor`` and ``blocks.<i>.fast``."""
    parts: dict[str, nn.Module] = {f"blocks.{i}.predictor": m.predictor for i, m in prediction_modules(model).items()}
    for i, blk in enumerate(_blocks(_unwrap(model))):
        if isinstance(blk._modules.get(FAST), FastPath):
            parts[f"blocks.{i}.fast"] = blk._modules[FAST]
    return parts


def learned_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of every prediction module and fast path."""
    return [p for m in learned_modules(model).values() for p in m.parameters()]


def train_outputs(model: nn.Module) -> DynamicViTOutputs:
    """The masks and final tokens of the last training-mode forward of a ``dynamicvit`` model."""
    model = _unwrap(model)
    targets = [m.ratio for m in prediction_modules(model).values()]
    state = model_state(model)
    if state is None or not state.masks or state.features is None:
        raise TokenSparseError("no training-mode forward of a full model recorded: call model.train() and run a "
                               "forward pass first (features_only models cannot be trained with the losses)")
    feature_mask = state.masks[-1] if isinstance(get_family(model), TokenFamily) else None
    return DynamicViTOutputs(list(state.masks), targets, state.features, state.num_prefix, feature_mask)


def default_ratio_weight(model: nn.Module) -> float:
    """The ratio-loss weight of the authors' recipes: 2.0 for ViTs (token families), 10.0 for
    ConvNeXt / Swin (routed families)."""
    return 10.0 if isinstance(get_family(_unwrap(model)), RoutedFamily) else 2.0


# ----------------------------------------------------------------------------- files

def learned_state(model: nn.Module) -> dict[str, Tensor]:
    """``{"blocks.<i>.predictor.<param>" / "blocks.<i>.fast.<param>": tensor}`` (as saved in files)."""
    return {f"{name}.{k}": v.detach().cpu().contiguous()
            for name, module in learned_modules(model).items() for k, v in module.state_dict().items()}


def load_learned_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Put back what :func:`learned_state` returned (the same model's parts, e.g. an earlier epoch's)."""
    parts = learned_modules(model)
    for name, module in parts.items():
        prefix = name + "."
        module.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def save_predictors(model: nn.Module, path: str | Path) -> Path:
    """Write the learned parts of a ``dynamicvit`` model to a safetensors file (atomically)."""
    path = Path(path).expanduser()
    tensors = learned_state(model)
    meta = {"format": FILE_FORMAT, "family": get_family(_unwrap(model)).name,
            "locations": ",".join(map(str, sorted(prediction_modules(model))))}
    atomic_write(path, lambda f: f.write(save(tensors, metadata=meta)), what="predictors file")
    return path


def read_predictors(path: str | Path, family: str | None = None) -> dict[str, dict[str, Tensor]]:
    """``{part name: state dict}`` from a file written by :func:`save_predictors`; with ``family``, an
    error if the file was written for another model family (its tensors could fit, silently wrong)."""
    p = Path(path).expanduser()
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "not found"
        raise TokenSparseError(f"predictors file {str(p)!r} {what}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            names = list(f.keys())  # a safetensors file handle is not iterable
            tensors = {k: f.get_tensor(k) for k in names}
    except Exception as exc:  # noqa: BLE001 - any failure means unreadable
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise TokenSparseError(f"predictors file {str(p)!r} is not a valid safetensors file ({first})") from None
    if meta.get("format") != FILE_FORMAT:
        raise TokenSparseError(
            f"{str(p)!r} is not a DynamicViT predictors file (write one with "
            f"tokensparse.methods.dynamicvit.save_predictors or 'tokensparse calibrate')")
    saved_family = meta.get("family")
    if family is not None and saved_family is not None and saved_family != family:
        raise TokenSparseError(f"predictors file {str(p)!r} was calibrated on a {saved_family} model; this is a "
                               f"{family} model: calibrate predictors for it ('tokensparse calibrate')")
    out: dict[str, dict[str, Tensor]] = {}
    for key, value in tensors.items():
        parts = key.split(".", 3)
        if len(parts) != 4 or parts[0] != "blocks" or not parts[1].isdigit() or parts[2] not in ("predictor", "fast"):
            raise TokenSparseError(f"predictors file {str(p)!r} has an unexpected key {key!r}")
        out.setdefault(".".join(parts[:3]), {})[parts[3]] = value
    return out


def load_predictors(parts: dict[str, nn.Module], path: str | Path, family: str | None = None) -> None:
    """Load a predictors file into ``parts`` (see :func:`learned_modules`) of a model of ``family``
    (its name); clear error if it does not fit."""
    saved = read_predictors(path, family)
    if sorted(saved) != sorted(parts):
        raise TokenSparseError(
            f"predictors file {str(path)!r} holds {', '.join(sorted(saved))}, but the method is configured "
            f"with {', '.join(sorted(parts))} (set locations=[...] to match the file)")
    for name, state in saved.items():
        mismatch = describe_mismatch(parts[name], state)
        if mismatch:
            raise TokenSparseError(f"predictors file {str(path)!r} does not fit this model at {name}: {mismatch}")
        parts[name].load_state_dict(state)


# ----------------------------------------------------------------------------- the method

class DynamicViT(Method):
    name = "dynamicvit"
    summary = ("DynamicViT: learned prediction modules drop uninformative tokens (ViT) or send unimportant "
               "positions down a cheap fast path (ConvNeXt, Swin); needs trained predictors ('tokensparse "
               "calibrate' or 'tokensparse train'), random ones otherwise")
    needs_training = True
    options = (
        OptionInfo("rho", 0.7, "base keep ratio: ViT locations keep rho, rho^2, rho^3, ... of the original patches; "
                               "ConvNeXt / Swin locations send rho, rho-0.2, rho-0.4, ... of the positions down the "
                               "slow path"),
        OptionInfo("ratios", None, "explicit keep ratios, one per location, non-increasing (overrides rho)"),
        OptionInfo("locations", None, "block indices the predictors run before; default ViT: 1/4, 1/2, 3/4 of the "
                                      "depth; ConvNeXt / Swin: blocks 1, 2, 3 of the third stage (3, 6, 9 / 2, 4, 6 "
                                      "for deep third stages)"),
        OptionInfo("predictors", None, "safetensors file with trained predictors (and fast paths); default: random "
                                       "initialisation"),
        OptionInfo("gumbel", True, "training: sample keep masks with Gumbel noise (false: deterministic argmax)"),
    )

    def validate(self) -> None:
        c = self.config
        check_keep_rate(c["rho"], "rho")
        if c["ratios"] is not None:
            ratios = c["ratios"] if isinstance(c["ratios"], (list, tuple)) else [c["ratios"]]
            for r in ratios:
                check_keep_rate(r, "ratios")
            if any(b > a for a, b in itertools.pairwise(ratios)):
                raise TokenSparseError(f"ratios must not increase from one location to the next, got {list(ratios)}")
        check_bool(c["gumbel"], "gumbel")
        if c["predictors"] is not None and not isinstance(c["predictors"], (str, Path)):
            raise TokenSparseError(f"predictors must be a file path, got {c['predictors']!r}")

    def schedule(self, depth: int, spatial: bool = False,
                 default_locations: list[int] | None = None) -> dict[int, float]:
        """``{block: keep ratio}`` for ``depth`` blocks (a ViT, or the third stage if ``spatial``)."""
        c = self.config
        if c["locations"] is None and default_locations is not None:
            if not default_locations:
                raise TokenSparseError(f"the third stage has {depth} block(s): too few for a predictor location")
            locs = default_locations
        else:
            locs = resolve_locations(c["locations"], depth)
        if c["ratios"] is not None:
            ratios = per_location(c["ratios"], len(locs), "ratios")
        elif spatial:
            ratios = spatial_ratios(c["rho"], len(locs))
            if ratios[-1] <= 0:
                raise TokenSparseError(
                    f"rho={c['rho']} gives a slow-path ratio of {ratios[-1]:.2g} at the last of {len(locs)} locations "
                    f"(rho - 0.2 per location): use rho > {0.2 * (len(locs) - 1):.1f} or explicit ratios")
        else:
            ratios = stage_ratios(c["rho"], len(locs))
        return dict(zip(locs, (float(r) for r in ratios)))

    @classmethod
    def supports_family(cls, family: type) -> bool:
        return (issubclass(family, TokenFamily) and family.reducible) or issubclass(family, RoutedFamily)

    def plan(self, family: TokenFamily | RoutedFamily) -> dict[int, float]:
        """``{block: keep ratio}`` on a model's ``family`` (for routed families: blocks of the routed stage)."""
        if isinstance(family, TokenFamily):
            return self.schedule(family.depth)
        depth = len(family.blocks)
        return self.schedule(depth, spatial=True, default_locations=family.default_locations(depth))

    def _finish_parts(self, model: nn.Module, parts: dict[str, nn.Module], family: str) -> None:
        """Move new parts to the model's device, dtype and mode; load a predictors file into them."""
        ref = next(model.parameters())
        for module in parts.values():
            module.to(ref.device, ref.dtype).train(model.training)
        if self.config["predictors"] is not None:
            load_predictors(parts, self.config["predictors"], family)

    def prepare(self, model: nn.Module, family: TokenFamily | RoutedFamily) -> Callable[[], None]:
        family.check(self.name)
        sched = self.plan(family)
        gumbel = self.config["gumbel"]
        if isinstance(family, TokenFamily):  # a pruner before each location
            pruners = {b: TokenPruner(family.width(), r, gumbel) for b, r in sched.items()}
            self._finish_parts(model, {f"blocks.{b}.predictor": m.predictor for b, m in pruners.items()}, family.name)
            for m in pruners.values():
                m.train(model.training)
            return lambda: family.install(TokenState(num_prefix=family.num_prefix, keep_features=True), pruners)
        # routed: a router before each location, fast paths from the first on
        dim = family.width()
        routers = {b: PositionRouter(dim, r, gumbel) for b, r in sched.items()}
        fast = {i: FastPath(dim) for i in range(min(sched), len(family.blocks))}
        parts = {f"blocks.{b}.predictor": m.predictor for b, m in routers.items()}
        parts.update({f"blocks.{i}.fast": m for i, m in fast.items()})
        self._finish_parts(model, parts, family.name)
        for m in routers.values():
            m.train(model.training)
        return lambda: family.install(TokenState(keep_features=True), routers, fast)


def describe(model: nn.Module) -> dict[str, Any]:
    """Locations, keep ratios and kept token (or slow position) counts of a ``dynamicvit`` model, for logs.

    Counts are for the model's default input size.
    """
    modules = prediction_modules(model)
    n = get_family(_unwrap(model)).num_positions()
    return {"locations": list(modules), "ratios": [m.ratio for m in modules.values()],
            "tokens": [keep_tokens(n, m.ratio) for m in modules.values()]}
