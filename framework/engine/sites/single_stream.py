"""Single-stream block: attention *and* MLP on ``[text; merged image]``.

The block's input is the concatenated ``[text; image]`` sequence (text length from the call
context); the image part of the normalised tokens is merged, the plan computed from it in the
group's first block, and the image part of the block's output projection is unmerged before the
gate and residual, which stay full length. Two shapes of block:

- **split** (Flux): ``norm`` (modulated) -> ``attn`` and a parallel MLP -> ``proj_out``. ``norm``
  is wrapped to merge, ``attn`` to substitute the merged RoPE table, ``proj_out`` to unmerge.
- **fused** (Flux.2): one module takes the normalised ``[text; image]`` and returns the summed
  attention and MLP output (QKV/MLP-in and out projections fused); it is wrapped alone.

The attention runs through :meth:`Site.attend` (size-weighted when enabled: text keys first).
The block's own ``forward`` is never replaced.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from tokenreduce.engine.sites.call import Site, Wrapper, no_mask
from tokenreduce.engine.sites.rope import Rope

# --------------------------------------------------------------------------- split (norm, attn, proj_out)


def wrap_single_norm(site: Site) -> Wrapper:
    """``norm``: plan from its image tokens, output ``[text; merged image]``."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(x: torch.Tensor, emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            normed, gate = original(x, emb)
            ctx = site.ctx
            site.plan = None
            if not ctx.on:
                return normed, gate
            t = ctx.text_len
            image = normed[:, t:]
            plan = site.runtime.plan(site.group, image, ctx.grid)
            if plan.is_identity:
                return normed, gate
            site.plan = plan
            return torch.cat((normed[:, :t], plan.merge(image)), dim=1), gate

        return forward

    return make


def wrap_single_attn(site: Site, rope: Rope, what: str) -> Wrapper:
    """``attn``: the same call with the merged RoPE table."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            image_rotary_emb: Any = None,
            **kwargs: Any,
        ) -> Any:
            plan = site.plan
            if plan is None:
                return original(
                    hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs
                )
            no_mask(attention_mask, what)
            t = site.ctx.text_len
            image_rotary_emb = rope.merged(site, plan, image_rotary_emb, t)
            return site.attend(
                plan, t, original, hidden_states, encoder_hidden_states, None, image_rotary_emb, **kwargs
            )

        return forward

    return make


def wrap_single_proj_out(site: Site) -> Wrapper:
    """``proj_out``: unmerge the image part of its output."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(x: torch.Tensor) -> torch.Tensor:
            out = original(x)
            plan = site.plan
            if plan is None:
                return out
            site.plan = None
            t = site.ctx.text_len
            return torch.cat((out[:, :t], plan.unmerge(out[:, t:])), dim=1)

        return forward

    return make


# --------------------------------------------------------------------------- fused


def wrap_single_fused(site: Site, rope: Rope, what: str) -> Wrapper:
    """A fused attention + MLP module on normalised ``[text; image]``: merge, run, unmerge."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(
            hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any
        ) -> Any:
            ctx = site.ctx
            if not ctx.on:
                return original(hidden_states, attention_mask, *args, **kwargs)
            t = ctx.text_len
            image = hidden_states[:, t:]
            plan = site.runtime.plan(site.group, image, ctx.grid)
            if plan.is_identity:
                return original(hidden_states, attention_mask, *args, **kwargs)
            no_mask(attention_mask, what)
            if args:  # a positional rotary table
                if len(args) > 1:
                    raise TypeError(f"{what}: unexpected positional arguments to attention")
                kwargs[rope.arg] = args[0]
            if rope.arg in kwargs:
                kwargs[rope.arg] = rope.merged(site, plan, kwargs[rope.arg], t)
            merged = torch.cat((hidden_states[:, :t], plan.merge(image)), dim=1)
            out = site.attend(plan, t, original, merged, None, **kwargs)
            return torch.cat((out[:, :t], plan.unmerge(out[:, t:])), dim=1)

        return forward

    return make
