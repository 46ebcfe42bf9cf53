"""``stripe`` partitioner: contiguous runs of whole rows, one region per run.

On grids of rank 3 and more (frames x rows x cols) stripes stay inside one frame: each frame is
cut into its own stripes. The last stripe of a frame is shorter when the row count is not a
multiple of ``rows``; its missing slots are padding (pointing at token 0, invalid), so every
region has the same static shape.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tokenreduce.interfaces import Partitioner
from tokenreduce.layout import Regions, box_regions
from tokenreduce.params import StrictParams


def stripe_regions(grid: tuple[int, ...], rows: int) -> Regions:
    """Regions of ``rows`` whole grid rows each (fewer in the last one of a frame), in raster order."""
    # A stripe is a box one position deep on the leading axes, `rows` rows high and a whole row wide.
    box = (1,) * (len(grid) - 2) + (min(rows, grid[-2]), grid[-1])
    return box_regions(tuple(grid), box)


class StripePartitioner(Partitioner):
    name = "stripe"

    class Params(StrictParams):
        name: Literal["stripe"] = "stripe"
        rows: int = Field(8, ge=1, description="Grid rows per stripe (the last stripe may have fewer).")

    params: Params

    def partition(self, grid: tuple[int, ...]) -> Regions:
        return stripe_regions(tuple(grid), self.params.rows)
