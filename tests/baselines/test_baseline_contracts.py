"""The public contracts on parameter variants that the registry-wide run (defaults only) does not reach."""

from __future__ import annotations

import pytest

from tokenreduce.baselines.todo import DownsampleMerger
from tokenreduce.baselines.tofu import TofuMerger
from tokenreduce.baselines.tomesd import BipartiteMerger, TomesdGridSelector
from tokenreduce.testing.contracts import MergerContract, SelectorContract


class TestTopLeftGridSelector(SelectorContract):
    component = TomesdGridSelector(TomesdGridSelector.Params(stride=[2, 3], use_rand=False))


class TestRandomGridSelector(SelectorContract):
    component = TomesdGridSelector(TomesdGridSelector.Params(stride=[3, 1], use_rand=True))


class TestBipartiteVariants(MergerContract):
    @pytest.fixture(name="component", scope="class", params=["shared", "tofu-prune", "tofu-mlerp"])
    def component_fixture(self, request: pytest.FixtureRequest):
        if request.param == "shared":
            return BipartiteMerger(BipartiteMerger.Params(matching="shared"))
        return TofuMerger(TofuMerger.Params(policy=request.param.removeprefix("tofu-")))


class TestDownsampleModes(MergerContract):
    @pytest.fixture(name="component", scope="class", params=["avg", "max"])
    def component_fixture(self, request: pytest.FixtureRequest):
        return DownsampleMerger(DownsampleMerger.Params(factor=3, mode=request.param))
