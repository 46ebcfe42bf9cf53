"""``stripe`` partitioner: contiguous runs of whole rows, one region per run.

The last stripe is shorter when the row count is not a multiple of ``rows``; its missing slots
are padding (pointing at token 0, invalid), so every region has the same static shape.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tokenreduce.interfaces import Partitioner
from tokenreduce.layout import Regions
from tokenreduce.params import StrictParams


def stripe_regions(height: int, width: int, rows: int) -> Regions:
    """Regions of ``rows`` whole grid rows each (fewer in the last one), in raster order."""
    rows = min(rows, height)
    count = -(-height // rows)
    slots = rows * width
    # Stripes are contiguous in raster order: slot s of stripe r is token r * slots + s.
    flat = torch.arange(count).unsqueeze(1) * slots + torch.arange(slots).unsqueeze(0)
    valid = flat < height * width
    index = torch.where(valid, flat, torch.zeros_like(flat))
    local = torch.arange(slots)
    local_rc = torch.stack([local // width, local % width], dim=-1).expand(count, -1, -1).contiguous()
    return Regions(
        grid=(height, width),
        index=index,
        valid=valid,
        sizes=tuple(int(n) for n in valid.sum(dim=1).tolist()),
        shape=(rows, width),
        local_rc=local_rc,
    )


class StripePartitioner(Partitioner):
    name = "stripe"

    class Params(StrictParams):
        name: Literal["stripe"] = "stripe"
        rows: int = Field(8, ge=1, description="Grid rows per stripe (the last stripe may have fewer).")

    def partition(self, height: int, width: int) -> Regions:
        return stripe_regions(height, width, self.params.rows)
