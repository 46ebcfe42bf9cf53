"""``global`` partitioner: the whole grid is one region, in raster order (no gather needed)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from tokenreduce.interfaces import Partitioner
from tokenreduce.layout import Regions, raster_positions
from tokenreduce.params import StrictParams


def whole_grid(grid: tuple[int, ...]) -> Regions:
    """One region holding every token of ``grid`` in raster order; ``local_rc`` = grid coordinates."""
    n = 1
    for side in grid:
        n *= side
    return Regions(
        grid=tuple(grid),
        index=torch.arange(n).unsqueeze(0),
        valid=torch.ones(1, n, dtype=torch.bool),
        sizes=(n,),
        shape=tuple(grid),
        local_rc=raster_positions(grid).unsqueeze(0),
    )


class GlobalPartitioner(Partitioner):
    name = "global"
    whole_grid: ClassVar[bool] = True

    class Params(StrictParams):
        name: Literal["global"] = "global"

    def min_grid(self) -> tuple[int, ...]:
        return (1,)  # any grid of any rank, a plain token sequence included

    def partition(self, grid: tuple[int, ...]) -> Regions:
        return whole_grid(tuple(grid))
