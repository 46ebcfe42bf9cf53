"""``random`` selector: uniformly random destinations per region, from the runtime's seeded generator.

Drawing from the dedicated generator (never the global one) keeps the sampler's random stream
untouched. Selection is a single random-score top-k per region: no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field

from tokenreduce.interfaces import SelectContext, Selector
from tokenreduce.layout import Regions, destinations_for_fraction
from tokenreduce.params import StrictParams


class RandomSelector(Selector):
    name = "random"

    class Params(StrictParams):
        name: Literal["random"] = "random"
        fraction: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
            None,
            description="Destinations as a fraction of each region's tokens; null: one per kept token.",
        )

    params: Params

    def count(self, regions: Regions, keep: Sequence[int]) -> tuple[int, ...]:
        return destinations_for_fraction(regions.sizes, tuple(keep), self.params.fraction)

    def select(self, features: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        layout = ctx.layout
        device = features.device
        generator = ctx.random_source(device)
        valid = layout.regions.valid
        scores = torch.rand(valid.shape, generator=generator, device=generator.device).to(device)
        # Scores are in [0, 1): padding slots (score -1) come after every valid slot.
        scores = scores.masked_fill(~valid, -1.0)
        return scores.topk(layout.k, dim=1).indices
