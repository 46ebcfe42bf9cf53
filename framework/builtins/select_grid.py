"""``grid`` selector: the top-left token of every full ``sy x sx`` cell of each rectangular region.

The destination count is intrinsic (cells per region, whatever the ratio); border rows and
columns that do not fill a cell are never destinations, and a region without a full cell is an
error (reported when the layout is built). Needs regions with ``local_rc`` (rectangular
regions, e.g. ``global``, ``stripe``, ``tile``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field

from tokenreduce.interfaces import SelectContext, Selector
from tokenreduce.layout import Regions
from tokenreduce.params import StrictParams


def cell_corners(regions: Regions, stride: tuple[int, int]) -> torch.Tensor:
    """``(R, S)`` bool: slots at the top-left corner of a full cell (device ops only, no host sync)."""
    if regions.local_rc is None:
        raise ValueError("the grid selector needs rectangular regions (a partitioner that sets local_rc)")
    sy, sx = stride
    rc = regions.local_rc
    valid = regions.valid
    # Extent of each region's valid rectangle (ragged border regions are smaller).
    extent = torch.where(valid.unsqueeze(-1), rc, torch.full_like(rc, -1)).amax(dim=1) + 1  # (R, 2)
    row, col = rc[..., 0], rc[..., 1]
    return (
        valid & (row % sy == 0) & (col % sx == 0) & (row + sy <= extent[:, :1]) & (col + sx <= extent[:, 1:])
    )


class GridSelector(Selector):
    name = "grid"

    class Params(StrictParams):
        name: Literal["grid"] = "grid"
        stride: list[Annotated[int, Field(ge=1)]] = Field(
            default_factory=lambda: [2, 2],
            min_length=2,
            max_length=2,
            description="Cell size [rows, cols]; one destination (the top-left token) per full cell.",
        )

    @property
    def stride(self) -> tuple[int, int]:
        return (self.params.stride[0], self.params.stride[1])

    def count(self, regions: Regions, keep: Sequence[int]) -> tuple[int, ...]:
        counts = tuple(int(n) for n in cell_corners(regions, self.stride).sum(dim=1).tolist())
        for cells, size in zip(counts, regions.sizes, strict=True):
            if size and not cells:
                # Its tokens would have no destination to merge into (or be represented by).
                sy, sx = self.stride
                raise ValueError(
                    f"a region of {size} tokens on the {regions.grid[0]}x{regions.grid[1]} grid has no full "
                    f"{sy}x{sx} cell, so no destination; use a smaller stride or larger regions"
                )
        return counts

    def select(self, features: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        layout = ctx.layout
        corners = cell_corners(layout.regions, self.stride)
        slots = corners.shape[1]
        # Corners score S - s (earlier slots first), other slots 0: top-k lists corners in slot order.
        order = torch.arange(slots, 0, -1, device=corners.device, dtype=torch.float32)
        return (corners * order).topk(layout.k, dim=1).indices
