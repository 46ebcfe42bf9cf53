"""Tile partitioner: non-overlapping rectangular tiles of the token grid, in raster order.

Each tile is one region (one batch row for selection and merging). Grids that are not a
multiple of the tile keep smaller border tiles; they are padded to the full ``th * tw`` slots
and the padding is marked invalid, so every region has the same static shape.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator

from tokenreduce.interfaces import Partitioner
from tokenreduce.layout import Regions
from tokenreduce.params import StrictParams


class TilePartitioner(Partitioner):
    name = "tile"

    class Params(StrictParams):
        name: Literal["tile"] = "tile"
        size: int | list[int] = Field(
            default_factory=lambda: [8, 8],
            description="Tile extent in tokens: one side for square tiles, or [rows, cols].",
        )

        @field_validator("size")
        @classmethod
        def _normalise_size(cls, value: int | list[int]) -> list[int]:
            sides = [value, value] if isinstance(value, int) else value
            if len(sides) != 2:
                raise ValueError(f"tile size must be an int or [rows, cols], got {value!r}")
            if min(sides) < 1:
                raise ValueError(f"tile sides must be positive, got {value!r}")
            return list(sides)

    def __init__(self, params: StrictParams | None = None) -> None:
        super().__init__(params)
        rows, cols = self.params.size  # normalised to [rows, cols] by the validator
        self.tile: tuple[int, int] = (rows, cols)
        self._cache: dict[tuple[int, int], Regions] = {}

    def min_grid(self) -> tuple[int, int]:
        return self.tile

    def partition(self, height: int, width: int) -> Regions:
        key = (height, width)
        regions = self._cache.get(key)
        if regions is None:
            regions = self._cache[key] = self._build(height, width)
        return regions

    def _build(self, height: int, width: int) -> Regions:
        th, tw = self.tile
        if height < th or width < tw:
            raise ValueError(f"token grid {height}x{width} is smaller than one {th}x{tw} tile")
        tiles_h = -(-height // th)
        tiles_w = -(-width // tw)
        # Slot s of a tile is (s // tw, s % tw) inside the rectangle; tiles are numbered in raster order.
        local_r = torch.arange(th).repeat_interleave(tw)  # (S,)
        local_c = torch.arange(tw).repeat(th)  # (S,)
        tile_r = torch.arange(tiles_h).repeat_interleave(tiles_w)  # (R,)
        tile_c = torch.arange(tiles_w).repeat(tiles_h)  # (R,)
        rows = tile_r[:, None] * th + local_r[None, :]  # (R, S)
        cols = tile_c[:, None] * tw + local_c[None, :]
        valid = (rows < height) & (cols < width)
        index = torch.where(valid, rows * width + cols, torch.zeros_like(rows))
        local_rc = torch.stack([local_r, local_c], dim=-1).expand(index.shape[0], -1, -1).contiguous()
        return Regions(
            grid=(height, width),
            index=index,
            valid=valid,
            sizes=tuple(int(n) for n in valid.sum(dim=1).tolist()),
            shape=(th, tw),
            local_rc=local_rc,
        )
