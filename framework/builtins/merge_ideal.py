"""``ideal`` merger: the zero-overhead ceiling for benchmarks.

Merging keeps the first ``layout.keep`` tokens (one slice, a view); unmerging appends zeros for
the rest (one pad), which therefore get no update (with the adapters' residual formulation they
pass through unchanged). The output is meaningless as an image; the cost is the floor any method
can reach at the same placement: plans are shared like the method's (the benchmark gives the
ideal the method's sharing), building one launches no kernel (the positions are made once per
size and device), and adapters that see ``prefix`` slice their positional tables instead of
gathering them.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from tokenreduce.interfaces import MergePlan, Merger
from tokenreduce.layout import Layout
from tokenreduce.params import StrictParams


class IdealPlan(MergePlan):
    convex = True

    def __init__(self, keep: int, num_tokens: int, positions: torch.Tensor) -> None:
        self.keep = self.prefix = keep
        self.rest = num_tokens - keep
        self.positions = positions

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : self.keep]

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return F.pad(y, (0, 0, 0, self.rest))

    def residual_update(self, x: torch.Tensor, merged: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        # x + pad(out - x[:keep]) is [out; x[keep:]] up to rounding: one concatenation.
        return torch.cat((out, x[:, self.keep :]), dim=1)


class IdealMerger(Merger):
    name = "ideal"
    output = "keep"
    needs_destinations = False
    needs_features = False
    any_token_order = True  # positions count in whatever order the tokens come

    class Params(StrictParams):
        name: Literal["ideal"] = "ideal"

    def __init__(self, params: StrictParams | None = None) -> None:
        super().__init__(params)
        self._positions: dict[tuple[int, str], torch.Tensor] = {}

    def plan(
        self,
        x: torch.Tensor,
        features: torch.Tensor | None,
        destinations: torch.Tensor | None,
        layout: Layout,
    ) -> MergePlan:
        key = (layout.keep, str(x.device))
        positions = self._positions.get(key)
        if positions is None:
            positions = self._positions[key] = torch.arange(layout.keep, device=x.device)
        return IdealPlan(layout.keep, layout.num_tokens, positions)
