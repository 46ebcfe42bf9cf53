"""ToMeSD components: the ``tomesd_grid`` selector and the ``bipartite`` merger, tensor level."""

from __future__ import annotations

import pytest
import torch
from tomesd.merge import bipartite_soft_matching_random2d

from tokenreduce.baselines.tomesd import BipartiteMerger, TomesdGridSelector
from tokenreduce.builtins import GlobalPartitioner, StripePartitioner
from tokenreduce.config import ConfigError, load_config
from tokenreduce.engine import Runtime
from tokenreduce.interfaces import SelectContext
from tokenreduce.layout import Layout
from tokenreduce.manager import reset_manager
from tokenreduce.testing.contracts import make_runtime
from tokenreduce.toma_plugin import TilePartitioner


def grid_selector(stride=(2, 2), use_rand=False) -> TomesdGridSelector:
    return TomesdGridSelector(TomesdGridSelector.Params(stride=list(stride), use_rand=use_rand))


def layout_for(selector, grid, ratio, partitioner=None, merger=None) -> Layout:
    runtime = make_runtime(
        partitioner=partitioner or GlobalPartitioner(),
        selector=selector,
        merger=merger or BipartiteMerger(),
        ratio=ratio,
    )
    return runtime.layout(grid)


def select(selector, layout, x, seed=0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return selector.select(Runtime.features(x, layout), SelectContext(layout=layout, generator=gen))


# --------------------------------------------------------------------------- selector


@pytest.mark.parametrize(
    ("grid", "stride"), [((8, 8), (2, 2)), ((9, 11), (2, 2)), ((5, 7), (3, 2)), ((6, 4), (2, 1))]
)
def test_grid_counts_whole_cells_and_leaves_border_as_sources(grid, stride) -> None:
    selector = grid_selector(stride)
    layout = layout_for(selector, grid, ratio=0.5)
    (h, w), (sy, sx) = grid, stride
    assert layout.dests == ((h // sy) * (w // sx),)
    x = torch.randn(1, h * w, 4)
    raster = layout.global_destinations(select(selector, layout, x))
    rows, cols = raster // w, raster % w
    # Top-left of every full cell: exactly the cells' corners, none in the leftover border.
    expected = {(r, c) for r in range(0, (h // sy) * sy, sy) for c in range(0, (w // sx) * sx, sx)}
    assert set(zip(rows.tolist(), cols.tolist(), strict=True)) == expected


def test_random_destinations_stay_in_their_cell_and_vary() -> None:
    selector = grid_selector((2, 3), use_rand=True)
    layout = layout_for(selector, (8, 9), ratio=0.5)
    x = torch.randn(2, 72, 4)  # even batch: randomness on
    draws = [layout.global_destinations(select(selector, layout, x, seed=s)) for s in range(4)]
    for raster in draws:
        cells = (raster // 9) // 2 * 3 + (raster % 9) // 3  # the cell each destination lies in
        assert sorted(cells.tolist()) == list(range(12))
    assert any(not torch.equal(draws[0], d) for d in draws[1:])
    assert torch.equal(draws[0], layout.global_destinations(select(selector, layout, x, seed=0)))


def test_random_is_forced_off_for_odd_batches() -> None:
    layout = layout_for(grid_selector(use_rand=True), (8, 8), ratio=0.5)
    x = torch.randn(3, 64, 4)
    with_rand = [select(grid_selector(use_rand=True), layout, x, seed=s) for s in range(3)]
    top_left = select(grid_selector(use_rand=False), layout, x)
    assert all(torch.equal(d, top_left) for d in with_rand)


def test_random_selection_leaves_the_global_rng_alone() -> None:
    selector = grid_selector(use_rand=True)
    layout = layout_for(selector, (8, 8), ratio=0.5)
    x = torch.randn(2, 64, 4)
    state = torch.get_rng_state()
    select(selector, layout, x)
    assert torch.equal(torch.get_rng_state(), state)


def test_grid_on_ragged_tiles_uses_each_tile_rectangle() -> None:
    selector = grid_selector((2, 2))
    tile = TilePartitioner(TilePartitioner.Params(size=[4, 4]))
    layout = layout_for(selector, (6, 7), ratio=0.5, partitioner=tile)
    # Tiles: 4x4, 4x3, 2x4, 2x3 -> 4, 2, 2, 1 cells.
    assert layout.dests == (4, 2, 2, 1)
    raster = layout.global_destinations(select(selector, layout, torch.randn(1, 42, 4)))
    assert sorted(raster.tolist()) == sorted([0, 2, 14, 16, 4, 18, 28, 30, 32])


def test_region_smaller_than_a_cell_gets_its_first_token_as_destination() -> None:
    selector = grid_selector((2, 2), use_rand=True)
    tile = TilePartitioner(TilePartitioner.Params(size=[4, 4]))
    layout = layout_for(selector, (5, 4), ratio=0.5, partitioner=tile)  # tiles 4x4 and 1x4
    assert layout.dests == (4, 1)
    raster = layout.global_destinations(select(selector, layout, torch.randn(2, 20, 4)))
    assert raster[-1].item() == 16  # the 1x4 border tile's first token
    x = torch.randn(2, 20, 3)
    features = Runtime.features(x, layout)
    plan = BipartiteMerger().plan(
        x, features, selector.select(features, SelectContext(layout=layout)), layout
    )
    assert plan.merge(x).shape == (2, layout.keep, 3)


# --------------------------------------------------------------------------- merger


def make_plan(grid, ratio, x, stride=(2, 2), matching="per_sample", partitioner=None):
    selector = grid_selector(stride)
    merger = BipartiteMerger(BipartiteMerger.Params(matching=matching))
    layout = layout_for(selector, grid, ratio, partitioner=partitioner, merger=merger)
    features = Runtime.features(x, layout)
    destinations = selector.select(features, SelectContext(layout=layout))
    return layout, destinations, merger.plan(x, features, destinations, layout)


@pytest.mark.parametrize(
    ("grid", "stride", "ratio"), [((8, 8), (2, 2), 0.5), ((9, 11), (2, 1), 0.3), ((5, 6), (3, 2), 0.6)]
)
def test_matches_tomesd_merge_and_unmerge(grid, stride, ratio) -> None:
    h, w = grid
    torch.manual_seed(0)
    x, metric = torch.randn(2, h * w, 8), torch.randn(2, h * w, 8)
    merge, unmerge = bipartite_soft_matching_random2d(
        metric, w, h, stride[1], stride[0], int(h * w * ratio), no_rand=True
    )
    selector = grid_selector(stride)
    layout = layout_for(selector, grid, ratio)
    features = Runtime.features(metric, layout)
    plan = BipartiteMerger().plan(
        x, features, selector.select(features, SelectContext(layout=layout)), layout
    )
    ours, theirs = plan.merge(x), merge(x)
    assert ours.shape == theirs.shape
    # Same merged tokens (tomesd orders them differently): compare per-sample sorted token sums.
    torch.testing.assert_close(ours.sum(-1).sort(-1).values, theirs.sum(-1).sort(-1).values)
    y = torch.randn_like(ours)
    # Unmerge parity through a map of the merged token order: y_theirs[j] = y_ours[order[j]].
    order = torch.stack([(theirs[b, :, None, :] - ours[b, None]).abs().sum(-1).argmin(-1) for b in range(2)])
    y_theirs = torch.stack([y[b, order[b]] for b in range(2)])
    torch.testing.assert_close(plan.unmerge(y), unmerge(y_theirs))


@pytest.mark.parametrize(
    "partitioner", [GlobalPartitioner(), StripePartitioner(StripePartitioner.Params(rows=4))]
)
def test_positions_are_the_kept_tokens_and_groups_round_trip(partitioner) -> None:
    grid, ratio = (6, 10), 0.5
    n = 60
    x = torch.eye(n).unsqueeze(0)  # token t carries a one-hot of t
    layout, _, plan = make_plan(grid, ratio, x, partitioner=partitioner)
    merged = plan.merge(x)  # (1, keep, N): row j = mean of the one-hots of its group
    assert merged.shape == (1, layout.keep, n)
    groups = merged[0] > 0
    assert torch.equal(groups.sum(0), torch.ones(n, dtype=torch.long)), "every token is in exactly one group"
    positions = plan.positions
    assert positions.shape == (layout.keep,)
    assert bool(groups[torch.arange(layout.keep), positions].all()), "each merged token contains its position"
    # A group's mean is exact: row j weights its members equally.
    sizes = groups.sum(1, keepdim=True)
    torch.testing.assert_close(merged[0], groups / sizes)
    # unmerge sends each group's value to every member: token t reads the group that holds it.
    y = torch.randn(1, layout.keep, 3)
    owner = groups.float().argmax(0)
    torch.testing.assert_close(plan.unmerge(y)[0], y[0, owner])


def test_merge_of_unmerge_is_identity_and_constant_groups_round_trip() -> None:
    grid, ratio = (8, 8), 0.6
    x = torch.randn(2, 64, 5)
    layout, _, plan = make_plan(grid, ratio, x)
    y = torch.randn(2, layout.keep, 5)
    torch.testing.assert_close(plan.merge(plan.unmerge(y)), y)
    constant = plan.unmerge(plan.merge(x))  # constant on every merge group
    torch.testing.assert_close(plan.unmerge(plan.merge(constant)), constant)


def test_per_sample_matching_differs_between_samples_and_shared_does_not() -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 64, 6)
    _, _, per_sample = make_plan((8, 8), 0.5, x)
    _, _, shared = make_plan((8, 8), 0.5, x, matching="shared")
    assert per_sample.positions is None
    kept = per_sample.sample_positions
    assert kept.shape == (2, 32) and not torch.equal(kept[0], kept[1])
    assert shared.positions.shape == (32,) and shared.sample_positions.shape == (1, 32)
    # A batch of one has batch-shared positions even with per-sample matching.
    _, _, single = make_plan((8, 8), 0.5, x[:1])
    assert torch.equal(single.positions, kept[0])


def test_only_the_most_similar_sources_merge() -> None:
    # 1x8 grid, stride 1x2: destinations are the even tokens; sources 1, 3, 5, 7.
    dest = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    x = torch.zeros(1, 8, 2)
    x[0, 0::2] = dest
    x[0, 1] = torch.tensor([1.0, 0.05])  # close to token 0
    x[0, 3] = torch.tensor([0.3, 1.0])  # fairly close to token 2
    x[0, 5] = torch.tensor([-1.0, 1.0])  # 45 degrees from tokens 2 and 6: the least similar
    x[0, 7] = torch.tensor([-1.0, 0.01])  # close to token 6
    layout, _, plan = make_plan((1, 8), 0.375, x, stride=(1, 2))  # 3 of 8 tokens merge
    assert layout.keep == 5
    assert plan.positions.tolist() == [0, 2, 4, 5, 6]
    merged = plan.merge(x)[0]
    torch.testing.assert_close(merged[0], (x[0, 0] + x[0, 1]) / 2)
    torch.testing.assert_close(merged[1], (x[0, 2] + x[0, 3]) / 2)
    torch.testing.assert_close(merged[3], x[0, 5])
    torch.testing.assert_close(merged[4], (x[0, 6] + x[0, 7]) / 2)


def test_flux_needs_shared_matching() -> None:
    reset_manager()
    base = {
        "adapter": {"name": "flux"},
        "selector": {"name": "tomesd_grid"},
        "partitioner": {"name": "global"},
    }
    with pytest.raises(ConfigError, match=r"merger 'bipartite'.*adapter 'flux'.*matching: shared"):
        load_config({**base, "merger": {"name": "bipartite"}})
    load_config({**base, "merger": {"name": "bipartite", "matching": "shared"}})


@pytest.mark.parametrize(("adapter", "shared"), [("flux2", True), ("qwenimage", True), ("sd3", False)])
def test_adapters_declare_whether_positions_are_batch_shared(adapter, shared) -> None:
    reset_manager()
    config = {
        "adapter": {"name": adapter},
        "selector": {"name": "tomesd_grid"},
        "partitioner": {"name": "global"},
        "merger": {"name": "bipartite"},
    }
    if shared:
        with pytest.raises(ConfigError, match=rf"adapter '{adapter}'.*matching: shared"):
            load_config(config)
    else:  # SD3 adds positions before its blocks: per-sample kept sets are fine
        load_config(config)


def test_presets_validate() -> None:
    registry = reset_manager().registry
    for name in ("tomesd-sdxl", "tomesd-flux", "mixed-grid-attention", "mixed-fl-bipartite"):
        assert name in registry.presets
        load_config(name)
