"""Site kind for blocks of self-attention, cross-attention and feed-forward (Wan, PixArt, Sana, LTX).

Such a block updates a full-length residual stream three times: ``x += attn1(n1(x))``,
``x += attn2(n2(x), context)``, ``x += ffn(n3(x))`` (norms, modulation and gates around them
belong to the block). Each merged part runs on merged tokens and is unmerged right after::

    attn1: U(attn1(M n1, rope[positions]))   attn2: U(attn2(M n2, context))   ffn: U(ffn(M n3))

with ``M``/``U`` the plan's merge/unmerge and ``n`` the normalised, modulated tokens the
sub-module receives. The residuals, norms, modulation and gates stay full length, so:

- ratio 0 is exact (the plan is the identity and every wrapper calls the original);
- text and image-context tokens are never merged: cross-attention keys/values come from the
  context as before, only its queries are merged (each query attends independently, so
  ``attn2`` on merged queries is ``attn2`` of the merged tokens);
- per-token modulation (timesteps per token) is applied by the block before the sub-module, so
  it needs nothing from the site.

Merging the whole block (``x + U(block(M x) - M x)``) would cost one merge/unmerge pair instead
of three, but it normalises and modulates averaged raw tokens, which is not what the block was
trained on, and per-token modulation tables would have to be merged too; the per-part placement
costs two small tile-local products per part and keeps every norm exact.

One plan per block and call: it is computed from the input of the first merged part (the
normalised tokens of ``attn1`` by default) and applied to the other parts' inputs; blocks share
plans as the reuse policy's sharing mode says. RoPE: merged tokens take the rotary rows of their
destinations (``plan.positions``), gathered once per plan and call and shared by the group.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from tokenreduce.engine.attention import KeyWeightsCache, SizeWeighting
from tokenreduce.engine.patch import PatchSet
from tokenreduce.engine.runtime import Group, IdentityPlan, Runtime
from tokenreduce.interfaces import MergePlan

#: The parts of a block this site kind can merge, in execution order.
CrossAttentionPart = Literal["attn1", "attn2", "ffn"]
CROSS_ATTENTION_PARTS: tuple[CrossAttentionPart, ...] = ("attn1", "attn2", "ffn")

Forward = Callable[..., Any]


@dataclass(frozen=True)
class RopeArg:
    """Where a self-attention module receives its rotary table, and which axis indexes tokens.

    ``name``/``position``: the keyword and positional index of the argument; the table is a tensor
    or a tuple of tensors (``(cos, sin)``) whose ``token_dim`` axis runs over the image tokens.
    """

    name: str
    position: int
    token_dim: int = 1


class CallState:
    """Set by the adapter's denoiser wrapper for one call, read by the site wrappers."""

    def __init__(self) -> None:
        self.on = False  # inside a wrapped denoiser call with the runtime enabled
        self.grid: tuple[int, ...] = ()
        # group name -> (plan, source table, merged table): rebuilt for a new plan or a new table.
        self.rope: dict[str, tuple[MergePlan, Any, Any]] = {}
        # group name -> key weights of size-weighted self-attention, built once per plan.
        self.weights: dict[str, KeyWeightsCache] = {}

    def begin(self, grid: tuple[int, ...]) -> None:
        self.grid, self.rope, self.on = grid, {}, True


def merged_rope(state: CallState, group: Group, plan: MergePlan, rope: Any, token_dim: int) -> Any:
    """The rotary table with each merged token's row taken from its destination."""
    if rope is None:
        return None
    cached = state.rope.get(group.name)
    first = rope[0] if isinstance(rope, (tuple, list)) else rope
    if cached is not None and cached[0] is plan and cached[1] is first:
        return cached[2]
    positions = plan.positions
    if positions is None:
        raise ValueError(
            f"merger {group.merger.name!r} gives no `positions` for its merged tokens; rotary embeddings need them"
        )
    if isinstance(rope, (tuple, list)):
        merged: Any = type(rope)(t.index_select(token_dim, positions) for t in rope)
    else:
        merged = rope.index_select(token_dim, positions)
    state.rope[group.name] = (plan, first, merged)
    return merged


class CrossAttentionBlock:
    """One merged block: wraps the chosen parts' sub-modules and shares one plan between them."""

    def __init__(
        self,
        state: CallState,
        runtime: Runtime,
        group: Group,
        parts: Sequence[str],
        rope: RopeArg | None = None,
        size_weighting: bool = False,
    ) -> None:
        unknown = set(parts) - set(CROSS_ATTENTION_PARTS)
        if unknown or not parts:
            raise ValueError(
                f"cross-attention block parts must be a non-empty subset of {list(CROSS_ATTENTION_PARTS)}, "
                f"got {list(parts)}"
            )
        self.state, self.runtime, self.group, self.rope = state, runtime, group, rope
        self.parts = tuple(p for p in CROSS_ATTENTION_PARTS if p in parts)
        self.plan: MergePlan | None = None  # this call's plan, set by the first part
        #: with size weighting, self-attention's merged keys weigh their group sizes
        self.size_weighting = size_weighting
        self.weighting: SizeWeighting | None = None

    def install(self, patches: PatchSet, modules: dict[str, nn.Module]) -> None:
        """Wrap ``modules[part]`` (the block's sub-module playing that part) for every merged part."""
        for part in self.parts:
            first = part == self.parts[0]
            if part == "attn1":
                if self.size_weighting:
                    self.weighting = SizeWeighting(modules[part], patches)
                patches.wrap_forward(modules[part], self._self_attention(first))
            else:
                patches.wrap_forward(modules[part], self._per_token(first))

    def _plan(self, first: bool, x: torch.Tensor) -> MergePlan | None:
        """The first part computes (or reuses) the group's plan; later parts use the same one."""
        if first:
            plan = self.runtime.plan(self.group, x, self.state.grid)
            self.plan = None if isinstance(plan, IdentityPlan) else plan
        return self.plan

    def _self_attention(self, first: bool) -> Callable[[Forward], Forward]:
        site, rope_arg = self, self.rope

        def make(original: Forward) -> Forward:
            @functools.wraps(original)
            def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if not site.state.on:
                    return original(hidden_states, *args, **kwargs)
                plan = site._plan(first, hidden_states)
                if plan is None:
                    return original(hidden_states, *args, **kwargs)
                if rope_arg is not None:
                    index = rope_arg.position - 1  # args exclude hidden_states
                    if rope_arg.name in kwargs:
                        kwargs[rope_arg.name] = site._rope(plan, kwargs[rope_arg.name])
                    elif index < len(args):
                        args = (*args[:index], site._rope(plan, args[index]), *args[index + 1 :])
                merged = plan.merge(hidden_states)
                weighting = site.weighting
                if weighting is None:
                    return plan.unmerge(original(merged, *args, **kwargs))
                weights = site.state.weights.setdefault(site.group.name, KeyWeightsCache()).get(plan)
                return plan.unmerge(weighting.call(weights, original, merged, *args, **kwargs))

            return forward

        return make

    def _per_token(self, first: bool) -> Callable[[Forward], Forward]:
        """Cross-attention (queries merged, context untouched) or feed-forward."""
        site = self

        def make(original: Forward) -> Forward:
            @functools.wraps(original)
            def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                if not site.state.on:
                    return original(hidden_states, *args, **kwargs)
                plan = site._plan(first, hidden_states)
                if plan is None:
                    return original(hidden_states, *args, **kwargs)
                return plan.unmerge(original(plan.merge(hidden_states), *args, **kwargs))

            return forward

        return make

    def _rope(self, plan: MergePlan, rope: Any) -> Any:
        return merged_rope(self.state, self.group, plan, rope, self.rope.token_dim if self.rope else 1)
