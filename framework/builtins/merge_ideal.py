"""``ideal`` merger: the zero-overhead ceiling for benchmarks.

Merging keeps the first ``layout.keep`` tokens (one slice); unmerging appends zeros for the
rest, which therefore get no update (with the adapters' residual formulation they pass through
unchanged). The output is meaningless as an image; the cost is the floor any method can reach.
"""

from __future__ import annotations

from typing import Literal

import torch

from tokenreduce.interfaces import MergePlan, Merger
from tokenreduce.layout import Layout
from tokenreduce.params import StrictParams


class IdealPlan(MergePlan):
    def __init__(self, keep: int, num_tokens: int, device: torch.device) -> None:
        self.keep = keep
        self.rest = num_tokens - keep
        self.positions = torch.arange(keep, device=device)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.keep]

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([y, y.new_zeros(y.shape[0], self.rest, y.shape[2])], dim=1)


class IdealMerger(Merger):
    name = "ideal"
    output = "keep"
    needs_destinations = False
    needs_features = False

    class Params(StrictParams):
        name: Literal["ideal"] = "ideal"

    def plan(
        self,
        x: torch.Tensor,
        features: torch.Tensor | None,
        destinations: torch.Tensor | None,
        layout: Layout,
    ) -> MergePlan:
        return IdealPlan(layout.keep, layout.num_tokens, x.device)
