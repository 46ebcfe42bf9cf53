"""ToDo (token downsampling): keys and values from a spatially pooled copy of the tokens.

A ``kv_only`` merger: queries keep the full length, so the attention output needs no unmerge.
The ``H x W`` token grid is pooled with an ``f x f`` window and stride ``f`` (``ceil_mode``, so
grids that are not multiples of ``f`` keep a partial border window): ``(B, H*W, C)`` ->
``(B, ceil(H/f) * ceil(W/f), C)``. ``nearest`` takes each window's top-left token, ``avg`` the
mean of the window's tokens, ``max`` their element-wise maximum.

The reduction is set by ``factor``, not by the runtime's ``ratio``: the config's ratio must
equal ``1 - 1/factor**2`` (the fraction of K/V tokens removed on a grid divisible by ``factor``),
so that reports and sweeps that read the ratio stay truthful.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from tokenreduce.interfaces import MergePlan, Merger
from tokenreduce.layout import Layout
from tokenreduce.manager import get_registry
from tokenreduce.params import StrictParams

if TYPE_CHECKING:
    from tokenreduce.config import ConfigBase

RATIO_TOLERANCE = 1e-6


def downsample_tokens(x: torch.Tensor, grid: tuple[int, int], factor: int, mode: str) -> torch.Tensor:
    """``(B, H*W, C)`` raster tokens -> ``(B, ceil(H/f) * ceil(W/f), C)`` pooled tokens (model dtype)."""
    b, _, c = x.shape
    h, w = grid
    if mode == "nearest":
        return x.reshape(b, h, w, c)[:, ::factor, ::factor].reshape(b, -1, c)
    image = x.reshape(b, h, w, c).permute(0, 3, 1, 2)
    pool = F.avg_pool2d if mode == "avg" else F.max_pool2d
    pooled = pool(image, kernel_size=factor, stride=factor, ceil_mode=True)
    return pooled.flatten(2).transpose(1, 2)


def pooled_length(grid: tuple[int, int], factor: int) -> int:
    return math.ceil(grid[0] / factor) * math.ceil(grid[1] / factor)


class DownsamplePlan(MergePlan):
    """``merge`` gives the shortened key/value source tokens; there is nothing to unmerge."""

    def __init__(self, grid: tuple[int, int], factor: int, mode: str) -> None:
        self.grid, self.factor, self.mode = grid, factor, mode
        self.positions = None  # pooled tokens stand for windows, not for one raster position

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return downsample_tokens(x, self.grid, self.factor, self.mode)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "merger 'downsample' (ToDo) shortens only keys and values: the attention output already has the "
            "query length, so there is nothing to unmerge; adapters pass plan.merge(x) as the K/V source"
        )


class DownsampleMerger(Merger):
    """ToDo: K/V from a pooled token grid (``kv_only``; self-attention only)."""

    name = "downsample"
    grid_ranks = (2,)  # pools a rows x cols image grid
    output = "keep"
    kv_only = True
    needs_destinations = False
    needs_features = False

    class Params(StrictParams):
        name: Literal["downsample"] = "downsample"
        factor: int = Field(
            2, ge=1, description="Pooling window and stride f: K/V come from a grid f times smaller per side."
        )
        mode: Literal["nearest", "avg", "max"] = Field(
            "nearest",
            description="Pooling of each f x f window: its top-left token, the mean or the maximum.",
        )

    params: Params

    @property
    def linear(self) -> bool:
        """Nearest and average pooling are linear maps of the tokens; max pooling is not."""
        return self.params.mode != "max"

    @property
    def convex(self) -> bool:
        return self.params.mode != "max"

    def check(self, config: ConfigBase) -> None:
        factor = self.params.factor
        expected = 1.0 - 1.0 / factor**2
        problems = []
        if abs(config.ratio - expected) > RATIO_TOLERANCE:
            problems.append(
                f"ratio {config.ratio} does not match factor {factor}: ToDo removes 1 - 1/factor^2 = {expected:g} "
                f"of the keys/values; set ratio: {expected:g} (or change the factor)"
            )
        partitioner = config.partitioner.name
        if not get_registry().get("partitioner", partitioner).whole_grid:
            problems.append(
                f"it pools the whole token grid, so it needs a partitioner that keeps the grid whole "
                f"(one that declares whole_grid, e.g. 'global'), not {partitioner!r}"
            )
        adapter = get_registry().adapter_of(config)
        if adapter is not None and not adapter.kv_only_sites:
            problems.append(
                f"ToDo is not supported by adapter {adapter.name!r}: it has no site where keys/values alone can "
                "be shortened (joint attention merges the image tokens themselves, queries included)"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def plan(
        self,
        x: torch.Tensor,
        features: torch.Tensor | None,
        destinations: torch.Tensor | None,
        layout: Layout,
    ) -> MergePlan:
        rows, cols = layout.regions.grid  # grid_ranks: validation refused other ranks
        return DownsamplePlan((rows, cols), self.params.factor, self.params.mode)
