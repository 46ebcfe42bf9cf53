"""ToFu (token fusion): bipartite matching as ToMeSD, then prune or fuse per block.

* ``prune``: matched sources are dropped; every kept token keeps its own value; unmerging copies
  the destination's output to its dropped sources.
* ``mlerp``: each group ``{destination} + matched sources`` becomes one token in the direction of
  the group's mean, with the largest norm found in the group (MLERP, generalised from the paper's
  pairs to groups), so merging does not shrink feature norms as plain averaging does.

``policy: auto`` prunes in the blocks before ``switch_at`` (as a fraction of the merged blocks)
and fuses after it, through :meth:`Merger.for_site`. There is no official code: see
``docs/baselines.md`` for which choices are ours.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from tokenreduce.baselines.tomesd.bipartite import (
    MATCHING_FIELD,
    MatchedPlan,
    MatchingMode,
    check_matching_for_adapter,
)
from tokenreduce.baselines.tomesd.matching import StaticPlanCache, bipartite_match, group_mean
from tokenreduce.interfaces import MergePlan, Merger
from tokenreduce.layout import Layout
from tokenreduce.params import StrictParams

if TYPE_CHECKING:
    from tokenreduce.config import ConfigBase


def mlerp(xr: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Groups fused by MLERP: ``mean(g) / |mean(g)| * max_{t in g} |t|``, on ``(B, R, S, C)`` slots.

    Norms are taken in at least float32; a group of one is returned unchanged (its scale is exactly 1).
    """
    b, r, s, _ = xr.shape
    norm_dtype = torch.promote_types(xr.dtype, torch.float32)
    mean = group_mean(xr, target)
    norms = torch.linalg.vector_norm(xr, dim=-1, dtype=norm_dtype)  # (B, R, S)
    largest = norms.scatter_reduce(2, target.expand(b, r, s), norms, reduce="amax", include_self=False)
    mean_norm = torch.linalg.vector_norm(mean, dim=-1, dtype=norm_dtype)
    scale = largest / mean_norm.clamp_min(torch.finfo(norm_dtype).tiny)
    return mean * scale.unsqueeze(-1).to(mean.dtype)


class PrunePlan(MatchedPlan):
    """Matched sources are dropped; destinations and unmatched sources pass unchanged."""

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.kept(self.layout.to_regions(x))


class MlerpPlan(MatchedPlan):
    """Each group becomes its MLERP fusion."""

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.kept(mlerp(self.layout.to_regions(x), self.matching.target))


class TofuMerger(Merger):
    """ToFu: prune early, fuse with MLERP late (or one of the two everywhere)."""

    name = "tofu"
    output = "keep"

    class Params(StrictParams):
        name: Literal["tofu"] = "tofu"
        policy: Literal["auto", "prune", "mlerp"] = Field(
            "auto",
            description="'prune' or 'mlerp' in every merged block; 'auto': prune in the blocks placed before "
            "switch_at, MLERP from there on.",
        )
        switch_at: float = Field(
            0.5,
            ge=0.0,
            le=1.0,
            description="With policy 'auto': position in [0, 1] through the merged blocks where MLERP takes over.",
        )
        matching: MatchingMode = MATCHING_FIELD

    params: Params

    def __init__(self, params: StrictParams | None = None) -> None:
        super().__init__(params)
        self._static = StaticPlanCache()
        self._bound: dict[str, TofuMerger] = {}

    @property
    def mode(self) -> Literal["prune", "mlerp"]:
        """What :meth:`plan` does: an unbound ``auto`` merger acts as at position 0 (prune)."""
        return "prune" if self.params.policy == "auto" else self.params.policy

    @property
    def linear(self) -> bool:
        """Pruning is a selection (linear); MLERP rescales by a ratio of norms (not linear)."""
        return self.mode == "prune"

    @property
    def convex(self) -> bool:
        """MLERP's merged tokens can be longer than any convex combination of their group."""
        return self.mode == "prune"

    def check(self, config: ConfigBase) -> None:
        check_matching_for_adapter(self, self.params.matching, config)

    def for_site(self, position: float) -> Merger:
        if self.params.policy != "auto":
            return self
        mode = "prune" if position < self.params.switch_at else "mlerp"
        bound = self._bound.get(mode)
        if bound is None:
            bound = self._bound[mode] = TofuMerger(self.params.model_copy(update={"policy": mode}))
        return bound

    def plan(
        self, x: torch.Tensor, features: torch.Tensor, destinations: torch.Tensor, layout: Layout
    ) -> MergePlan:
        static = self._static.get(layout, x.device)
        matching = bipartite_match(features, destinations, layout, static, self.params.matching == "shared")
        plan_cls = PrunePlan if self.mode == "prune" else MlerpPlan
        return plan_cls(matching, layout)
