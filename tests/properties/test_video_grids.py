"""Token grids of rank 3 (frames x rows x cols) through the engine: partitioners, selectors, rank checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tokenreduce.baselines.todo import DownsampleMerger
from tokenreduce.baselines.tomesd import TomesdGridSelector
from tokenreduce.baselines.tomesd.grid import cells_per_region
from tokenreduce.builtins import GlobalPartitioner, GridSelector, HardMeanMerger, StripePartitioner
from tokenreduce.engine import Runtime
from tokenreduce.interfaces import SelectContext
from tokenreduce.testing.contracts import check_regions, make_layout, make_runtime
from tokenreduce.testing.strategies import grids, make_tokens
from tokenreduce.toma_plugin.facility_location import FacilityLocationSelector
from tokenreduce.toma_plugin.tile import TilePartitioner

video_grids = grids(rank=3, max_side=9)


@given(grid=video_grids, rows=st.integers(1, 10))
@example(grid=(3, 7, 5), rows=3)
def test_stripes_stay_within_a_frame(grid: tuple[int, int, int], rows: int) -> None:
    regions = StripePartitioner(StripePartitioner.Params(rows=rows)).partition(grid)
    check_regions(regions, grid)
    frame_size = grid[1] * grid[2]
    frames = regions.index // frame_size
    for r in range(regions.num_regions):
        assert len(set(frames[r, regions.valid[r]].tolist())) == 1
    assert regions.num_regions == grid[0] * -(-grid[1] // min(rows, grid[1]))


@given(grid=video_grids)
def test_global_is_one_raster_region_of_any_rank(grid: tuple[int, int, int]) -> None:
    regions = GlobalPartitioner().partition(grid)
    check_regions(regions, grid)
    assert regions.is_raster and regions.num_tokens == math.prod(grid) and regions.rank == 3


@given(grid=st.tuples(st.integers(1, 3), st.integers(4, 11), st.integers(4, 11)), ratio=st.floats(0.1, 0.75))
@example(grid=(3, 5, 7), ratio=0.5)
def test_facility_location_on_video_tiles(grid: tuple[int, int, int], ratio: float) -> None:
    part = TilePartitioner(TilePartitioner.Params(size=[4, 4]))
    selector = FacilityLocationSelector()
    layout = make_layout(part, selector, grid, ratio, merger=HardMeanMerger())
    n = math.prod(grid)
    assert layout.num_tokens == n and layout.keep == n - math.floor(ratio * n)
    x = make_tokens((2, n, 6), seed=1, dtype=torch.float32)
    picks = selector.select(Runtime.features(x, layout), SelectContext(layout=layout))
    dests = layout.global_destinations(picks)
    assert len(set(dests.tolist())) == layout.num_destinations == layout.keep
    # Destinations lie in their own region, hence in the frame of their sources.
    frames = dests // (grid[1] * grid[2])
    region_frame = (layout.regions.index[:, 0] // (grid[1] * grid[2])).repeat_interleave(layout.k)
    keep_slots = layout.slot_valid.reshape(-1)
    assert torch.equal(frames, region_frame[keep_slots])


def test_grid_selector_strides_rows_and_cols_per_frame() -> None:
    grid = (2, 4, 6)
    layout = make_layout(GlobalPartitioner(), GridSelector(), grid, 0.75)
    # One corner per 2x2 cell of every frame: 2 frames x 2 x 3 cells.
    assert layout.dests == (12,)
    picks = GridSelector().select(torch.zeros(1, 1, 48, 1), SelectContext(layout=layout))
    coords = [(int(i) // 24, int(i) // 6 % 4, int(i) % 6) for i in picks[0]]
    assert sorted(coords) == [(t, r, c) for t in range(2) for r in (0, 2) for c in (0, 2, 4)]


@given(
    grid=st.tuples(st.integers(2, 3), st.integers(4, 9), st.integers(4, 9)),
    tile=st.sampled_from([None, [4, 4], [2, 4, 4]]),
    stride=st.sampled_from([(2, 2), (2, 3), (3, 2)]),
    seed=st.integers(0, 3),
)
@example(grid=(1, 5, 7), tile=None, stride=(2, 2), seed=0)
@example(grid=(3, 5, 7), tile=[2, 4, 4], stride=(3, 2), seed=1)
def test_tomesd_grid_puts_one_destination_in_each_cell_of_every_frame(
    grid: tuple[int, int, int], tile: list[int] | None, stride: tuple[int, int], seed: int
) -> None:
    part = GlobalPartitioner() if tile is None else TilePartitioner(TilePartitioner.Params(size=tile))
    selector = TomesdGridSelector(TomesdGridSelector.Params(stride=list(stride)))
    sy, sx = stride
    layout = make_layout(part, selector, grid, 0.5)
    regions = layout.regions
    ctx = SelectContext(layout=layout, generator=torch.Generator().manual_seed(seed))
    picks = selector.select(torch.zeros(2, regions.num_regions, regions.slots, 1), ctx)  # even batch: random
    cells = []
    for r in range(regions.num_regions):
        positions = regions.index[r][regions.valid[r]]
        t0, y0, x0 = (int(v) for v in unravel(int(positions.min()), grid))  # the region's corner
        rows = int(unravel(int(positions.max()), grid)[1]) - y0 + 1
        cols = int(unravel(int(positions.max()), grid)[2]) - x0 + 1
        frames = len({unravel(int(i), grid)[0] for i in positions})
        if rows < sy or cols < sx:  # a thin border region: its first token is its one destination
            assert layout.dests[r] == 1 and int(picks[r, 0]) == 0
            continue
        for slot in picks[r, : layout.dests[r]].tolist():
            t, y, x = unravel(int(regions.index[r, slot]), grid)
            assert (y - y0) // sy < rows // sy and (x - x0) // sx < cols // sx  # a whole cell
            cells.append((r, t, (y - y0) // sy, (x - x0) // sx))
        assert layout.dests[r] == frames * (rows // sy) * (cols // sx)
    assert len(set(cells)) == len(cells)  # one destination per cell of every frame


def test_tomesd_grid_refuses_positions_of_another_rank_than_the_grid() -> None:
    regions = TilePartitioner(TilePartitioner.Params(size=[4, 4])).partition((2, 4, 4))
    assert regions.local_rc is not None
    flat = dataclasses.replace(regions, local_rc=regions.local_rc[..., 1:])  # rows/cols only
    with pytest.raises(ValueError, match="rank-2 positions on a rank-3 grid"):
        cells_per_region(flat, (2, 2))


def unravel(index: int, grid: tuple[int, int, int]) -> tuple[int, int, int]:
    return index // (grid[1] * grid[2]), index // grid[2] % grid[1], index % grid[2]


@pytest.mark.parametrize(
    ("components", "name"),
    [
        ({"merger": DownsampleMerger()}, "downsample"),
        ({"partitioner": TilePartitioner(TilePartitioner.Params(size=[2, 2, 2]))}, "tile"),
    ],
)
def test_components_refuse_grids_of_another_rank(components: dict, name: str) -> None:
    settings = {"partitioner": GlobalPartitioner(), "ratio": 0.5} | components
    runtime = make_runtime(**settings)
    rank = 2 if name == "tile" else 3
    with pytest.raises(ValueError, match=f"token grids have rank {rank}, but .*{name}"):
        runtime.check_rank(rank)
    grid = (4, 4) if rank == 2 else (2, 4, 4)
    with pytest.raises(ValueError, match=name):
        runtime.layout(grid)
