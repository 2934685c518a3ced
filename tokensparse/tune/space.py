"""The search space: each method's per-location schedules (*knobs*) and how they become specs."""
from __future__ import annotations

import math

from torch import nn

from ..methods import get_method
from ..methods.evovit import default_stages
from ..methods.mctf import MIN_TOKENS as MCTF_MIN_TOKENS
from ..methods.options import default_locations
from ..spec import format_spec


class Knob:
    """A method's per-location schedule: ``values[loc]`` tokens removed at location ``loc``.

    Schedules are searched as *shapes*: a set of locations with relative weights, scaled by one
    amount to hit the target (:meth:`fill`). ``cut`` is the last block, where a method may
    remove every patch token it can after the last attention (free for a class-token head:
    the last MLP then runs on the class token alone), or None.
    """
    method: str = ""
    resumable: bool = True
    """Whether a pass can resume at its first reducing block from the unreduced pass's tokens
    (reductions inside blocks; not Evo-ViT, whose global attention starts at block 0)."""
    first: int = 1
    """The first block a shape may start at (class-attention methods skip block 0)."""
    parts: tuple[str, ...] = ()
    """The methods a schedule of several methods runs (their own overheads are its cost); empty: ``method``."""
    by_default: bool = True
    """Whether :func:`tune` searches it when no methods are named."""

    @classmethod
    def methods(cls) -> tuple[str, ...]:
        return cls.parts or (cls.method,)

    @classmethod
    def supports(cls, model: nn.Module) -> bool:
        """Whether every method the knob's schedules run supports ``model``."""
        return all(get_method(name)().supports(model) for name in cls.methods())

    def __init__(self, depth: int, patches: int, num_prefix: int) -> None:
        self.depth, self.patches, self.num_prefix = depth, patches, num_prefix

    @property
    def cut(self) -> int | None:
        return self.depth - 1 if self.depth > 2 else None

    def positions(self) -> list[int]:
        """Where shapes place reductions (the cut block apart)."""
        return list(range(self.first, self.depth - 1))

    def shapes(self) -> list[tuple[str, dict[int, float]]]:
        """``(label, {location: weight})`` schedules to try: reductions from one of the first five
        blocks on, in every block or every third, flat, falling (more tokens early, where they
        save most) or rising (more late, where they lose least)."""
        out = []
        pos = self.positions()
        for start in pos[:5]:
            for step in self.steps:
                locs = [b for b in pos if b >= start and (b - start) % step == 0]
                for profile in self.profiles:
                    out.append((f"from {start} every {step} {profile}", _profile(locs, profile)))
        return out

    steps: tuple[int, ...] = (1, 3)
    profiles: tuple[str, ...] = ("flat", "falling", "rising")

    def spec(self, values: dict[int, int]) -> str:
        raise NotImplementedError

    def limit(self, values: dict[int, int], loc: int) -> int:
        """The most tokens location ``loc`` may remove given the earlier locations' values: all
        but one (pruning methods; merging ones override)."""
        return max(0, self._before(values, loc) - 1)

    def _before(self, values: dict[int, int], loc: int) -> int:
        """Patch tokens entering location ``loc`` after the earlier locations' values."""
        return self.patches - sum(v for b, v in values.items() if b < loc)

    def fill(self, weights: dict[int, float], amount: float, cut: bool) -> dict[int, int]:
        """``round(amount * weight)`` tokens at each location (within the limits, in block order), and
        as many as allowed at the cut block when ``cut``."""
        values: dict[int, int] = {}
        for loc in sorted(weights):
            v = min(round(amount * weights[loc]), self.limit(values, loc))
            if v > 0:
                values[loc] = v
        if cut and self.cut is not None:
            v = self.limit(values, self.cut)
            if v > 0:
                values[self.cut] = v
        return values

    def first_block(self, values: dict[int, int]) -> int:
        """The block a pass of ``values`` can resume at (its first reduction)."""
        return min((b for b, v in values.items() if v > 0), default=0) if self.resumable else 0


def _profile(locs: list[int], profile: str) -> dict[int, float]:
    """Weights over ``locs``: ``flat`` (all 1), ``falling`` (1.5 to 0.5) or ``rising`` (0.5 to 1.5)."""
    n = len(locs)
    if profile == "flat" or n == 1:
        return dict.fromkeys(locs, 1.0)
    ramp = [1.5 - i / (n - 1) for i in range(n)]
    return dict(zip(locs, ramp if profile == "falling" else ramp[::-1]))


class ToMeKnob(Knob):
    """ToMe: ``values[block]`` tokens merged in that block (``r`` per block)."""
    method = "tome"
    first = 0
    steps = (1,)

    def spec(self, values: dict[int, int]) -> str:
        r = [values.get(b, 0) for b in range(self.depth)]
        while len(r) > 1 and r[-1] == 0:
            r.pop()
        return format_spec(self.method, {"r": r})

    def limit(self, values: dict[int, int], loc: int) -> int:
        return self._before(values, loc) // 2  # ToMe merges at most half of the patch tokens per block


class MCTFKnob(ToMeKnob):
    """MCTF: as ToMe, from block 1 (the authors' setting), leaving at least ten tokens (theirs). No
    cut: at its default MCTF merges after the block, which saves nothing in the last one."""
    method = "mctf"
    first = 1

    @property
    def cut(self) -> int | None:
        return None

    def limit(self, values: dict[int, int], loc: int) -> int:
        before = self._before(values, loc)
        return max(0, min(before // 2, before + self.num_prefix - MCTF_MIN_TOKENS))


class ToFuKnob(ToMeKnob):
    """ToFu: as ToMe (``r`` per block: pruned before its switch block, merged by MLERP after)."""
    method = "tofu"


class PiToMeKnob(ToMeKnob):
    """PiToMe: ``r`` per block, as ToMe (replacing the authors' one keep ratio for every block)."""
    method = "pitome"


class ZeroTPruneKnob(ToMeKnob):
    """Zero-TPrune: ``r`` patch tokens pruned per block, at most the less important half."""
    method = "zerotprune"


class DiffRateKnob(Knob):
    """DiffRate: ``values[block]`` patch tokens removed in that block, half pruned (by class attention),
    half merged (rounding to pruning), as the per-block kept counts DiffRate takes."""
    method = "diffrate"
    first = 0

    def spec(self, values: dict[int, int]) -> str:
        last = max((b for b, v in values.items() if v > 0), default=0)
        prune, merge = [], []
        for b in range(last + 1):
            before = self._before(values, b)
            v = values.get(b, 0)
            prune.append(before - (v - v // 2))
            merge.append(before - v)
        return format_spec(self.method, {"prune_kept": prune, "merge_kept": merge})


class TopKKnob(Knob):
    """Top-K / EViT: ``values[loc]`` patch tokens dropped at ``loc`` (EViT keeps one fused token more)."""
    method = "topk"
    fuse = False

    def _before(self, values: dict[int, int], loc: int) -> int:
        """As :meth:`Knob._before`, plus the token each earlier reducing location fuses (EViT)."""
        fused = sum(1 for b, v in values.items() if b < loc and v > 0) if self.fuse else 0
        return super()._before(values, loc) + fused

    def spec(self, values: dict[int, int]) -> str:
        locs = sorted(b for b, v in values.items() if v > 0)
        if not locs:
            return format_spec(self.method, {"tokens": self.patches, "locations": [self.depth - 1]})
        kept = [self._before(values, b) - values[b] for b in locs]
        return format_spec(self.method, {"locations": locs, "tokens": kept})


class EViTKnob(TopKKnob):
    method = "evit"
    fuse = True


class PPTKnob(Knob):
    method = "ppt"

    def spec(self, values: dict[int, int]) -> str:
        locs = sorted(b for b, v in values.items() if v > 0)
        if not locs:
            return format_spec("ppt", {"r": 0, "locations": [self.depth - 1]})
        return format_spec("ppt", {"locations": locs, "r": [values[b] for b in locs]})

    def limit(self, values: dict[int, int], loc: int) -> int:
        return self._before(values, loc) // 2  # both branches remove at most half of the patch tokens


class EvoViTKnob(Knob):
    """Evo-ViT: ``values[stage start]`` patch tokens sent down the fast path in that stage."""
    method = "evovit"
    resumable = False

    @property
    def cut(self) -> int | None:
        return None

    def positions(self) -> list[int]:
        return default_stages(self.depth)

    def shapes(self) -> list[tuple[str, dict[int, float]]]:
        return [(f"stages {profile}", _profile(self.positions(), profile)) for profile in self.profiles]

    def spec(self, values: dict[int, int]) -> str:
        rates = [_rate_for(self.patches - values.get(s, 0), self.patches) for s in self.positions()]
        return format_spec("evovit", {"keep_rate": rates})

    def limit(self, values: dict[int, int], loc: int) -> int:
        return self.patches - 1


class MixKnob(Knob):
    """PPT at its default blocks (1/4, 1/2, 3/4 of the depth), ToMe at every other block, and at
    the cut Top-K keeping one patch token: one schedule over all blocks, written as a mix spec
    (``ppt:...+tome:r=[...]+topk:...``). A location's method is fixed by its block, so the search
    and refinement move token counts exactly as for a single method."""
    method = "mix"
    parts = ("ppt", "tome", "topk")
    by_default = False  # measured (mix_fidelity.txt): on ViT-Tiny its extra reducing blocks cost more than its KL gains
    steps = (1,)

    def __init__(self, depth: int, patches: int, num_prefix: int) -> None:
        super().__init__(depth, patches, num_prefix)
        self.ppt_blocks = set(default_locations(depth)) - {self.cut}

    def shapes(self) -> list[tuple[str, dict[int, float]]]:
        """From one of the first four blocks on, every block: PPT's blocks weighted 2, 4 or 8
        times ToMe's (flat, or ToMe falling)."""
        out = []
        pos = self.positions()
        for start in pos[:4]:
            locs = [b for b in pos if b >= start]
            tome = [b for b in locs if b not in self.ppt_blocks]
            for ratio in (2, 4, 8):
                for profile in ("flat", "falling"):
                    weights = {b: float(ratio) for b in locs if b in self.ppt_blocks}
                    weights.update(_profile(tome, profile) if tome else {})
                    out.append((f"from {start}, ppt {ratio}x tome {profile}", weights))
        return out

    def spec(self, values: dict[int, int]) -> str:
        parts = []
        ppt = sorted(b for b, v in values.items() if v > 0 and b in self.ppt_blocks)
        if ppt:
            parts.append(format_spec("ppt", {"locations": ppt, "r": [values[b] for b in ppt]}))
        r = [values.get(b, 0) if b not in self.ppt_blocks and b != self.cut else 0 for b in range(self.depth)]
        while r and r[-1] == 0:
            r.pop()
        if r:
            parts.append(format_spec("tome", {"r": r}))
        if self.cut is not None and values.get(self.cut, 0) > 0:
            kept = self._before(values, self.cut) - values[self.cut]
            parts.append(format_spec("topk", {"locations": [self.cut], "tokens": [kept]}))
        if not parts:
            return format_spec("ppt", {"r": 0, "locations": [self.depth - 1]})
        return "+".join(parts)

    def limit(self, values: dict[int, int], loc: int) -> int:
        n = self._before(values, loc)
        return max(0, n - 1) if loc == self.cut else n // 2  # ppt and tome: at most half per block


def _rate_for(kept: int, n: int) -> float:
    """The shortest keep rate (4 decimals) with ``floor(n * rate) == kept`` (Evo-ViT's rounding)."""
    return min(1.0, math.ceil(kept / n * 1e4) / 1e4)


TUNABLE: dict[str, type[Knob]] = {k.method: k for k in (ToMeKnob, MCTFKnob, ToFuKnob, PiToMeKnob, ZeroTPruneKnob,
                                                         DiffRateKnob, TopKKnob, EViTKnob, PPTKnob, EvoViTKnob, MixKnob)}
"""Methods :func:`tune` searches, with their schedules."""
