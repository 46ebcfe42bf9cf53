"""ToMeSD's bipartite merger: the most similar sources are averaged into their destination.

The merged sequence holds ``layout.keep`` tokens per layer (destinations plus unmatched sources,
in raster order inside each region); unmerging gives every merged source a copy of its
destination's output.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from tokenreduce.baselines.tomesd.matching import (
    Matching,
    StaticPlanCache,
    bipartite_match,
    gather_tokens,
    group_mean,
)
from tokenreduce.interfaces import MergePlan, Merger
from tokenreduce.layout import Layout
from tokenreduce.manager import get_registry
from tokenreduce.params import StrictParams

if TYPE_CHECKING:
    from tokenreduce.config import ConfigBase

MatchingMode = Literal["per_sample", "shared"]

MATCHING_FIELD: MatchingMode = Field(
    "per_sample",
    description="'per_sample': every sample is matched on its own scores, as ToMeSD; 'shared': scores are "
    "summed over the batch so every sample keeps the same tokens (batch-shared positions, needed for Flux RoPE).",
)


def check_matching_for_adapter(merger: Merger, mode: MatchingMode, config: ConfigBase) -> None:
    """Per-sample kept sets have no batch-shared positions: reject adapters that declare they need them."""
    adapter = get_registry().adapter_of(config)
    if mode == "per_sample" and adapter is not None and adapter.shared_positions:
        raise ValueError(
            f"with matching 'per_sample' every sample keeps its own tokens, but adapter {adapter.name!r} gives "
            f"merged tokens one batch-shared RoPE table; set merger {{name: {merger.name}, matching: shared}}"
        )


class MatchedPlan(MergePlan):
    """Shared by the hard-assignment mergers: unmerge copies each group's output back to its members."""

    def __init__(self, matching: Matching, layout: Layout) -> None:
        self.matching = matching
        self.layout = layout
        #: (B', N') raster indices of every sample's kept tokens (B' = 1 when the matching is shared)
        self.sample_positions = matching.positions
        # Batch-shared positions exist only when every sample keeps the same tokens (shared matching,
        # or a batch of one); per-sample matchings of larger batches have none.
        self.positions = matching.positions[0] if matching.shared else None

    def kept(self, slots: torch.Tensor) -> torch.Tensor:
        """``(B, R, S, C)`` slot values -> ``(B, N', C)`` kept tokens in merged order."""
        return gather_tokens(slots.flatten(1, 2), self.matching.kept)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.kept(group_mean(self.layout.to_regions(x), self.matching.target))

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return gather_tokens(y, self.matching.source)


class BipartiteMerger(Merger):
    """Bipartite soft matching with mean merging (ToMeSD)."""

    name = "bipartite"
    output = "keep"

    class Params(StrictParams):
        name: Literal["bipartite"] = "bipartite"
        matching: MatchingMode = MATCHING_FIELD

    params: Params

    def __init__(self, params: StrictParams | None = None) -> None:
        super().__init__(params)
        self._static = StaticPlanCache()

    def check(self, config: ConfigBase) -> None:
        check_matching_for_adapter(self, self.params.matching, config)

    def plan(
        self, x: torch.Tensor, features: torch.Tensor, destinations: torch.Tensor, layout: Layout
    ) -> MergePlan:
        static = self._static.get(layout, x.device)
        matching = bipartite_match(features, destinations, layout, static, self.params.matching == "shared")
        return MatchedPlan(matching, layout)
