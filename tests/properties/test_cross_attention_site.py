"""The site library's cross-attention block on a toy block: exact where it must be, merged where it says."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tokenreduce.builtins import GlobalPartitioner, HardMeanMerger, RandomSelector
from tokenreduce.engine import PatchSet
from tokenreduce.engine.sites import CallState, CrossAttentionBlock, RopeArg
from tokenreduce.testing.contracts import make_runtime


class Recorder(nn.Module):
    """Returns its input times 2 and remembers what it saw."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple] = []

    def forward(self, x, context=None, mask=None, rope=None):
        self.seen.append((x.shape[1], rope))
        return 2 * x


def make_site(ratio: float, parts=("attn1", "attn2", "ffn")):
    runtime = make_runtime(
        partitioner=GlobalPartitioner(), selector=RandomSelector(), merger=HardMeanMerger(), ratio=ratio
    )
    state = CallState()
    site = CrossAttentionBlock(state, runtime, runtime.group("blocks", "b0"), parts, RopeArg("rope", 3, 1))
    modules = {p: Recorder() for p in ("attn1", "attn2", "ffn")}
    patches = PatchSet()
    site.install(patches, modules)
    return state, modules, patches


def test_parts_run_on_merged_tokens_and_rope_rows_follow_destinations() -> None:
    state, modules, patches = make_site(0.5)
    x = torch.randn(2, 12, 3, dtype=torch.float64)
    table = torch.arange(12.0).view(1, 12, 1, 1)
    state.begin((2, 2, 3))
    out = modules["attn1"](x, None, None, (table, -table))
    ((plan, _, _),) = state.rope.values()
    assert modules["attn1"].seen[-1][0] == 6
    cos, sin = modules["attn1"].seen[-1][1]
    assert torch.equal(cos.flatten(), plan.positions.double()) and torch.equal(sin, -cos)
    torch.testing.assert_close(out, plan.unmerge(2 * plan.merge(x)))
    modules["ffn"](x)
    assert modules["ffn"].seen[-1][0] == 6
    state.on = False
    assert torch.equal(modules["attn2"](x), 2 * x) and modules["attn2"].seen[-1][0] == 12
    patches.undo()


def test_ratio_zero_calls_the_originals() -> None:
    state, modules, patches = make_site(0.0, parts=("attn2", "ffn"))
    x = torch.randn(1, 12, 3)
    state.begin((12,))
    assert torch.equal(modules["attn2"](x), 2 * x) and torch.equal(modules["ffn"](x), 2 * x)
    assert modules["attn2"].seen[-1][0] == 12 and modules["ffn"].seen[-1][0] == 12
    patches.undo()


@pytest.mark.parametrize("parts", [(), ("attn3",)])
def test_unknown_parts_are_refused(parts) -> None:
    runtime = make_runtime(partitioner=GlobalPartitioner(), ratio=0.5)
    with pytest.raises(ValueError, match="parts must be a non-empty subset"):
        CrossAttentionBlock(CallState(), runtime, runtime.group("g", "b"), parts)
