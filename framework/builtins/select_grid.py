"""``grid`` selector: the top-left token of every full ``sy x sx`` cell of each rectangular region.

The destination count is intrinsic (cells per region, whatever the ratio); border rows and
columns that do not fill a cell are never destinations, and a region without a full cell is an
error (reported when the layout is built). Needs regions with ``local_rc`` (box regions, e.g.
``global``, ``stripe``, ``tile``). On grids of rank 3 (frames x rows x cols) the stride applies to
rows and columns and cells are one frame deep (a stride of three values also strides frames).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field

from tokenreduce.interfaces import SelectContext, Selector
from tokenreduce.layout import Regions, grid_text
from tokenreduce.params import StrictParams


def full_stride(stride: tuple[int, ...], rank: int) -> tuple[int, ...]:
    """``stride`` on a grid's trailing axes, one position on the leading ones."""
    if len(stride) > rank:
        raise ValueError(f"the grid selector's stride {list(stride)} has more axes than the rank-{rank} grid")
    return (1,) * (rank - len(stride)) + tuple(stride)


def cell_corners(regions: Regions, stride: tuple[int, ...]) -> torch.Tensor:
    """``(R, S)`` bool: slots at the first corner of a full cell (device ops only, no host sync)."""
    if regions.local_rc is None:
        raise ValueError("the grid selector needs rectangular regions (a partitioner that sets local_rc)")
    rc = regions.local_rc
    valid = regions.valid
    # Extent of each region's valid box (ragged border regions are smaller).
    extent = torch.where(valid.unsqueeze(-1), rc, torch.full_like(rc, -1)).amax(dim=1) + 1  # (R, rank)
    corner = valid
    # Axis by axis with Python strides: a stride tensor would be copied from the host at every
    # selection (a sync, and not capturable in a CUDA graph).
    for axis, step in enumerate(full_stride(stride, rc.shape[-1])):
        position = rc[..., axis]
        corner = corner & (position % step == 0) & (position + step <= extent[:, axis : axis + 1])
    return corner


class GridSelector(Selector):
    name = "grid"

    class Params(StrictParams):
        name: Literal["grid"] = "grid"
        stride: list[Annotated[int, Field(ge=1)]] = Field(
            default_factory=lambda: [2, 2],
            min_length=2,
            max_length=3,
            description=(
                "Cell size [rows, cols] (or [frames, rows, cols]); one destination (the first token) per full cell."
            ),
        )

    params: Params

    @property
    def stride(self) -> tuple[int, ...]:
        return tuple(self.params.stride)

    def count(self, regions: Regions, keep: Sequence[int]) -> tuple[int, ...]:
        counts = tuple(int(n) for n in cell_corners(regions, self.stride).sum(dim=1).tolist())
        for cells, size in zip(counts, regions.sizes, strict=True):
            if size and not cells:
                # Its tokens would have no destination to merge into (or be represented by).
                raise ValueError(
                    f"a region of {size} tokens on the {grid_text(regions.grid)} grid has no full "
                    f"{grid_text(self.stride)} cell, so no destination; use a smaller stride or larger regions"
                )
        return counts

    def select(self, features: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        layout = ctx.layout
        corners = cell_corners(layout.regions, self.stride)
        slots = corners.shape[1]
        # Corners score S - s (earlier slots first), other slots 0: top-k lists corners in slot order.
        order = torch.arange(slots, 0, -1, device=corners.device, dtype=torch.float32)
        return (corners * order).topk(layout.k, dim=1).indices
