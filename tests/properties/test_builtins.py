"""What each built-in computes, against independent reference computations (the contracts cover the rest)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from tokenreduce.builtins import (
    AlwaysPolicy,
    EveryKPolicy,
    GlobalPartitioner,
    GridSelector,
    HardMeanMerger,
    IdealMerger,
    IdentityMerger,
    NeverPolicy,
    RandomSelector,
    StripePartitioner,
)
from tokenreduce.engine import Runtime
from tokenreduce.interfaces import Decision, SelectContext
from tokenreduce.layout import kept_per_region
from tokenreduce.testing.contracts import make_layout, seeded
from tokenreduce.testing.strategies import (
    feasible_ratio,
    grids,
    make_tokens,
    merging_ratio,
    partitioners,
    ratios,
)

rows_per_stripe = st.integers(min_value=1, max_value=14)


@given(grid=grids(), rows=rows_per_stripe)
@example(grid=(5, 3), rows=2)
@example(grid=(4, 4), rows=8)
def test_stripes_are_runs_of_whole_rows(grid: tuple[int, int], rows: int) -> None:
    h, w = grid
    regions = StripePartitioner(StripePartitioner.Params(rows=rows)).partition((h, w))
    full = min(rows, h)
    assert regions.num_regions == -(-h // full) and regions.shape == (full, w)
    for r in range(regions.num_regions):
        first, last = r * full, min(h, (r + 1) * full)  # grid rows of this stripe
        tokens = regions.index[r, regions.valid[r]]
        assert tokens.tolist() == list(range(first * w, last * w))
        assert regions.local_rc[r, regions.valid[r], 0].tolist() == [
            y - first for y in range(first, last) for _ in range(w)
        ]


@given(grid=grids())
def test_global_is_one_raster_region(grid: tuple[int, int]) -> None:
    regions = GlobalPartitioner().partition(grid)
    assert regions.is_raster and regions.shape == grid and regions.sizes == (grid[0] * grid[1],)


@given(
    grid=grids(),
    stride=st.lists(st.integers(1, 4), min_size=2, max_size=2),
    rows=st.one_of(st.none(), rows_per_stripe),
)
@example(grid=(8, 8), stride=[2, 2], rows=None)
@example(grid=(5, 7), stride=[2, 3], rows=3)
@example(grid=(1, 1), stride=[2, 2], rows=None)
@example(grid=(2, 1), stride=[1, 1], rows=1)
def test_grid_selects_the_top_left_token_of_every_full_cell(
    grid: tuple[int, int], stride: list[int], rows: int | None
) -> None:
    h, w = grid
    sy, sx = stride
    partitioner = (
        GlobalPartitioner() if rows is None else StripePartitioner(StripePartitioner.Params(rows=rows))
    )
    selector = GridSelector(GridSelector.Params(stride=stride))
    # Reference: cell corners inside each stripe of `band` grid rows (the whole grid for `global`).
    band = h if rows is None else min(rows, h)
    expected, cell_less = [], False
    for top in range(0, h, band):
        height = min(band, h - top)
        corners = [(top + y) * w + x for y in range(0, height - sy + 1, sy) for x in range(0, w - sx + 1, sx)]
        cell_less |= not corners
        expected += corners
    if cell_less:
        with pytest.raises(ValueError, match="no full"):
            make_layout(partitioner, selector, grid, 0.0)
        return
    layout = make_layout(partitioner, selector, grid, 0.0)  # the count ignores the ratio
    assert layout.num_destinations == len(expected)
    local = selector.select(torch.zeros(1, *layout.regions.index.shape, 1), SelectContext(layout=layout))
    assert layout.global_destinations(local).tolist() == expected


@given(
    grid=grids(),
    partitioner=partitioners(),
    fraction=st.one_of(st.none(), st.floats(0.01, 1.0)),
    ratio=ratios(),
)
def test_random_selector_counts(
    grid: tuple[int, int], partitioner, fraction: float | None, ratio: float
) -> None:  # noqa: ANN001
    regions = partitioner.partition(grid)
    keep = kept_per_region(regions.sizes, feasible_ratio(regions, ratio))
    counts = RandomSelector(RandomSelector.Params(fraction=fraction)).count(regions, keep)
    if fraction is None:
        assert counts == keep
    else:
        assert counts == tuple(min(s, max(1, round(fraction * s))) for s in regions.sizes)


def test_random_selector_draws_different_destinations_for_different_seeds() -> None:
    layout = make_layout(GlobalPartitioner(), RandomSelector(), (12, 12), 0.5)
    features = torch.zeros(1, 1, 144, 4)
    picks = {
        tuple(RandomSelector().select(features, SelectContext(layout, seeded(seed))).tolist()[0])
        for seed in range(5)
    }
    assert len(picks) == 5


@given(
    grid=grids(),
    partitioner=partitioners(),
    ratio=ratios(),
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 3),
)
@example(
    grid=(5, 3), partitioner=StripePartitioner(StripePartitioner.Params(rows=2)), ratio=0.5, seed=0, batch=2
)
def test_hard_mean_groups_tokens_by_most_similar_destination(
    grid: tuple[int, int],
    partitioner,  # noqa: ANN001
    ratio: float,
    seed: int,
    batch: int,
) -> None:
    merger, selector = HardMeanMerger(), RandomSelector()
    layout = make_layout(
        partitioner, selector, grid, merging_ratio(partitioner.partition(grid), ratio), merger=merger
    )
    x = make_tokens((batch, layout.num_tokens, 5), seed=seed)
    features = Runtime.features(x, layout)
    local = selector.select(features, SelectContext(layout, seeded(seed)))
    plan = merger.plan(x, features, local, layout)
    merged, restored = plan.merge(x), plan.unmerge(plan.merge(x))
    dests = layout.global_destinations(local).tolist()
    assert plan.positions.tolist() == dests
    regions = layout.regions
    offset = 0
    for r in range(regions.num_regions):
        own = dests[offset : offset + layout.dests[r]]
        members = regions.index[r, regions.valid[r]].tolist()
        for b in range(batch):
            unit = torch.nn.functional.normalize(x[b].float(), dim=-1)
            # Reference assignment: a destination joins itself, any other token its most similar destination.
            group = {t: (t if t in own else own[int((unit[t] @ unit[own].T).argmax())]) for t in members}
            for j, d in enumerate(own):
                mean = x[b, [t for t in members if group[t] == d]].mean(dim=0)
                torch.testing.assert_close(merged[b, offset + j], mean)
            for t in members:
                torch.testing.assert_close(restored[b, t], merged[b, offset + own.index(group[t])])
        offset += layout.dests[r]


@given(grid=grids(), ratio=ratios(), seed=st.integers(0, 2**16))
def test_ideal_keeps_the_first_tokens_and_zero_fills(grid: tuple[int, int], ratio: float, seed: int) -> None:
    layout = make_layout(GlobalPartitioner(), RandomSelector(), grid, ratio)
    x = make_tokens((2, layout.num_tokens, 3), seed=seed)
    plan = IdealMerger().plan(x, Runtime.features(x, layout), None, layout)
    assert torch.equal(plan.merge(x), x[:, : layout.keep])
    assert plan.positions.tolist() == list(range(layout.keep))
    y = make_tokens((2, layout.keep, 3), seed=seed + 1)
    restored = plan.unmerge(y)
    assert torch.equal(restored[:, : layout.keep], y) and not restored[:, layout.keep :].any()


def test_identity_passes_tokens_through() -> None:
    layout = make_layout(StripePartitioner(StripePartitioner.Params(rows=3)), RandomSelector(), (5, 4), 0.5)
    x = make_tokens((2, 20, 3))
    plan = IdentityMerger().plan(x, Runtime.features(x, layout), None, layout)
    assert plan.merge(x) is x and plan.unmerge(x) is x
    assert plan.positions.tolist() == list(range(20))
    assert not IdentityMerger.needs_destinations and not IdealMerger.needs_destinations


@given(step=st.integers(0, 200), k=st.integers(1, 12), sharing=st.sampled_from(["kind", "block"]))
def test_reuse_schedules(step: int, k: int, sharing: str) -> None:
    assert AlwaysPolicy().decide(step) is Decision.SELECT and AlwaysPolicy().sharing == "block"
    assert not AlwaysPolicy().needs_step
    assert NeverPolicy().decide(step) is (Decision.SELECT if step == 0 else Decision.REUSE)
    assert NeverPolicy().sharing == "kind" and NeverPolicy().needs_step
    policy = EveryKPolicy(EveryKPolicy.Params(k=k, sharing=sharing))
    assert policy.decide(step) is (Decision.SELECT if step % k == 0 else Decision.REUSE)
    assert policy.sharing == sharing and policy.needs_step == (k > 1)
