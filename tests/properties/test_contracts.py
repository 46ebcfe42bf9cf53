"""Every registered component runs the contract of its kind.

The registry is discovered afresh, so components added by any plugin (first-party or installed)
join this matrix automatically, parametrised by their registered name.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tokenreduce
from tokenreduce.interfaces import Component, Decision
from tokenreduce.testing.contracts import (
    MergerContract,
    PartitionerContract,
    ReusePolicyContract,
    SelectorContract,
    build_component,
    check_regions,
)
from tokenreduce.testing.strategies import component_params, grids

REGISTRY = tokenreduce.reset_manager().registry
KINDS = ("partitioner", "selector", "merger", "reuse")


def _fixture(kind: str) -> Callable[..., Component]:
    """A class-scoped ``component`` fixture over every registered component of ``kind``."""

    @pytest.fixture(name="component", scope="class", params=REGISTRY.names(kind))
    def component_fixture(self: object, request: pytest.FixtureRequest) -> Component:
        return build_component(REGISTRY.get(kind, request.param))

    return component_fixture


class TestPartitioners(PartitionerContract):
    component_fixture = _fixture("partitioner")


class TestSelectors(SelectorContract):
    component_fixture = _fixture("selector")


class TestMergers(MergerContract):
    component_fixture = _fixture("merger")


class TestReusePolicies(ReusePolicyContract):
    component_fixture = _fixture("reuse")


@pytest.mark.parametrize(
    ("kind", "name"), [(kind, name) for kind in KINDS for name in REGISTRY.names(kind)], ids=lambda v: v
)
@given(data=st.data())
def test_drawn_params_build_a_working_component(kind: str, name: str, data: st.DataObject) -> None:
    """Parameters beyond the defaults: valid ones construct the component, which keeps its contract basics."""
    cls = REGISTRY.get(kind, name)
    params = data.draw(component_params(cls), label="params")
    component = cls(params)
    assert component.params == params and component.name == name
    if kind == "partitioner":
        rank = data.draw(st.sampled_from([2, 3]), label="rank")
        minimum = component.min_grid()
        offset = data.draw(grids(max_side=8, rank=max(rank, len(minimum))), label="offset")
        minimum = (1,) * (len(offset) - len(minimum)) + tuple(minimum)
        grid = tuple(m - 1 + o for m, o in zip(minimum, offset, strict=True))
        check_regions(component.partition(grid), grid)
    elif kind == "reuse":
        assert component.sharing in ("kind", "block")
        assert component.decide(0) is Decision.SELECT
        step = data.draw(st.integers(0, 100), label="step")
        assert component.decide(step) is type(component)(params).decide(step)
