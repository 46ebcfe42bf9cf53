"""Rotary tables for merged image tokens: each merged token takes its destination's row.

The merged table is built once per plan and call and shared by every block of the sharing group
(``CallContext.rope``). Layouts differ between models; a :class:`Rope` says which one a model uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenreduce.engine.sites.call import Site
from tokenreduce.interfaces import MergePlan


@dataclass(frozen=True)
class Rope:
    """How a model passes its rotary table to attention.

    ``layout``:

    - ``"joint"``: a tuple of tables whose rows cover the joint sequence, text rows first when
      ``text_first`` (Flux, Flux.2) else image rows first;
    - ``"split"``: ``(image table, text table)`` (Qwen-Image); only the image table changes;
    - ``"none"``: no rotary embedding (SD3); the argument is passed through.
    """

    layout: str = "joint"
    text_first: bool = True
    arg: str = "image_rotary_emb"  # the attention module's keyword for the table

    def __post_init__(self) -> None:
        if self.layout not in ("joint", "split", "none"):
            raise ValueError(f"unknown RoPE layout {self.layout!r}; valid: joint, split, none")

    def merged(self, site: Site, plan: MergePlan, rope: Any, text_len: int, image_first: bool = False) -> Any:
        """The table for ``[text; merged image]`` (or the split pair), cached per group and call.

        ``image_first``: a joint table for the sequence ``[merged image; text]`` (the fused
        single-block path). A prefix plan slices the table instead (no kernel).
        """
        if rope is None or self.layout == "none":
            return rope
        first = rope[0]
        prefix = getattr(plan, "prefix", None)
        if prefix is not None and not image_first and self.layout == "joint" and self.text_first:
            return tuple(t[: text_len + prefix] for t in rope)  # [text; kept image]: a slice
        key = (site.group.name, image_first)
        cached = site.ctx.rope.get(key)
        if cached is not None and cached[0] is plan and cached[1] is first:
            return cached[2]
        positions = plan.positions
        if positions is None:
            raise ValueError(
                f"merger {site.group.merger.name!r} gives no `positions` for its merged tokens; "
                "this model's rotary embedding needs them"
            )
        if self.layout == "split":
            merged: Any = (rope[0].index_select(0, positions), *rope[1:])
        elif self.text_first:

            def rows(t: torch.Tensor) -> torch.Tensor:
                text, image = t[:text_len], t[text_len:].index_select(0, positions)
                return torch.cat((image, text) if image_first else (text, image), dim=0)

            merged = tuple(rows(t) for t in rope)
        else:
            n = first.shape[0] - text_len
            merged = tuple(torch.cat((t[:n].index_select(0, positions), t[n:]), dim=0) for t in rope)
        site.ctx.rope[key] = (plan, first, merged)
        return merged


def merged_rope(site: Site, plan: MergePlan, rope: Any, text_len: int) -> Any:
    """``(cos, sin)`` over ``[text; image]`` with the image rows replaced by ``plan.positions``' rows."""
    return JOINT_TEXT_FIRST.merged(site, plan, rope, text_len)


JOINT_TEXT_FIRST = Rope("joint", text_first=True)
NO_ROPE = Rope("none")
