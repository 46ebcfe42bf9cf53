"""A run of consecutive single-stream blocks merged once: merge before the first, unmerge after the last.

Opt-in placement (the per-block single-stream site is the default). The image tokens are merged
when they enter the run's first block; every block of the run (attention, MLP, gate and residual)
then works on ``[text; merged image]``, and after the run's last block only the run's update is
unmerged: ``x + U(blocks(M x) - M x)`` for the image tokens, the text tokens as the blocks leave
them (they are never merged). Exact when nothing is merged; otherwise the residual stream inside
the run is carried merged, which is an approximation beyond the per-block placement (whose
residuals stay full length). In return a run costs one merge and one unmerge instead of one of
each per block, as the UNet transformer stacks do (``x + U(blocks(M x) - M x)``).

Two block shapes, told apart by their arguments:

- **separate streams** (Flux): ``block(hidden_states=image, encoder_hidden_states=text, ...)``
  returning ``(text, image)``;
- **joint sequence** (Flux.2): ``block(hidden_states=[text; image], encoder_hidden_states=None,
  ...)`` returning ``[text; image]`` (or ``(text, image)`` when it splits).

The plan is computed in the run's first block from the tokens its ``norm`` gives (``source``, only
when a plan is computed). Each block's ``attn`` is wrapped to take the merged RoPE table (built
once per plan and call, see :mod:`.rope`) and, with size weighting, to weigh the merged keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

from tokenreduce.engine.sites.call import Site, Wrapper, no_mask
from tokenreduce.engine.sites.rope import Rope
from tokenreduce.interfaces import MergePlan

#: ``(block's positional args after encoder_hidden_states, kwargs) -> (image tokens -> plan features)``
Source = Callable[[tuple[Any, ...], dict[str, Any]], Callable[[torch.Tensor], torch.Tensor] | None]


class RunCell:
    """What the first block of a merged run hands to the blocks after it, within one call."""

    __slots__ = ("merged", "plan", "residual")

    def __init__(self) -> None:
        self.plan: MergePlan | None = None
        self.residual: torch.Tensor | None = None  # the run's image input, full length
        self.merged: torch.Tensor | None = None  # M of it: the run's merged residual at entry


def runs(indices: list[int]) -> list[list[int]]:
    """``indices`` (sorted) split into runs of consecutive ones."""
    out: list[list[int]] = []
    for i in indices:
        if out and out[-1][-1] == i - 1:
            out[-1].append(i)
        else:
            out.append([i])
    return out


def wrap_run_block(site: Site, cell: RunCell, first: bool, last: bool, source: Source) -> Wrapper:
    """A block's ``forward`` at the start (``first``) and/or end (``last``) of a merged run."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            ctx = site.ctx
            joint = encoder_hidden_states is None  # [text; image] in one sequence
            t = ctx.text_len
            if first:
                cell.plan = None  # nothing carried over from a call that did not merge
                if not ctx.on:
                    return original(hidden_states, encoder_hidden_states, *args, **kwargs)
                image = hidden_states[:, t:] if joint else hidden_states
                plan = site.runtime.plan(
                    site.group, image, ctx.grid, source(args, kwargs), sequence=ctx.sequence
                )
                if plan.is_identity:
                    return original(hidden_states, encoder_hidden_states, *args, **kwargs)
                merged = plan.merge(image)
                cell.plan, cell.residual, cell.merged = plan, image, merged
                hidden_states = torch.cat((hidden_states[:, :t], merged), dim=1) if joint else merged
            out = original(hidden_states, encoder_hidden_states, *args, **kwargs)
            running, residual, entered = cell.plan, cell.residual, cell.merged
            if not last or running is None or residual is None or entered is None or not ctx.on:
                return out
            cell.plan = cell.residual = cell.merged = None  # hold no activations past the call
            if isinstance(out, tuple):  # (text, merged image)
                return (out[0], running.residual_update(residual, entered, out[1]), *out[2:])
            return torch.cat((out[:, :t], running.residual_update(residual, entered, out[:, t:])), dim=1)

        return forward

    return make


def wrap_run_attn(site: Site, cell: RunCell, rope: Rope, what: str) -> Wrapper:
    """``attn`` of a block inside a merged run: the merged RoPE table, size weighting when on."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            plan = cell.plan
            if plan is None or not site.ctx.on:  # (a plan left by a call that failed mid-run)
                return original(hidden_states, *args, **kwargs)
            if args:  # the blocks pass everything by keyword; positional arguments are not expected
                raise TypeError(f"{what}: unexpected positional arguments to attention")
            no_mask(kwargs.get("attention_mask"), what)
            t = site.ctx.text_len
            if kwargs.get(rope.arg) is not None:
                kwargs[rope.arg] = rope.merged(site, plan, kwargs[rope.arg], t)
            return site.attend(plan, t, original, hidden_states, **kwargs)

        return forward

    return make
