"""Mix: several block-reducing methods in one model, each at its own blocks.

``ppt:locations=[3,6],r=50+tome:r=[0,0,0,0,0,0,0,12,12,12]+topk:locations=[11],tokens=[1]``
pools or prunes with PPT at blocks 3 and 6, merges with ToMe at 7 to 9 and keeps only the
class token after the last block's attention. Each part is its own method's policy, unchanged;
the mix only places them. ``tokensparse tune`` searches such schedules (method ``mix``).
"""
from __future__ import annotations

from typing import Any, ClassVar

from ..errors import TokenSparseError
from ..spec import MIX, parse_spec
from .base import BlockReducerMethod, Method, TokenReducer
from .options import OptionInfo


def _part(spec: Any, registry: dict[str, type[Method]]) -> BlockReducerMethod:
    if not isinstance(spec, str):
        raise TokenSparseError(f"a mix part must be a method spec string, got {spec!r}")
    name, options = parse_spec(spec)
    if name not in registry:
        raise TokenSparseError(f"unknown method {name!r} in a mix; valid methods: {', '.join(registry)}")
    cls = registry[name]
    if name == MIX or not issubclass(cls, BlockReducerMethod):
        allowed = [n for n, c in registry.items() if n != MIX and issubclass(c, BlockReducerMethod)]
        raise TokenSparseError(f"method {name!r} cannot be a part of a mix; parts reduce inside blocks: "
                               f"{', '.join(allowed)}")
    return cls(**options)


class Mix(BlockReducerMethod):
    name = MIX
    summary = "Mix: block-reducing methods joined by '+', each at its own blocks (e.g. ppt early, tome later)"
    options = (
        OptionInfo("parts", [], "the methods' specs (written joined by '+': ppt:locations=[3]+tome:r=[0,0,0,0,8])"),
    )

    registry: ClassVar[dict[str, type[Method]]] = {}
    """Every method by name, parts' candidates (set by ``tokensparse.methods``, whose registry lists Mix too)."""

    def validate(self) -> None:
        parts = self.config["parts"]
        if not isinstance(parts, (list, tuple)):
            raise TokenSparseError(f"parts must be a list of method specs, got {parts!r}")
        self.parts = [_part(p, self.registry) for p in parts]
        merging = {p.config["prop_attn"] for p in self.parts if "prop_attn" in p.config}
        if len(merging) > 1:
            raise TokenSparseError(f"the parts of a mix must agree on prop_attn (one attention for the whole "
                                   f"model), got both true and false in {list(parts)}")
        self.prop_attn = merging.pop() if merging else False
        self.needs_class_token = any(p.needs_class_token for p in self.parts)

    def supports(self, model: Any) -> bool:
        """Whether every part supports ``model`` (a mix without parts runs nothing: False)."""
        return bool(self.parts) and all(p.supports(model) for p in self.parts)

    def build_reducers(self, depth: int) -> dict[int, TokenReducer]:
        return self._join([part.build_reducers(depth) for part in self.parts])

    def reducers_for(self, family: Any) -> dict[int, TokenReducer]:
        return self._join([part.reducers_for(family) for part in self.parts])

    def _join(self, built: list[dict[int, TokenReducer]]) -> dict[int, TokenReducer]:
        """The parts' reducers in one ``{block: reducer}``, each block given to one part."""
        if not self.parts:
            raise TokenSparseError("a mix needs method specs joined by '+', e.g. ppt:locations=[3]+tome:r=[0,0,0,0,8]")
        reducers: dict[int, TokenReducer] = {}
        owner: dict[int, str] = {}
        for part_reducers, spec in zip(built, self.config["parts"]):
            for block, reducer in part_reducers.items():
                if reducer.idle:
                    continue
                if block in reducers:
                    raise TokenSparseError(f"block {block} is reduced by two parts of the mix ({owner[block]} and "
                                           f"{spec}): give each block to one part")
                reducers[block], owner[block] = reducer, spec
        return reducers
