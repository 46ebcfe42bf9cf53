"""Joint-attention image stream: merged image tokens in a block's joint text-image attention.

The block's ``attn`` receives the normalised, modulated image tokens and the text tokens. The
wrapper merges the image tokens with the group's plan (computed from them in the group's first
block, applied by later ones), calls the original attention on the merged image tokens (so image
Q/K/V are projected from them and joint attention runs over text and merged image, in whatever
order the model concatenates; size-weighted when enabled, see :meth:`Site.attend`), and unmerges the image output after ``to_out``; unmerge rows sum to
1, so the residuals, the MLP and the text stream stay full length and exact.

Fits Flux double-stream blocks, SD3/SD3.5 ``JointTransformerBlock``, Qwen-Image
``QwenImageTransformerBlock`` and Flux.2 double-stream blocks: their attention modules return
``(image, text)`` (and image-shaped extras after them, e.g. an IP-adapter output).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from tokenreduce.engine.sites.call import Site, Wrapper, no_mask
from tokenreduce.engine.sites.rope import Rope


def wrap_joint_attn(site: Site, rope: Rope, what: str, hand_on: bool = False) -> Wrapper:
    """``attn`` of a joint block: merged image Q/K/V, image output(s) unmerged after ``to_out``.

    ``hand_on``: leave this call's plan in ``site.plan`` (``None`` when nothing is merged) for the
    block's image feed-forward (:func:`wrap_image_ff`).
    """

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            ctx = site.ctx
            if hand_on:
                site.plan = None
            if not ctx.on:
                return original(hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
            plan = site.runtime.plan(site.group, hidden_states, ctx.grid, sequence=ctx.sequence)
            if plan.is_identity:
                return original(hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
            no_mask(attention_mask, what)
            if hand_on:
                site.plan = plan
            if args:  # a positional rotary table (Flux's attention takes it fourth)
                if len(args) > 1:
                    raise TypeError(f"{what}: unexpected positional arguments to attention")
                kwargs[rope.arg] = args[0]
            text_len = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
            if rope.arg in kwargs:
                kwargs[rope.arg] = rope.merged(site, plan, kwargs[rope.arg], text_len)
            merged = plan.merge(hidden_states)
            out = site.attend(plan, text_len, original, merged, encoder_hidden_states, None, **kwargs)
            # (image, text[, image-shaped extras such as an IP-adapter output])
            return (plan.unmerge(out[0]), out[1], *(plan.unmerge(o) for o in out[2:]))

        return forward

    return make


def wrap_image_ff(site: Site) -> Wrapper:
    """The image stream's feed-forward of a joint block on merged tokens: ``U(ff(M n))``.

    Opt-in, beyond the attention-only placement: ``n`` (the normalised, modulated image tokens the
    feed-forward receives) is merged with the plan the block's joint attention used in this call
    (handed on in ``site.plan``), the feed-forward runs on the merged tokens and its output is
    unmerged; the gate and residual stay full length. Exact when nothing is merged.
    """

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            plan = site.plan
            if plan is None or not site.ctx.on:  # (a plan left by a call that failed in between)
                return original(hidden_states, *args, **kwargs)
            site.plan = None
            return plan.unmerge(original(plan.merge(hidden_states), *args, **kwargs))

        return forward

    return make


def wrap_image_self_attn(site: Site, what: str) -> Wrapper:
    """An image-only self-attention in a joint block (SD3.5's ``attn2``): merge, attend, unmerge.

    Uses the plan of the same call and group (computed by the block's joint attention just before).
    """

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            **kwargs: Any,
        ) -> Any:
            ctx = site.ctx
            if not ctx.on or encoder_hidden_states is not None:
                return original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
            plan = site.runtime.plan(site.group, hidden_states, ctx.grid, sequence=ctx.sequence)
            if plan.is_identity:
                return original(hidden_states, encoder_hidden_states, attention_mask, **kwargs)
            no_mask(attention_mask, what)
            return plan.unmerge(
                site.attend(plan, 0, original, plan.merge(hidden_states), None, None, **kwargs)
            )

        return forward

    return make
