"""ToMA attention merger: shapes, convex merge, row-stochastic unmerge, round trips, float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, reject
from hypothesis import strategies as st
from pydantic import ValidationError

from tokenreduce.engine.runtime import Runtime
from tokenreduce.interfaces import SelectContext
from tokenreduce.layout import Layout, build_layout, kept_per_region
from tokenreduce.toma_plugin.attention_merger import AttentionMerger
from tokenreduce.toma_plugin.facility_location import FacilityLocationSelector
from tokenreduce.toma_plugin.tile import TilePartitioner


def make_layout(h: int, w: int, tile: list[int], ratio: float) -> Layout:
    regions = TilePartitioner(TilePartitioner.Params(size=tile)).partition((h, w))
    keep = kept_per_region(regions.sizes, ratio)
    return build_layout(regions, ratio, keep, sum(keep))


def merger(**params: object) -> AttentionMerger:
    return AttentionMerger(AttentionMerger.Params(**params))


def fl_plan(x: torch.Tensor, layout: Layout, **params: object):
    features = Runtime.features(x, layout)
    dest = FacilityLocationSelector().select(features, SelectContext(layout=layout))
    return merger(**params).plan(x, features, dest, layout), dest


@st.composite
def layouts(draw: st.DrawFn) -> Layout:
    th, tw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    h, w = draw(st.integers(th, 13)), draw(st.integers(tw, 13))
    ratio = draw(st.sampled_from([0.0, 0.25, 0.5, 0.75, 0.9]))
    try:
        return make_layout(h, w, [th, tw], ratio)
    except ValueError:  # more regions than kept tokens: the runtime rejects such layouts too
        reject()


unmerge_modes = st.sampled_from(["transpose", "pinv"])


@given(layouts(), st.integers(1, 3), st.integers(1, 8), unmerge_modes, st.integers(0, 2**31 - 1))
def test_shapes_and_positions(layout: Layout, batch: int, channels: int, unmerge: str, seed: int) -> None:
    x = torch.randn(batch, layout.num_tokens, channels, generator=torch.Generator().manual_seed(seed))
    plan, dest = fl_plan(x, layout, unmerge=unmerge)
    y = plan.merge(x)
    assert y.shape == (batch, layout.keep, channels)
    assert plan.unmerge(y).shape == x.shape
    assert torch.isfinite(y).all() and torch.isfinite(plan.unmerge(y)).all()
    # Merged token order: region-major, then the region's destinations in selection order.
    expected = [
        int(layout.regions.index[r, dest[r, j]]) for r, n in enumerate(layout.dests) for j in range(n)
    ]
    assert plan.positions.tolist() == expected
    assert len(set(expected)) == layout.keep


def probe_maps(plan, layout: Layout, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense merge (B, N', N) and unmerge (B, N, N') matrices, read off by applying the maps to identities."""
    merge = plan.merge(torch.eye(layout.num_tokens).expand(batch, -1, -1))
    unmerge = plan.unmerge(torch.eye(layout.keep).expand(batch, -1, -1))
    return merge, unmerge


def region_of_tokens(layout: Layout) -> torch.Tensor:
    owner = torch.empty(layout.num_tokens, dtype=torch.long)
    for r in range(layout.regions.num_regions):
        owner[layout.regions.index[r][layout.regions.valid[r]]] = r
    return owner


@given(
    layouts(),
    st.integers(1, 3),
    unmerge_modes,
    st.sampled_from([0.001, 0.05, 1.0]),
    st.integers(0, 2**31 - 1),
)
def test_merge_is_convex_and_unmerge_row_stochastic(
    layout: Layout, batch: int, unmerge: str, temperature: float, seed: int
) -> None:
    x = torch.randn(batch, layout.num_tokens, 6, generator=torch.Generator().manual_seed(seed))
    plan, _ = fl_plan(x, layout, unmerge=unmerge, temperature=temperature)
    merge, unmerge_map = probe_maps(plan, layout, batch)
    assert merge.shape == (batch, layout.keep, layout.num_tokens)
    assert bool((merge >= 0).all())
    torch.testing.assert_close(merge.sum(-1), torch.ones(batch, layout.keep))
    torch.testing.assert_close(unmerge_map.sum(-1), torch.ones(batch, layout.num_tokens), atol=1e-3, rtol=0)
    if unmerge == "transpose":
        assert bool((unmerge_map >= 0).all())
    # Block-diagonal: a merged token only mixes tokens of its own region, and only feeds them back.
    owner = region_of_tokens(layout)
    merged_owner = owner[plan.positions]
    outside = merged_owner[:, None] != owner[None, :]
    assert bool((merge[:, outside] == 0).all())
    assert bool((unmerge_map.transpose(1, 2)[:, outside] == 0).all())


def clustered_tokens(
    layout: Layout, batch: int, channels: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens constant on ``dests[r]`` groups per region, and one destination per group.

    Groups (and so destinations) are shared by the batch; each sample gives its groups its own
    orthogonal directions and norms.
    """
    gen = torch.Generator().manual_seed(seed)
    regions = layout.regions
    x = torch.empty(batch, layout.num_tokens, channels)
    dest = torch.zeros(regions.num_regions, layout.k, dtype=torch.long)
    directions = torch.linalg.qr(torch.randn(batch, channels, channels, generator=gen))[0].transpose(1, 2)
    for r, n in enumerate(layout.dests):
        slots = regions.valid[r].nonzero().squeeze(1)
        slots = slots[torch.randperm(len(slots), generator=gen)]
        labels = torch.cat([torch.arange(n), torch.randint(0, n, (len(slots) - n,), generator=gen)])
        dest[r, :n] = slots[:n]  # slot j of the first n carries label j
        values = directions[:, :n] * (0.5 + 2 * torch.rand(batch, n, 1, generator=gen))
        x[:, regions.index[r, slots]] = values[:, labels]
    return x, dest


@given(layouts(), st.integers(1, 3), unmerge_modes, st.integers(0, 2**31 - 1))
def test_unmerge_inverts_merge_on_group_constant_tokens(
    layout: Layout, batch: int, unmerge: str, seed: int
) -> None:
    channels = max(layout.dests) + 2  # room for orthogonal group directions
    x, dest = clustered_tokens(layout, batch, channels, seed)
    plan = merger(unmerge=unmerge).plan(x, Runtime.features(x, layout), dest, layout)
    torch.testing.assert_close(plan.unmerge(plan.merge(x)), x, atol=1e-4, rtol=1e-4)


@given(layouts(), st.integers(1, 3), st.integers(0, 2**31 - 1))
def test_pinv_merge_after_unmerge_is_identity(layout: Layout, batch: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, layout.num_tokens, 16, generator=gen)
    plan, _ = fl_plan(x, layout, unmerge="pinv")
    y = torch.randn(batch, layout.keep, 5, generator=gen)
    torch.testing.assert_close(plan.merge(plan.unmerge(y)), y, atol=1e-3, rtol=1e-3)


def reference_maps(
    x: np.ndarray, layout: Layout, dest: torch.Tensor, temperature: float, unmerge: str
) -> tuple[np.ndarray, np.ndarray]:
    """float64 merge/unmerge of ``x`` with Python loops over samples and regions."""
    batch, n, _ = x.shape
    merged, restored = [], np.zeros_like(x)
    for b in range(batch):
        parts = []
        for r, k in enumerate(layout.dests):
            tokens = layout.regions.index[r][layout.regions.valid[r]].numpy()
            dests = layout.regions.index[r, dest[r, :k]].numpy()
            xs = x[b, tokens]
            xn = xs / np.linalg.norm(xs, axis=1, keepdims=True)
            dn = x[b, dests] / np.linalg.norm(x[b, dests], axis=1, keepdims=True)
            logits = xn @ dn.T / temperature
            a = np.exp(logits - logits.max(axis=1, keepdims=True))
            a /= a.sum(axis=1, keepdims=True)  # (S_r, k): each source spreads weight 1
            m = (a / a.sum(axis=0, keepdims=True)).T  # (k, S_r)
            u = a if unmerge == "transpose" else np.linalg.pinv(m)
            y = m @ xs
            parts.append(y)
            restored[b, tokens] = u @ y
        merged.append(np.concatenate(parts))
    return np.stack(merged), restored


@pytest.mark.parametrize("unmerge", ["transpose", "pinv"])
@pytest.mark.parametrize("temperature", [0.001, 0.02, 0.5])
@pytest.mark.parametrize(
    ("grid", "tile", "ratio"), [((8, 8), [4, 4], 0.5), ((10, 7), [4, 4], 0.6), ((6, 9), [3, 2], 0.3)]
)
def test_matches_float64_reference(grid, tile, ratio, temperature: float, unmerge: str) -> None:
    layout = make_layout(*grid, tile, ratio)
    x = torch.randn(2, layout.num_tokens, 12, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    plan, dest = fl_plan(x, layout, temperature=temperature, unmerge=unmerge)
    merged, restored = reference_maps(x.numpy(), layout, dest, temperature, unmerge)
    y = plan.merge(x)
    np.testing.assert_allclose(y.numpy(), merged, atol=1e-5, rtol=0)  # float32 weights
    # The pseudo-inverse is regularised (and solved in float32): looser on soft, ill-conditioned maps.
    np.testing.assert_allclose(
        plan.unmerge(y).numpy(), restored, atol=1e-5 if unmerge == "transpose" else 1e-3, rtol=0
    )


def test_weights_are_per_sample() -> None:
    layout = make_layout(8, 8, [4, 4], 0.5)
    x = torch.randn(2, 64, 8, generator=torch.Generator().manual_seed(0))
    plan, dest = fl_plan(x, layout, temperature=0.1)
    merge, _ = probe_maps(plan, layout, 2)
    assert not torch.allclose(merge[0], merge[1])
    # Sample 1's weights depend on sample 1 only (given the batch-shared destinations).
    alone = merger(temperature=0.1).plan(x[1:], Runtime.features(x[1:], layout), dest, layout)
    torch.testing.assert_close(merge[1:], probe_maps(alone, layout, 1)[0])


def test_ragged_tiles_keep_the_exact_count() -> None:
    layout = make_layout(10, 7, [4, 4], 0.5)
    assert layout.regions.ragged
    x = torch.randn(3, 70, 8)
    plan, _ = fl_plan(x, layout)
    y = plan.merge(x)
    assert y.shape == (3, 70 - 35, 8)
    assert plan.unmerge(y).shape == (3, 70, 8)
    assert plan.positions.shape == (35,)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tokens(dtype: torch.dtype) -> None:
    layout = make_layout(8, 12, [4, 4], 0.5)
    x = torch.randn(2, 96, 16, generator=torch.Generator().manual_seed(1))
    plan32, dest = fl_plan(x, layout)
    low = x.to(dtype)
    plan = merger().plan(low, Runtime.features(low, layout), dest, layout)
    y = plan.merge(low)
    assert y.dtype == dtype and plan.unmerge(y).dtype == dtype
    torch.testing.assert_close(y.float(), plan32.merge(x), atol=5e-2, rtol=5e-2)


def test_flat_tile_is_finite_with_pinv() -> None:
    layout = make_layout(8, 8, [4, 4], 0.75)
    x = torch.ones(1, 64, 4)
    plan, _ = fl_plan(x, layout, unmerge="pinv")
    torch.testing.assert_close(plan.unmerge(plan.merge(x)), x, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize(
    "params", [{"temperature": 0.0}, {"temperature": -1.0}, {"unmerge": "inverse"}, {"tau": 1.0}]
)
def test_invalid_params_are_rejected(params: dict) -> None:
    with pytest.raises(ValidationError):
        AttentionMerger.Params(**params)
