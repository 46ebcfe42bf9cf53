"""Fixtures for the Flux adapter tests: a fresh registry with two stand-in mergers, tiny models.

``flux_test_fixed``: a data-independent linear merger with arbitrary (non-convex, not
row-stochastic) merge and unmerge matrices, so a reference can tell exactly where the adapter
merges and unmerges. ``flux_test_kv_only``: a kv_only merger the Flux adapter must reject.
"""

from __future__ import annotations

from typing import Literal

import pytest
import torch

import tokenreduce as tr
from tokenreduce.hookspecs import hookimpl
from tokenreduce.interfaces import MergePlan, Merger
from tokenreduce.layout import Layout
from tokenreduce.params import StrictParams


class FixedPlan(MergePlan):
    """``merge(x) = M x``, ``unmerge(y) = U y`` with seeded random ``M (N', N)``, ``U (N, N')``."""

    def __init__(self, num_tokens: int, keep: int, device: torch.device, dtype: torch.dtype) -> None:
        gen = torch.Generator().manual_seed(1000 * num_tokens + keep)
        self.merge_matrix = (
            torch.randn(keep, num_tokens, generator=gen, dtype=torch.float64) / num_tokens**0.5
        )
        self.unmerge_matrix = torch.randn(num_tokens, keep, generator=gen, dtype=torch.float64) / keep**0.5
        self.positions = torch.randperm(num_tokens, generator=gen)[:keep].to(device)
        self.merge_matrix = self.merge_matrix.to(device=device, dtype=dtype)
        self.unmerge_matrix = self.unmerge_matrix.to(device=device, dtype=dtype)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return self.merge_matrix @ x

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return self.unmerge_matrix @ y


class FixedMerger(Merger):
    name = "flux_test_fixed"
    output = "keep"
    needs_destinations = False

    class Params(StrictParams):
        name: Literal["flux_test_fixed"] = "flux_test_fixed"

    def plan(
        self, x: torch.Tensor, features: torch.Tensor, destinations: torch.Tensor | None, layout: Layout
    ) -> MergePlan:
        return FixedPlan(layout.num_tokens, layout.keep, x.device, x.dtype)


class KvOnlyMerger(Merger):
    name = "flux_test_kv_only"
    kv_only = True
    needs_destinations = False

    class Params(StrictParams):
        name: Literal["flux_test_kv_only"] = "flux_test_kv_only"

    def plan(
        self, x: torch.Tensor, features: torch.Tensor, destinations: torch.Tensor | None, layout: Layout
    ) -> MergePlan:
        raise AssertionError("never planned: the Flux adapter rejects kv_only mergers")


class StandIns:
    @hookimpl
    def tokenreduce_register(self, registry) -> None:  # noqa: ANN001
        registry.add(FixedMerger)
        registry.add(KvOnlyMerger)


@pytest.fixture(autouse=True)
def registry():
    tr.reset_manager(autoload=False)
    tr.register_plugin(StandIns(), name="flux-test-stand-ins")
    yield tr.get_registry()
    tr.reset_manager()
