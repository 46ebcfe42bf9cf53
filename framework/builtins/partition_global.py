"""``global`` partitioner: the whole grid is one region, in raster order (no gather needed)."""

from __future__ import annotations

from typing import Literal

from tokenreduce.builtins.partition_stripe import stripe_regions
from tokenreduce.interfaces import Partitioner
from tokenreduce.layout import Regions
from tokenreduce.params import StrictParams


class GlobalPartitioner(Partitioner):
    name = "global"

    class Params(StrictParams):
        name: Literal["global"] = "global"

    def partition(self, height: int, width: int) -> Regions:
        # One stripe as tall as the grid: shape (h, w), local_rc = raster row/col.
        return stripe_regions(height, width, height)
