"""A fresh registry with a stand-in hard merger that merges fixed pairs of tokens (2i, 2i + 1)."""

from __future__ import annotations

from typing import ClassVar, Literal

import pytest
import torch

import tokenreduce as tr
from tokenreduce.hookspecs import hookimpl
from tokenreduce.interfaces import MergePlan, Merger
from tokenreduce.layout import Layout
from tokenreduce.params import StrictParams


class PairPlan(MergePlan):
    """Tokens ``2i`` and ``2i + 1`` become their mean; unmerge copies it back to both (size 2 each)."""

    def __init__(self, num_tokens: int, batch: int, device: torch.device) -> None:
        self.positions = torch.arange(0, num_tokens, 2, device=device)
        self.sizes = torch.full((batch, num_tokens // 2), 2.0, device=device)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n // 2, 2, c).mean(dim=2)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return y.repeat_interleave(2, dim=1)


class PairMerger(Merger):
    name = "test_pairs"
    output = "keep"
    needs_destinations = False
    needs_features = False
    hard: ClassVar[bool] = True
    gives_sizes: ClassVar[bool] = True

    class Params(StrictParams):
        name: Literal["test_pairs"] = "test_pairs"

    def plan(
        self,
        x: torch.Tensor,
        features: torch.Tensor | None,
        destinations: torch.Tensor | None,
        layout: Layout,
    ) -> MergePlan:
        if layout.keep * 2 != layout.num_tokens:
            raise ValueError("test_pairs merges exactly half of the tokens (ratio 0.5)")
        return PairPlan(layout.num_tokens, x.shape[0], x.device)


class StandIns:
    @hookimpl
    def tokenreduce_register(self, registry) -> None:  # noqa: ANN001
        registry.add(PairMerger)


@pytest.fixture(autouse=True)
def registry():
    tr.reset_manager()
    tr.register_plugin(StandIns(), name="size-weighting-stand-ins")
    yield tr.get_registry()
    tr.reset_manager()
