"""Tile partitioner: exact cover of any grid, raster-ordered tiles, padded ragged borders."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from tokenreduce.testing.contracts import check_regions
from tokenreduce.toma_plugin.tile import TilePartitioner


def tiler(size: int | list[int]) -> TilePartitioner:
    return TilePartitioner(TilePartitioner.Params(size=size))


@st.composite
def grids_and_tiles(draw: st.DrawFn) -> tuple[int, int, int, int]:
    th = draw(st.integers(1, 6))
    tw = draw(st.integers(1, 6))
    h = draw(st.integers(th, 23))
    w = draw(st.integers(tw, 23))
    return h, w, th, tw


@given(grids_and_tiles())
@example((8, 8, 4, 4))  # divisible, square
@example((10, 7, 4, 4))  # ragged in both directions
@example((3, 5, 3, 5))  # one tile is the whole grid
@example((5, 1, 2, 1))  # one column
def test_tiles_cover_grid_exactly_once(case: tuple[int, int, int, int]) -> None:
    h, w, th, tw = case
    regions = tiler([th, tw]).partition((h, w))
    regions.check_cover()
    tiles_h, tiles_w = -(-h // th), -(-w // tw)
    assert regions.grid == (h, w)
    assert regions.index.shape == regions.valid.shape == (tiles_h * tiles_w, th * tw)
    assert regions.index.dtype == torch.long and regions.valid.dtype == torch.bool
    assert regions.sizes == tuple(regions.valid.sum(1).tolist())
    assert sum(regions.sizes) == h * w
    assert regions.shape == (th, tw)
    assert bool((regions.index[~regions.valid] == 0).all())  # padding points at token 0
    assert regions.ragged == (h % th != 0 or w % tw != 0)


@given(grids_and_tiles())
def test_tiles_are_raster_ordered_rectangles(case: tuple[int, int, int, int]) -> None:
    h, w, th, tw = case
    regions = tiler([th, tw]).partition((h, w))
    tiles_w = -(-w // tw)
    rows, cols = regions.index // w, regions.index % w
    for r in range(regions.num_regions):
        tile_row, tile_col = divmod(r, tiles_w)
        for s in range(regions.slots):
            lr, lc = (int(v) for v in regions.local_rc[r, s])
            assert (lr, lc) == divmod(s, tw)
            in_grid = tile_row * th + lr < h and tile_col * tw + lc < w
            assert bool(regions.valid[r, s]) == in_grid
            if in_grid:
                assert (int(rows[r, s]), int(cols[r, s])) == (tile_row * th + lr, tile_col * tw + lc)


def test_int_size_means_square_tiles() -> None:
    assert TilePartitioner.Params(size=4).size == [4, 4]
    square = tiler(4)
    assert square.tile == (4, 4)
    assert square.min_grid() == (4, 4)
    assert torch.equal(square.partition((12, 9)).index, tiler([4, 4]).partition((12, 9)).index)


def test_default_is_8x8() -> None:
    assert TilePartitioner().tile == (8, 8)


def test_non_square_tiles() -> None:
    regions = tiler([2, 3]).partition((4, 6))
    assert regions.index.tolist() == [
        [0, 1, 2, 6, 7, 8],
        [3, 4, 5, 9, 10, 11],
        [12, 13, 14, 18, 19, 20],
        [15, 16, 17, 21, 22, 23],
    ]
    assert not regions.ragged


def test_ragged_border_is_padded() -> None:
    regions = tiler(2).partition((3, 3))
    # tiles: rows {0,1} x cols {0,1}; rows {0,1} x col {2}; row {2} x cols {0,1}; row {2} x col {2}
    assert regions.sizes == (4, 2, 2, 1)
    assert regions.valid.tolist() == [
        [True, True, True, True],
        [True, False, True, False],
        [True, True, False, False],
        [True, False, False, False],
    ]
    assert regions.index[regions.valid].tolist() == [0, 1, 3, 4, 2, 5, 6, 7, 8]


@pytest.mark.parametrize("grid", [(3, 8), (8, 3), (1, 1)])
def test_grid_smaller_than_a_tile_raises(grid: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="smaller than one 4x4 tile"):
        tiler(4).partition(grid)


@pytest.mark.parametrize("size", [0, -2, [0, 4], [4], [4, 4, 4, 4], [], [4, -1], [1, 0, 4], "4", 4.0, True])
def test_invalid_sizes_are_rejected(size: object) -> None:
    with pytest.raises(ValidationError):
        TilePartitioner.Params(size=size)


def test_partitions_are_cached_per_grid() -> None:
    part = tiler(4)
    assert part.partition((8, 12)) is part.partition((8, 12))
    assert part.partition((8, 12)) is not part.partition((12, 8))


@st.composite
def video_grids_and_tiles(draw: st.DrawFn) -> tuple[tuple[int, int, int], list[int]]:
    """A (frames, rows, cols) grid and a tile of 2 sides (one frame deep) or 3 sides."""
    tile = draw(st.lists(st.integers(1, 4), min_size=2, max_size=3))
    box = [1] * (3 - len(tile)) + tile
    grid = tuple(draw(st.integers(side, side + 6)) for side in box)
    return grid, tile  # type: ignore[return-value]


@given(video_grids_and_tiles())
@example(((3, 7, 9), [4, 4]))  # 3 frames, ragged rows and cols, tiles within one frame
@example(((5, 6, 6), [2, 3, 3]))  # ragged in time only
def test_video_tiles_cover_the_grid_exactly_once(case: tuple[tuple[int, int, int], list[int]]) -> None:
    grid, tile = case
    regions = tiler(tile).partition(grid)
    regions.check_cover()
    check_regions(regions, grid)
    box = (1,) * (3 - len(tile)) + tuple(tile)
    assert regions.shape == box and regions.local_rc.shape[-1] == 3
    counts = [-(-g // b) for g, b in zip(grid, box, strict=True)]
    assert regions.num_regions == counts[0] * counts[1] * counts[2]
    assert regions.ragged == any(g % b for g, b in zip(grid, box, strict=True))
    # Every token of a region lies in one box of the tile's extent.
    t, h, w = grid
    coords = torch.stack([regions.index // (h * w), regions.index // w % h, regions.index % w], dim=-1)
    for r in range(regions.num_regions):
        inside = coords[r, regions.valid[r]]
        span = inside.amax(dim=0) - inside.amin(dim=0) + 1
        assert bool((span <= torch.tensor(box)).all())


def test_default_video_tiles_stay_within_one_frame() -> None:
    regions = tiler([2, 2]).partition((3, 4, 4))
    frames = regions.index // 16
    for r in range(regions.num_regions):
        assert len(set(frames[r, regions.valid[r]].tolist())) == 1
    assert regions.num_regions == 3 * 2 * 2


def test_a_three_sided_tile_needs_a_video_grid() -> None:
    part = tiler([2, 4, 4])
    assert part.min_grid() == (2, 4, 4)
    with pytest.raises(ValueError, match="smaller than one 2x4x4 tile"):
        part.partition((8, 8))
    with pytest.raises(ValueError, match="smaller than one 2x4x4 tile"):
        part.partition((1, 8, 8))
