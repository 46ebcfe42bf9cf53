"""Properties of static layouts: kept counts per region, region round trips, destination slots."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st

from tokenreduce.builtins import GlobalPartitioner, StripePartitioner
from tokenreduce.interfaces import Partitioner
from tokenreduce.layout import Layout, Regions, build_layout, kept_per_region
from tokenreduce.testing.strategies import (
    EDGE_GRIDS,
    LARGEST_RATIO,
    arbitrary_regions,
    feasible_ratio,
    grids,
    make_tokens,
    partitioners,
    ratios,
    regions_for,
)

region_sizes = st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=12).filter(any)
# Built-in partitions (rectangular, ragged stripes) and arbitrary ones (scattered, unequal).
any_regions = st.one_of(
    regions_for(partitioner=partitioners(), grid=grids()), arbitrary_regions(grid=grids())
)


@given(sizes=region_sizes, ratio=ratios(max_ratio=0.99))
@example(sizes=[1], ratio=LARGEST_RATIO)
@example(sizes=[64, 64, 64, 16], ratio=0.5)
@example(sizes=[100, 1, 1, 1, 1, 1], ratio=LARGEST_RATIO)
@example(sizes=[3, 0, 5], ratio=0.0)
def test_kept_per_region_meets_the_layer_total(sizes: list[int], ratio: float) -> None:
    n = sum(sizes)
    total = n - math.floor(ratio * n)
    occupied = sum(1 for s in sizes if s)
    if total < occupied:
        with pytest.raises(ValueError, match="cannot keep"):
            kept_per_region(tuple(sizes), ratio)
        return
    keep = kept_per_region(tuple(sizes), ratio)
    assert len(keep) == len(sizes)
    assert sum(keep) == total
    for k, s in zip(keep, sizes, strict=True):
        assert (1 <= k <= s) if s else k == 0


@given(sizes=region_sizes, ratio=ratios(max_ratio=0.99))
@example(sizes=[64, 64, 64, 16], ratio=0.75)
@example(sizes=[7, 7, 3], ratio=0.5)
def test_kept_per_region_stays_within_one_token_of_the_exact_share(sizes: list[int], ratio: float) -> None:
    exact = [s * (1.0 - ratio) for s in sizes]
    assume(all(e >= 1.0 for e, s in zip(exact, sizes, strict=True) if s))
    keep = kept_per_region(tuple(sizes), ratio)
    assert all(abs(k - e) < 1.0 for k, e in zip(keep, exact, strict=True))


def _layout(regions: Regions, ratio: float, dests: tuple[int, ...] | None = None) -> Layout:
    ratio = feasible_ratio(regions, ratio)
    keep = kept_per_region(regions.sizes, ratio)
    return build_layout(regions, ratio, keep if dests is None else dests, sum(keep))


@given(regions=any_regions, batch=st.integers(1, 3), channels=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_to_regions_then_from_regions_is_the_identity(
    regions: Regions, batch: int, channels: int, seed: int
) -> None:
    layout = _layout(regions, 0.5)
    x = make_tokens((batch, layout.num_tokens, channels), seed=seed)
    xr = layout.to_regions(x)
    assert xr.shape == (batch, regions.num_regions, regions.slots, channels)
    # Slot (r, s) holds token index[r, s]; padding slots hold token 0.
    expected = x[:, regions.index.reshape(-1)].view_as(xr)
    assert torch.equal(xr, expected)
    assert torch.equal(layout.from_regions(xr), x)


@given(regions=any_regions, seed=st.integers(0, 2**16))
def test_from_regions_ignores_padding_slots(regions: Regions, seed: int) -> None:
    layout = _layout(regions, 0.5)
    xr = make_tokens((2, regions.num_regions * regions.slots, 3), seed=seed).view(
        2, regions.num_regions, regions.slots, 3
    )
    poisoned = xr.masked_fill(~regions.valid.view(1, *regions.valid.shape, 1), float("nan"))
    assert torch.equal(layout.from_regions(poisoned), layout.from_regions(xr))


@st.composite
def layouts_with_dests(draw: st.DrawFn) -> Layout:
    regions = draw(any_regions)
    dests = tuple(draw(st.integers(0, s)) for s in regions.sizes)
    return _layout(regions, 0.5, dests)


@given(layout=layouts_with_dests(), batch=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_compact_and_expand_slots_round_trip(layout: Layout, batch: int, seed: int) -> None:
    r, k, d = layout.regions.num_regions, layout.k, layout.num_destinations
    assert k == max(max(layout.dests), 1)
    assert layout.slot_valid.shape == (r, k)
    assert tuple(int(v) for v in layout.slot_valid.sum(dim=1)) == layout.dests
    y = make_tokens((batch, d, 2), seed=seed)
    slots = layout.expand_slots(y)
    assert slots.shape == (batch, r, k, 2)
    assert torch.equal(layout.compact_slots(slots), y)
    # Unreal slots are zero after expanding; compacting drops whatever they hold.
    assert bool((slots[:, ~layout.slot_valid] == 0).all())
    full = make_tokens((batch, r * k, 2), seed=seed + 1).view(batch, r, k, 2)
    assert torch.equal(
        layout.expand_slots(layout.compact_slots(full)), full * layout.slot_valid.unsqueeze(-1)
    )


@given(layout=layouts_with_dests(), seed=st.integers(0, 2**16))
def test_global_destinations_follow_compact_order(layout: Layout, seed: int) -> None:
    regions = layout.regions
    gen = torch.Generator().manual_seed(seed)
    local = torch.randint(regions.slots, (regions.num_regions, layout.k), generator=gen)
    raster = layout.global_destinations(local)
    expected = [
        int(regions.index[r, local[r, j]]) for r in range(regions.num_regions) for j in range(layout.dests[r])
    ]
    assert raster.tolist() == expected


@given(grid=grids(), partitioner=partitioners(), ratio=ratios())
@example(grid=EDGE_GRIDS[0], partitioner=GlobalPartitioner(), ratio=LARGEST_RATIO)
@example(grid=(5, 3), partitioner=StripePartitioner(StripePartitioner.Params(rows=2)), ratio=0.5)
def test_layout_keeps_the_layer_total(grid: tuple[int, int], partitioner: Partitioner, ratio: float) -> None:
    regions = partitioner.partition(grid)
    layout = _layout(regions, ratio)
    n = grid[0] * grid[1]
    assert layout.num_tokens == n
    assert layout.keep == n - math.floor(layout.ratio * n) == layout.num_destinations
    moved = layout.to(torch.device("cpu"))
    assert moved is layout.to(torch.device("cpu"))  # cached per device
    assert torch.equal(moved.regions.index, regions.index) and torch.equal(
        moved.slot_valid, layout.slot_valid
    )
    assert (moved.keep, moved.dests, moved.k) == (layout.keep, layout.dests, layout.k)
