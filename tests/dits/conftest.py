"""Fixtures for the image-DiT adapter tests: a fresh registry with stand-in mergers, tiny models.

``dit_test_permute``: merge = a seeded permutation of the image tokens (nothing dropped), whose
``positions`` are the permutation, so the model's output must not change (attention is
permutation-equivariant once every token keeps its own RoPE row): a check of where the sites
merge, unmerge and substitute RoPE rows. ``dit_test_wrong_positions``: the same permutation with
``positions`` left in raster order, which must change the output of a model with RoPE.
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

PLANS: list[int] = []  # token counts of the plans built, in order (reset per test)


class PermutePlan(MergePlan):
    def __init__(self, num_tokens: int, device: torch.device, honest: bool) -> None:
        gen = torch.Generator().manual_seed(num_tokens)
        self.order = torch.randperm(num_tokens, generator=gen).to(device)
        self.inverse = torch.argsort(self.order)
        self.positions = self.order if honest else torch.arange(num_tokens, device=device)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, self.order]

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.inverse]


class PermuteMerger(Merger):
    name = "dit_test_permute"
    output = "keep"
    needs_destinations = False
    needs_features = False
    honest = True

    class Params(StrictParams):
        name: Literal["dit_test_permute"] = "dit_test_permute"

    def plan(
        self, x: torch.Tensor, features: torch.Tensor, destinations: torch.Tensor | None, layout: Layout
    ) -> MergePlan:
        PLANS.append(layout.num_tokens)
        return PermutePlan(layout.num_tokens, x.device, self.honest)


class WrongPositionsMerger(PermuteMerger):
    name = "dit_test_wrong_positions"
    honest = False

    class Params(StrictParams):
        name: Literal["dit_test_wrong_positions"] = "dit_test_wrong_positions"


class StandIns:
    @hookimpl
    def tokenreduce_register(self, registry) -> None:  # noqa: ANN001
        registry.add(PermuteMerger)
        registry.add(WrongPositionsMerger)


@pytest.fixture(autouse=True)
def registry():
    tr.reset_manager(autoload=False)
    tr.register_plugin(StandIns(), name="dit-test-stand-ins")
    PLANS.clear()
    yield tr.get_registry()
    tr.reset_manager()
