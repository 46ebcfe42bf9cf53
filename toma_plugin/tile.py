"""Tile partitioner: non-overlapping boxes of the token grid, in raster order, for grids of any rank.

Each tile is one region (one batch row for selection and merging). ``size`` gives the tile's
extent on the grid's trailing axes: ``[rows, cols]`` tiles a video grid (frames x rows x cols)
frame by frame (one frame deep), ``[frames, rows, cols]`` spans several frames. Grids that are
not a multiple of the tile keep smaller border tiles; they are padded to the full tile's slot
count and the padding is marked invalid, so every region has the same static shape.
"""

from __future__ import annotations

from typing import Literal, cast

from pydantic import Field, field_validator

from tokenreduce.interfaces import Partitioner
from tokenreduce.layout import Regions, box_regions, grid_fits, grid_text
from tokenreduce.params import StrictParams


class TilePartitioner(Partitioner):
    name = "tile"

    class Params(StrictParams):
        name: Literal["tile"] = "tile"
        size: int | list[int] = Field(
            default_factory=lambda: [8, 8],
            description=(
                "Tile extent in tokens on the grid's trailing axes: one side for square tiles, [rows, cols] "
                "(on video grids: within one frame), or [frames, rows, cols]."
            ),
        )

        @field_validator("size")
        @classmethod
        def _normalise_size(cls, value: int | list[int]) -> list[int]:
            sides = [value, value] if isinstance(value, int) else value
            if len(sides) not in (2, 3):
                raise ValueError(
                    f"tile size must be an int, [rows, cols] or [frames, rows, cols], got {value!r}"
                )
            if min(sides) < 1:
                raise ValueError(f"tile sides must be positive, got {value!r}")
            return list(sides)

    params: Params

    def __init__(self, params: StrictParams | None = None) -> None:
        super().__init__(params)
        self.tile: tuple[int, ...] = tuple(cast("list[int]", self.params.size))  # normalised by the validator
        self._cache: dict[tuple[int, ...], Regions] = {}

    def min_grid(self) -> tuple[int, ...]:
        return self.tile

    def partition(self, grid: tuple[int, ...]) -> Regions:
        key = tuple(grid)
        regions = self._cache.get(key)
        if regions is None:
            regions = self._cache[key] = self._build(key)
        return regions

    def _build(self, grid: tuple[int, ...]) -> Regions:
        if not grid_fits(grid, self.tile):
            raise ValueError(f"token grid {grid_text(grid)} is smaller than one {grid_text(self.tile)} tile")
        # Leading axes the tile does not name are one position deep (e.g. one frame).
        box = (1,) * (len(grid) - len(self.tile)) + self.tile
        return box_regions(grid, box)
