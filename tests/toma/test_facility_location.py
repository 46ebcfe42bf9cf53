"""Facility-location selector against a float64 brute-force greedy, plus its greedy guarantees."""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from tokenreduce.interfaces import SelectContext
from tokenreduce.layout import Layout, build_layout, kept_per_region
from tokenreduce.toma_plugin.facility_location import FacilityLocationSelector, facility_location_greedy
from tokenreduce.toma_plugin.tile import TilePartitioner

#: Smallest objective gap between the best and second-best candidate for a case to count as tie-free.
TIE_GAP = 1e-3


def objective(sims: np.ndarray, clients: np.ndarray, chosen: list[int]) -> float:
    """``sum_b sum_{i in clients} max(-1, max_{j in chosen} sim_b(i, j))`` in float64."""
    if not chosen:
        return -1.0 * sims.shape[0] * len(clients)
    return float(sims[:, clients][:, :, chosen].max(axis=2).sum())


def brute_force_greedy(
    features: np.ndarray, valid: np.ndarray, k: int
) -> tuple[list[list[int]], list[list[float]], float]:
    """Greedy by re-evaluating the whole objective for every candidate; returns picks, gains, smallest gap."""
    picks, gains, smallest_gap = [], [], np.inf
    for r in range(features.shape[1]):
        region = features[:, r]
        sims = region @ region.transpose(0, 2, 1)  # (B, S, S)
        clients = np.flatnonzero(valid[r])
        chosen: list[int] = []
        region_gains: list[float] = []
        for _ in range(min(k, len(clients))):
            base = objective(sims, clients, chosen)
            scores = {v: objective(sims, clients, [*chosen, int(v)]) for v in clients if v not in chosen}
            ranked = sorted(scores.values(), reverse=True)
            if len(ranked) > 1:
                smallest_gap = min(smallest_gap, ranked[0] - ranked[1])
            best = max(scores, key=lambda v: (scores[v], -v))
            chosen.append(int(best))
            region_gains.append(scores[best] - base)
        picks.append(chosen)
        gains.append(region_gains)
    return picks, gains, smallest_gap


def random_case(seed: int, batch: int, regions: int, slots: int, channels: int, ragged: bool):
    gen = torch.Generator().manual_seed(seed)
    feats = F.normalize(
        torch.randn(batch, regions, slots, channels, generator=gen, dtype=torch.float64), dim=-1
    )
    valid = torch.ones(regions, slots, dtype=torch.bool)
    if ragged:
        valid = torch.rand(regions, slots, generator=gen) < 0.7
        valid[:, 0] = True
    return feats, valid


cases = st.tuples(
    st.integers(0, 2**31 - 1),  # seed
    st.integers(1, 3),  # batch
    st.integers(1, 4),  # regions
    st.integers(1, 12),  # slots
    st.integers(2, 8),  # channels
    st.booleans(),  # ragged
)


@given(cases, st.integers(1, 12))
def test_matches_float64_brute_force(case: tuple, k: int) -> None:
    feats, valid = random_case(*case)
    k = min(k, feats.shape[2])
    expected, expected_gains, gap = brute_force_greedy(feats.numpy(), valid.numpy(), k)
    assume(gap > TIE_GAP)
    # Padding slots carry non-zero features here: they must still be ignored as clients.
    indices, gains = facility_location_greedy(feats.float(), valid, k)
    assert indices.shape == gains.shape == (feats.shape[1], k)
    assert indices.dtype == torch.long
    for r, (picks, region_gains) in enumerate(zip(expected, expected_gains, strict=True)):
        n = len(picks)
        assert indices[r, :n].tolist() == picks
        np.testing.assert_allclose(gains[r, :n].double().numpy(), region_gains, rtol=1e-4, atol=1e-4)


@given(cases)
def test_first_reference_uses_sample_zero_only(case: tuple) -> None:
    feats, valid = random_case(*case)
    k = feats.shape[2]
    first, _ = facility_location_greedy(feats.float(), valid, k, reduce="first")
    alone, _ = facility_location_greedy(feats[:1].float(), valid, k)
    other = feats.clone()
    other[1:] = F.normalize(torch.randn_like(other[1:]), dim=-1)
    changed, _ = facility_location_greedy(other.float(), valid, k, reduce="first")
    assert torch.equal(first, alone)
    assert torch.equal(first, changed)


@given(cases)
def test_gains_non_increasing_and_picks_unique(case: tuple) -> None:
    feats, valid = random_case(*case)
    k = feats.shape[2]
    indices, gains = facility_location_greedy(feats.float(), valid, k)
    for r in range(feats.shape[1]):
        n = int(valid[r].sum())
        picks = indices[r, :n].tolist()
        assert len(set(picks)) == n
        assert all(bool(valid[r, p]) for p in picks)
        assert bool((gains[r, 1:n] <= gains[r, : n - 1] + 1e-4).all())
        assert bool((gains[r, :n] >= -1e-5).all())


def shifted_objective(sims: np.ndarray, clients: np.ndarray, chosen: list[int]) -> float:
    """``f`` minus each sample's smallest similarity: monotone, submodular and 0 on the empty set."""
    floor = sims[:, clients][:, :, clients].min(axis=(1, 2))  # (B,)
    covered = sims[:, clients][:, :, chosen].max(axis=2)  # (B, clients)
    return float((covered - floor[:, None]).sum())


@given(cases, st.integers(1, 12))
def test_objective_within_the_greedy_bound_of_every_selection(case: tuple, k: int) -> None:
    # Greedy on a monotone submodular function reaches (1 - 1/e) of any selection of the same size.
    # (It can fall below the best selection: exactly on tiny regions, a random pick may win.)
    feats, valid = random_case(*case)
    k = min(k, int(valid.sum(1).min()))
    indices, _ = facility_location_greedy(feats.float(), valid, k)
    gen = np.random.default_rng(case[0])
    for r in range(feats.shape[1]):
        region = feats[:, r].numpy()
        sims = region @ region.transpose(0, 2, 1)
        clients = np.flatnonzero(valid[r].numpy())
        greedy = shifted_objective(sims, clients, indices[r].tolist())
        if math.comb(len(clients), k) <= 300:
            others = [list(c) for c in itertools.combinations(clients.tolist(), k)]
        else:
            others = [gen.choice(clients, size=k, replace=False).tolist() for _ in range(100)]
        best = max(shifted_objective(sims, clients, other) for other in others)
        assert greedy >= (1.0 - 1.0 / math.e) * best - 1e-5


@given(st.integers(0, 2**31 - 1), st.integers(1, 3), st.integers(1, 6), st.integers(6, 16))
def test_distinct_patches_reach_the_optimum(seed: int, batch: int, patches: int, slots: int) -> None:
    # A tile made of flat patches in orthogonal directions: one destination per patch covers every
    # token with similarity 1 (the largest possible objective); no random selection does better.
    gen = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(8, 8, generator=gen, dtype=torch.float64))[0][:patches]
    labels = torch.cat([torch.arange(patches), torch.randint(0, patches, (slots - patches,), generator=gen)])
    labels = labels[torch.randperm(slots, generator=gen)]
    feats = directions[labels].expand(batch, 1, slots, 8)
    valid = torch.ones(1, slots, dtype=torch.bool)
    indices, _ = facility_location_greedy(feats.float(), valid, patches)
    assert sorted(labels[indices[0]].tolist()) == list(range(patches))
    sims = (feats[:, 0] @ feats[:, 0].transpose(1, 2)).numpy()
    clients = np.arange(slots)
    greedy = objective(sims, clients, indices[0].tolist())
    np.testing.assert_allclose(greedy, batch * slots)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        assert (
            greedy >= objective(sims, clients, rng.choice(slots, size=patches, replace=False).tolist()) - 1e-9
        )


def test_flat_tiles_never_repeat() -> None:
    # Every token of a region identical: all gains after the first are 0; picks must still be distinct.
    feats = F.normalize(torch.ones(2, 3, 16, 4), dim=-1)
    valid = torch.ones(3, 16, dtype=torch.bool)
    valid[2, 5:] = False
    indices, gains = facility_location_greedy(feats, valid, 16)
    for r in range(3):
        n = int(valid[r].sum())
        assert sorted(indices[r, :n].tolist()) == valid[r].nonzero().squeeze(1).tolist()
    assert bool((gains[:, 1:] == 0).all())


def test_padding_is_never_picked() -> None:
    feats = F.normalize(torch.randn(1, 2, 9, 4), dim=-1)
    valid = torch.tensor([[True] * 9, [True, False, True, False, True, False, False, False, False]])
    indices, _ = facility_location_greedy(feats, valid, 3)
    assert sorted(indices[1].tolist()) == [0, 2, 4]


def test_sum_mode_serves_the_whole_batch() -> None:
    # Sample 0 is flat (indifferent); sample 1 has two opposite clusters: only the sum sees them.
    flat = torch.ones(6, 2)
    clustered = torch.tensor([[1.0, 0.0]] * 3 + [[-1.0, 0.0]] * 3)
    feats = F.normalize(torch.stack([flat, clustered]).unsqueeze(1), dim=-1)
    valid = torch.ones(1, 6, dtype=torch.bool)
    summed, _ = facility_location_greedy(feats, valid, 2)
    first, _ = facility_location_greedy(feats, valid, 2, reduce="first")
    assert {int(i) // 3 for i in summed[0]} == {0, 1}  # one destination in each cluster
    assert first[0].tolist() == [0, 1]  # sample 0 alone: every pick ties, first slots win


def test_prefix_consistent() -> None:
    feats, valid = random_case(7, 2, 5, 16, 6, True)
    full, _ = facility_location_greedy(feats.float(), valid, 10)
    for k in (1, 4, 9):
        short, _ = facility_location_greedy(feats.float(), valid, k)
        assert torch.equal(short, full[:, :k])


def test_selector_on_a_ragged_tile_layout() -> None:
    regions = TilePartitioner(TilePartitioner.Params(size=[4, 4])).partition((10, 7))
    keep = kept_per_region(regions.sizes, 0.6)
    layout = build_layout(regions, 0.6, keep, sum(keep))
    feats = F.normalize(torch.randn(2, regions.num_regions, regions.slots, 8), dim=-1)
    feats = feats * regions.valid.unsqueeze(-1)  # as the runtime provides them
    for reference in ("sum", "first"):
        selector = FacilityLocationSelector(FacilityLocationSelector.Params(reference=reference))
        dest = selector.select(feats, SelectContext(layout=layout))
        assert dest.shape == (regions.num_regions, layout.k)
        for r, n in enumerate(layout.dests):
            picks = dest[r, :n].tolist()
            assert len(set(picks)) == n and all(bool(regions.valid[r, p]) for p in picks)
        raster = layout.global_destinations(dest)
        assert raster.shape == (sum(keep),) and len(set(raster.tolist())) == sum(keep)


def test_jitter_draws_new_destinations_at_each_selection_from_the_seed() -> None:
    regions = TilePartitioner(TilePartitioner.Params(size=[4, 4])).partition((10, 7))
    keep = kept_per_region(regions.sizes, 0.5)
    layout = build_layout(regions, 0.5, keep, sum(keep))
    feats = F.normalize(torch.randn(2, regions.num_regions, regions.slots, 8), dim=-1)
    feats = feats * regions.valid.unsqueeze(-1)

    def picks(jitter: float, seed: int, calls: int = 2) -> list[torch.Tensor]:
        ctx = _noise_context(layout, seed)
        return [_jittered_picks(feats, layout, jitter, ctx=ctx) for _ in range(calls)]

    plain = FacilityLocationSelector(FacilityLocationSelector.Params()).select(
        feats, SelectContext(layout=layout)
    )
    first, second = picks(0.0, 0)
    assert torch.equal(first, plain) and torch.equal(second, plain)  # jitter 0: the paper's selector
    first, second = picks(0.5, 0)
    assert not torch.equal(first, second)  # a new draw at each selection
    assert all(torch.equal(a, b) for a, b in zip(picks(0.5, 0), (first, second), strict=True))  # seeded
    for dest in (first, second):  # still distinct, valid slots only
        for r, n in enumerate(layout.dests):
            chosen = dest[r, :n].tolist()
            assert len(set(chosen)) == n and all(bool(regions.valid[r, p]) for p in chosen)


def _noise_context(layout: Layout, seed: int) -> SelectContext:
    """A selection context with its own noise draw counter, as the runtime gives one."""
    return SelectContext(layout=layout, draws=torch.zeros((), dtype=torch.int64), seed=seed)


def _jittered_picks(
    feats: torch.Tensor, layout: Layout, jitter: float, seed: int = 0, ctx: SelectContext | None = None
) -> torch.Tensor:
    selector = FacilityLocationSelector(FacilityLocationSelector.Params(jitter=jitter))
    return selector.select(feats, ctx or _noise_context(layout, seed))


def test_jitter_means_the_same_at_every_hidden_size() -> None:
    # The noise is drawn on the similarities, so padding the features with zero channels (which
    # leaves every cosine as it was) leaves the jittered picks as they were.
    regions = TilePartitioner(TilePartitioner.Params(size=[4, 4])).partition((8, 8))
    keep = kept_per_region(regions.sizes, 0.5)
    layout = build_layout(regions, 0.5, keep, sum(keep))
    narrow = F.normalize(torch.randn(1, regions.num_regions, regions.slots, 8), dim=-1)
    wide = F.pad(narrow, (0, 56))
    assert torch.equal(_jittered_picks(narrow, layout, 0.3), _jittered_picks(wide, layout, 0.3))
    assert not torch.equal(_jittered_picks(narrow, layout, 0.3), _jittered_picks(narrow, layout, 0.0))


def test_large_jitter_still_picks_distinct_valid_slots() -> None:
    # Noise far above the cosines' range: the similarities stay below SELF_COVER, so picks stay distinct.
    regions = TilePartitioner(TilePartitioner.Params(size=[4, 4])).partition((10, 7))
    keep = kept_per_region(regions.sizes, 0.1)  # many picks per tile: late picks add little
    layout = build_layout(regions, 0.1, keep, sum(keep))
    feats = F.normalize(torch.randn(2, regions.num_regions, regions.slots, 8), dim=-1)
    feats = feats * regions.valid.unsqueeze(-1)
    for seed in range(4):
        dest = _jittered_picks(feats, layout, 10.0, seed)
        for r, n in enumerate(layout.dests):
            chosen = dest[r, :n].tolist()
            assert len(set(chosen)) == n and all(bool(regions.valid[r, p]) for p in chosen)
