"""The public strategies produce what they promise (plugin authors build on them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from tokenreduce.builtins import EveryKPolicy, GridSelector, RandomSelector, StripePartitioner
from tokenreduce.layout import Regions
from tokenreduce.testing.contracts import check_regions
from tokenreduce.testing.strategies import (
    TOKEN_MODES,
    arbitrary_regions,
    clustered_tokens,
    component_params,
    grids,
    make_tokens,
    partitioners,
    ratios,
    regions_for,
    token_batches,
)


@given(grid=grids(min_side=2, max_side=5), ratio=ratios(max_ratio=0.6))
def test_grids_and_ratios_stay_in_bounds(grid: tuple[int, int], ratio: float) -> None:
    assert all(2 <= side <= 5 for side in grid)
    assert 0.0 <= ratio <= 0.6


@given(data=st.data(), dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_token_batches_have_the_requested_shape(data: st.DataObject, dtype: torch.dtype) -> None:
    x = data.draw(token_batches(grid=(3, 5), channels=4, batch_sizes=st.integers(1, 3), dtype=dtype))
    assert x.shape[1:] == (15, 4) and 1 <= x.shape[0] <= 3 and x.dtype == dtype
    assert bool(torch.isfinite(x.float()).all())


def test_token_modes_are_deterministic_and_distinct() -> None:
    for mode in TOKEN_MODES:
        assert torch.equal(
            make_tokens((2, 16, 3), seed=1, mode=mode, grid=(4, 4)),
            make_tokens((2, 16, 3), seed=1, mode=mode, grid=(4, 4)),
        )
    constant = make_tokens((1, 16, 3), mode="constant")
    assert torch.equal(constant, constant[:, :1].expand_as(constant))
    blocks = make_tokens((1, 16, 3), mode="blocks", grid=(4, 4)).view(4, 4, 3)
    assert torch.equal(blocks[0, 0], blocks[1, 1]) and not torch.equal(blocks[0, 0], blocks[2, 2])


@given(data=st.data(), n=st.integers(1, 40), count=st.integers(1, 12))
def test_clustered_tokens_are_constant_on_groups_and_closest_to_their_own(
    data: st.DataObject, n: int, count: int
) -> None:
    groups = torch.arange(n) % count
    x = data.draw(clustered_tokens(groups=groups, batch_sizes=2))
    assert x.shape == (2, n, max(min(count, n), 4))
    for g in groups.unique().tolist():
        members = x[:, groups == g]
        assert torch.equal(members, members[:, :1].expand_as(members))
    unit = F.normalize(x, dim=-1)
    closest = (unit @ unit.transpose(1, 2)).argmax(dim=-1)  # most similar token of each token
    assert torch.equal(groups[closest], groups.expand(2, n))


@given(regions=regions_for(partitioner=partitioners(), grid=grids()))
def test_regions_for_builds_valid_partitions(regions: Regions) -> None:
    check_regions(regions, regions.grid)


@given(regions=arbitrary_regions(grid=grids(max_side=6)))
def test_arbitrary_regions_cover_the_grid(regions: Regions) -> None:
    check_regions(regions, regions.grid)


@given(data=st.data(), cls=st.sampled_from([RandomSelector, GridSelector, StripePartitioner, EveryKPolicy]))
def test_component_params_are_valid(data: st.DataObject, cls: type) -> None:
    params = data.draw(component_params(cls))
    assert isinstance(params, cls.Params)
    assert cls.Params.model_validate(params.model_dump()) == params
