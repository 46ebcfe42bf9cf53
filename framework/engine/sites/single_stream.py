"""Single-stream block: attention *and* MLP on ``[text; merged image]``.

The block's input is the concatenated ``[text; image]`` sequence (text length from the call
context); the image part of the normalised tokens is merged, the plan computed from it in the
group's first block, and the image part of the block's output projection is unmerged before the
gate and residual, which stay full length. Two shapes of block:

- **split** (Flux): ``norm`` (modulated) -> ``attn`` and a parallel MLP -> ``proj_out``. ``norm``
  is wrapped to merge, ``attn`` to substitute the merged RoPE table, ``proj_out`` to unmerge. With
  the stock norm and a convex plan the image is merged before the modulation into one buffer
  ``[merged image; text]`` and unmerged straight after ``proj_out``'s matmul (no concatenation).
- **fused** (Flux.2): one module takes the normalised ``[text; image]`` and returns the summed
  attention and MLP output (QKV/MLP-in and out projections fused); it is wrapped alone.

The attention runs through :meth:`Site.attend` (size-weighted when enabled: text keys first).
The block's own ``forward`` is never replaced.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from tokenreduce.engine.sites.call import Site, Wrapper, no_mask
from tokenreduce.engine.sites.rope import Rope

if TYPE_CHECKING:
    from diffusers.models.normalization import AdaLayerNormZeroSingle

# --------------------------------------------------------------------------- split (norm, attn, proj_out)


def fusable_norm(norm: nn.Module) -> bool:
    """Whether a single block's ``norm`` is diffusers' ``AdaLayerNormZeroSingle`` itself (its forward is
    reproduced op for op on the fused path; subclasses and replacements take the generic path)."""
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    return type(norm) is AdaLayerNormZeroSingle and isinstance(getattr(norm, "linear", None), nn.Linear)


def fusable_linear(proj_out: nn.Module) -> bool:
    """Whether ``proj_out`` is a plain ``nn.Linear`` with a bias (computed into a buffer on the fused path)."""
    return type(proj_out) is nn.Linear and proj_out.bias is not None


def wrap_single_norm(site: Site, norm: nn.Module) -> Wrapper:
    """``norm``: plan from its image tokens, output the merged sequence.

    Generic path: ``[text; merge(image)]`` (one concatenation). For convex plans (merge rows sum to
    1) and the stock norm, the image tokens are merged *before* the modulation
    ``ln * (1 + scale) + shift`` (equal up to rounding), and the two modulations write
    ``[merged image; text]`` straight into one buffer: one batched matmul and no concatenation over
    the unmodified block. A prefix plan (the ideal) modulates only the kept tokens (a view).
    """
    fused = fusable_norm(norm)
    stock = cast("AdaLayerNormZeroSingle", norm)  # read only on the fused path, which checked the type

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(x: torch.Tensor, emb: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
            ctx = site.ctx
            site.plan = None
            if not ctx.on:
                return original(x, emb)
            t = ctx.text_len
            if not fused:
                normed, gate = original(x, emb)
                image = normed[:, t:]
                plan = site.runtime.plan(site.group, image, ctx.grid, sequence=ctx.sequence)
                if plan.is_identity:
                    return normed, gate
                site.plan, site.route = plan, "cat"
                return torch.cat((normed[:, :t], plan.merge(image)), dim=1), gate
            # The stock forward, op for op: emb -> (shift, scale, gate); ln(x) * (1 + scale) + shift.
            shift, scale, gate = stock.linear(stock.silu(emb)).chunk(3, dim=1)
            ln = stock.norm(x)
            scale, shift = 1 + scale[:, None], shift[:, None]
            image = ln[:, t:]
            plan = site.runtime.plan(
                site.group, image, ctx.grid, lambda v: v * scale + shift, sequence=ctx.sequence
            )
            if plan.is_identity:
                return ln * scale + shift, gate
            site.plan = plan
            prefix = getattr(plan, "prefix", None)
            if prefix is not None:
                site.route = "prefix"
                return ln[:, : t + prefix] * scale + shift, gate
            if not getattr(plan, "convex", False):
                site.route = "cat"
                normed = ln * scale + shift
                return torch.cat((normed[:, :t], plan.merge(normed[:, t:])), dim=1), gate
            site.route = "image_first"
            merged = plan.merge(image)
            n = merged.shape[1]
            if torch.compiler.is_compiling():  # no `out=` into views in graphs; the compiler fuses this
                # the same addcmul as the eager route, so compiled and eager calls round alike
                parts = (torch.addcmul(shift, merged, scale), torch.addcmul(shift, ln[:, :t], scale))
                return torch.cat(parts, dim=1), gate
            out = ln.new_empty(ln.shape[0], n + t, ln.shape[2])
            torch.addcmul(shift, merged, scale, out=out[:, :n])
            torch.addcmul(shift, ln[:, :t], scale, out=out[:, n:])
            return out, gate

        return forward

    return make


def wrap_single_attn(site: Site, rope: Rope, what: str) -> Wrapper:
    """``attn``: the same call on the merged sequence with the merged RoPE table."""

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
            image_first = site.route == "image_first"
            image_rotary_emb = rope.merged(site, plan, image_rotary_emb, t, image_first=image_first)
            return site.attend(
                plan,
                t,
                original,
                hidden_states,
                encoder_hidden_states,
                None,
                image_rotary_emb,
                image_first=image_first,
                **kwargs,
            )

        return forward

    return make


def wrap_single_proj_out(site: Site, proj_out: nn.Module) -> Wrapper:
    """``proj_out``: unmerge the image part of its output.

    On the fused route with a plain ``nn.Linear`` and one sample, the linear writes ``[merged image;
    text]`` into the front of a buffer and the unmerge writes the image right after the text, so
    ``[text; image]`` is a view of that buffer: one batched matmul over the unmodified block.
    """
    linear = fusable_linear(proj_out)
    dense = cast(nn.Linear, proj_out)  # read only on the fused path, which checked the type

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(x: torch.Tensor) -> torch.Tensor:
            plan = site.plan
            if plan is None:
                return original(x)
            site.plan = None
            t = site.ctx.text_len
            if site.route == "prefix":  # [text; kept image] -> zeros for the rest
                return plan.unmerge(original(x))
            if site.route == "cat":
                out = original(x)
                return torch.cat((out[:, :t], plan.unmerge(out[:, t:])), dim=1)
            n = x.shape[1] - t  # merged image tokens, first
            if torch.compiler.is_compiling() or not (
                linear and x.shape[0] == 1 and x.is_contiguous() and x.dtype == proj_out.weight.dtype
            ):
                out = original(x)
                return torch.cat((out[:, n:], plan.unmerge(out[:, :n])), dim=1)
            full = math.prod(site.ctx.grid)
            buf = x.new_empty(1, n + t + full, dense.out_features)
            head = buf[0, : n + t]
            torch.addmm(dense.bias, x[0], dense.weight.t(), out=head)
            plan.unmerge_into(head[:n].unsqueeze(0), buf[:, n + t :])
            return buf[:, n:]

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
            plan = site.runtime.plan(site.group, image, ctx.grid, sequence=ctx.sequence)
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
