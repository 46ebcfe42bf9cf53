"""Flux adapter: token merging inside ``FluxTransformer2DModel``'s double- and single-stream blocks.

Only image tokens are merged; text tokens never are. Placement (the ToMA release's):

- **Double-stream blocks**: the block's ``attn`` is wrapped. It receives the normalised, modulated
  image tokens; they are merged with the group's plan, image Q/K/V are projected from the merged
  tokens, joint attention runs over ``[text; merged image]`` and the image output is unmerged after
  ``to_out`` (exact, since unmerge rows sum to 1). The MLP and the residuals stay full length.
- **Single-stream blocks**: attention *and* the parallel MLP run on ``[text; merged image]``:
  ``norm`` is wrapped to merge the image part of its output, ``attn`` to substitute the merged
  RoPE table, ``proj_out`` to unmerge the image part of its output; gate and residual stay full
  length. The block's own ``forward`` is never replaced.
- **RoPE**: each merged token takes the rotary row of its destination (``plan.positions``); the
  merged table is built once per plan and call and shared by the group's blocks.
- **Plans**: one sharing group per block kind (``double``, ``single``) when the reuse policy shares
  by kind; the plan is computed in the first merged block of the kind from its normalised image
  tokens, later blocks apply it to their own tokens.

Token grid. Flux receives image tokens as ``(B, N, C)``; the ``(H, W)`` grid is found, in order:

1. ``grid`` from the adapter parameters (must satisfy ``H * W == N``);
2. from ``img_ids`` (``(N, 3)``, axis 1 = row, axis 2 = column, raster order), read on the host once
   per distinct ``img_ids`` tensor (one small device read per generation: pipelines pass the same
   tensor at every step);
3. when the transformer runs under ``torch.compile`` nothing can be read from the device: the grid
   last read for the same ``N`` is used, else a square grid when ``N`` is a perfect square, else a
   ``ValueError`` asks for the adapter's ``grid``. Run one eager call at each new resolution before
   the compiled ones: it reads the grid and builds the static index tables outside the graph.

The text length is read from ``encoder_hidden_states`` at every call (nothing assumes 512).
Merging is active only inside the wrapped transformer forward; the blocks called on their own, or
with the handle disabled, run their original code. Attention masks and gradient checkpointing are
not supported while merging (a clear error is raised).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import nn

from tokenreduce.api import begin_call
from tokenreduce.config import instantiate
from tokenreduce.engine.attention import KeyWeightsCache, SizeWeighting, route
from tokenreduce.engine.runtime import Group, IdentityPlan, Runtime, compiled_new_size_message
from tokenreduce.hookspecs import hookimpl
from tokenreduce.interfaces import MergePlan, ModelAdapter, SiteSpec
from tokenreduce.manager import get_registry
from tokenreduce.params import AdapterParams

DOUBLE, SINGLE = "double", "single"

#: Image-token grid at FluxPipeline's default 1024x1024 (8x VAE, 2x2 patches): what apply checks.
DEFAULT_GRID = (64, 64)


# --------------------------------------------------------------------------- per-call state


class CallContext:
    """Set by the transformer's forward wrapper, read by the block wrappers of the same call."""

    def __init__(self) -> None:
        self.on = False  # inside a wrapped transformer call with the runtime enabled
        self.text_len = 0
        self.grid: tuple[int, int] = (0, 0)
        self.sequence = False  # image tokens in region (tile) order in this call
        # group name -> (plan, cos table, merged (cos, sin)); reset every call, so within a call
        # every block of a group reuses the table and a new plan or new RoPE table rebuilds it.
        self.rope: dict[
            tuple[str, bool], tuple[MergePlan, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]
        ] = {}


class Site:
    """One merged block: the runtime, its sharing group and (single blocks) the plan of this call.

    ``weighting``: the block attention's size weighting (``None`` when off); ``weights``: the key
    weights of the group's plan, shared by the group's blocks.
    """

    def __init__(
        self,
        ctx: CallContext,
        runtime: Runtime,
        group: Group,
        weighting: SizeWeighting | None = None,
        weights: KeyWeightsCache | None = None,
    ) -> None:
        self.ctx, self.runtime, self.group = ctx, runtime, group
        self.plan: MergePlan | None = None  # single blocks: set by `norm`, used by `attn` and `proj_out`
        self.weighting, self.weights = weighting, weights
        # single blocks: how `norm` laid out the merged sequence for `attn` and `proj_out`:
        # "cat" = [text; merged image]; "prefix" = [text; first image tokens] (a view);
        # "image_first" = [merged image; text] (merged before the modulation, no concatenation)
        self.route = "cat"

    def attend(
        self,
        plan: MergePlan,
        text_len: int,
        original: Callable[..., Any],
        *args: Any,
        image_first: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``original(*args, **kwargs)`` on ``[text; merged image]`` (or ``[merged image; text]``),
        size-weighted if enabled."""
        if self.weighting is None:
            return original(*args, **kwargs)
        weights = self.weights.get(plan, text_len, text_first=not image_first)
        return self.weighting.call(weights, original, *args, **kwargs)


def merged_rope(site: Site, plan: MergePlan, rope: Any, text_len: int, image_first: bool = False) -> Any:
    """``(cos, sin)`` with the image rows replaced by the rows of ``plan.positions``; text rows kept.

    ``image_first``: the merged sequence is ``[merged image; text]`` (the fused single-block path).
    Built once per plan, table and call; a prefix plan slices the table instead (no kernel).
    """
    if rope is None:
        return None
    cos, sin = rope
    if getattr(plan, "prefix", None) is not None and not image_first:
        end = text_len + plan.prefix
        return cos[:end], sin[:end]
    cached = site.ctx.rope.get((site.group.name, image_first))
    if cached is not None and cached[0] is plan and cached[1] is cos:
        return cached[2]
    positions = plan.positions
    if positions is None:
        raise ValueError(
            f"merger {site.group.merger.name!r} gives no `positions` for its merged tokens; Flux needs them for RoPE"
        )

    def rows(table: torch.Tensor) -> torch.Tensor:
        text, image = table[:text_len], table[text_len:].index_select(0, positions)
        return torch.cat((image, text) if image_first else (text, image), dim=0)

    merged = (rows(cos), rows(sin))
    site.ctx.rope[(site.group.name, image_first)] = (plan, cos, merged)
    return merged


def _no_mask(attention_mask: Any) -> None:
    if attention_mask is not None:
        raise ValueError(
            "Flux token merging does not support an attention_mask (the merged sequence is shorter)"
        )


# --------------------------------------------------------------------------- wrappers


def wrap_double_attn(site: Site) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``attn`` of a double-stream block: merged image Q/K/V, image output unmerged after ``to_out``."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            image_rotary_emb: Any = None,
            **kwargs: Any,
        ) -> Any:
            ctx = site.ctx
            if not ctx.on:
                return original(
                    hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs
                )
            plan = site.runtime.plan(site.group, hidden_states, ctx.grid, sequence=ctx.sequence)
            if isinstance(plan, IdentityPlan):
                return original(
                    hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb, **kwargs
                )
            _no_mask(attention_mask)
            text_len = encoder_hidden_states.shape[1]
            rope = merged_rope(site, plan, image_rotary_emb, text_len)
            merged = plan.merge(hidden_states)
            out = site.attend(plan, text_len, original, merged, encoder_hidden_states, None, rope, **kwargs)
            if len(out) == 3:  # IP-adapter: its output is per (merged) image query too
                return plan.unmerge(out[0]), out[1], plan.unmerge(out[2])
            return plan.unmerge(out[0]), out[1]

        return forward

    return make


def fusable_norm(norm: nn.Module) -> bool:
    """Whether a single block's ``norm`` is diffusers' ``AdaLayerNormZeroSingle`` itself (its forward is
    reproduced op for op on the fused path; subclasses and replacements take the generic path)."""
    from diffusers.models.normalization import AdaLayerNormZeroSingle

    return type(norm) is AdaLayerNormZeroSingle and isinstance(getattr(norm, "linear", None), nn.Linear)


def fusable_linear(proj_out: nn.Module) -> bool:
    """Whether ``proj_out`` is a plain ``nn.Linear`` with a bias (computed into a buffer on the fused path)."""
    return type(proj_out) is nn.Linear and proj_out.bias is not None


def wrap_single_norm(site: Site, norm: nn.Module) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``norm`` of a single-stream block: plan from its image tokens, output the merged sequence.

    Generic path: ``[text; merge(image)]`` (one concatenation). For convex plans (merge rows sum to
    1) and the stock norm, the image tokens are merged *before* the modulation
    ``ln * (1 + scale) + shift`` (equal up to rounding), and the two modulations write
    ``[merged image; text]`` straight into one buffer: one batched matmul and no concatenation over
    the unmodified block. A prefix plan (the ideal) modulates only the kept tokens (a view).
    """
    fused = fusable_norm(norm)

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
                if isinstance(plan, IdentityPlan):
                    return normed, gate
                site.plan, site.route = plan, "cat"
                return torch.cat((normed[:, :t], plan.merge(image)), dim=1), gate
            # The stock forward, op for op: emb -> (shift, scale, gate); ln(x) * (1 + scale) + shift.
            shift, scale, gate = norm.linear(norm.silu(emb)).chunk(3, dim=1)
            ln = norm.norm(x)
            scale, shift = 1 + scale[:, None], shift[:, None]
            image = ln[:, t:]
            plan = site.runtime.plan(
                site.group, image, ctx.grid, lambda v: v * scale + shift, sequence=ctx.sequence
            )
            if isinstance(plan, IdentityPlan):
                return ln * scale + shift, gate
            site.plan = plan
            if getattr(plan, "prefix", None) is not None:
                site.route = "prefix"
                return ln[:, : t + plan.prefix] * scale + shift, gate
            if not getattr(plan, "convex", False):
                site.route = "cat"
                normed = ln * scale + shift
                return torch.cat((normed[:, :t], plan.merge(normed[:, t:])), dim=1), gate
            site.route = "image_first"
            merged = plan.merge(image)
            n = merged.shape[1]
            if torch.compiler.is_compiling():  # no `out=` into views in graphs; the compiler fuses this
                return torch.cat((merged * scale + shift, ln[:, :t] * scale + shift), dim=1), gate
            out = ln.new_empty(ln.shape[0], n + t, ln.shape[2])
            torch.addcmul(shift, merged, scale, out=out[:, :n])
            torch.addcmul(shift, ln[:, :t], scale, out=out[:, n:])
            return out, gate

        return forward

    return make


def wrap_single_attn(site: Site) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``attn`` of a single-stream block: the same call with the merged RoPE table."""

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
            _no_mask(attention_mask)
            t = site.ctx.text_len
            image_first = site.route == "image_first"
            image_rotary_emb = merged_rope(site, plan, image_rotary_emb, t, image_first=image_first)
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


def wrap_single_proj_out(
    site: Site, proj_out: nn.Module
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``proj_out`` of a single-stream block: unmerge the image part of its output.

    On the fused route with a plain ``nn.Linear`` and one sample, the linear writes ``[merged image;
    text]`` into the front of a buffer and the unmerge writes the image right after the text, so
    ``[text; image]`` is a view of that buffer: one batched matmul over the unmodified block.
    """
    linear = fusable_linear(proj_out)

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
            buf = x.new_empty(1, n + t + full, proj_out.out_features)
            head = buf[0, : n + t]
            torch.addmm(proj_out.bias, x[0], proj_out.weight.t(), out=head)
            plan.unmerge_into(head[:n].unsqueeze(0), buf[:, n + t :])
            return buf[:, n:]

        return forward

    return make


# --------------------------------------------------------------------------- token grid


def grid_from_ids(img_ids: torch.Tensor, num_tokens: int) -> tuple[int, int]:
    """``(H, W)`` of raster-ordered Flux image ids (one device read); ``ValueError`` otherwise."""
    hint = "set the flux adapter's `grid: [H, W]`"
    if img_ids.ndim != 2 or img_ids.shape[0] != num_tokens or img_ids.shape[1] < 3:
        raise ValueError(
            f"img_ids of shape {tuple(img_ids.shape)} do not describe {num_tokens} image tokens; {hint}"
        )
    rc = img_ids[:, 1:3].to(device="cpu", dtype=torch.float64)
    rows, cols = rc[:, 0] - rc[:, 0].min(), rc[:, 1] - rc[:, 1].min()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    raster = torch.arange(num_tokens, dtype=torch.float64)
    if h * w != num_tokens or not (
        torch.equal(rows, raster.div(w, rounding_mode="floor")) and torch.equal(cols, raster % w)
    ):
        raise ValueError(f"img_ids are not a raster-ordered grid of {num_tokens} tokens; {hint}")
    return h, w


class GridResolver:
    """The ``(H, W)`` image-token grid of a call (see the module docstring for the order)."""

    def __init__(self, explicit: list[int] | None) -> None:
        self.explicit = None if explicit is None else (explicit[0], explicit[1])
        self._last: tuple[tuple, tuple[int, int]] | None = None
        self.by_tokens: dict[int, tuple[int, int]] = {}

    def __call__(self, img_ids: torch.Tensor | None, num_tokens: int) -> tuple[int, int]:
        if self.explicit is not None:
            h, w = self.explicit
            if h * w != num_tokens:
                raise ValueError(f"the flux adapter's grid {h}x{w} does not match {num_tokens} image tokens")
            return self.explicit
        # Nothing can be read from the device inside a graph, nor from meta tensors (op counting).
        if torch.compiler.is_compiling() or img_ids is None or img_ids.device.type == "meta":
            if torch.compiler.is_compiling():
                num_tokens = int(num_tokens)  # specialise dynamic shapes: layouts are static per size
                if num_tokens not in self.by_tokens:
                    raise ValueError(compiled_new_size_message(f"an image of {num_tokens} tokens"))
            grid = self.by_tokens.get(num_tokens)
            if grid is None:
                side = math.isqrt(num_tokens)
                if side * side != num_tokens:
                    raise ValueError(
                        f"cannot infer the token grid of {num_tokens} image tokens without reading img_ids; "
                        "set the flux adapter's `grid: [H, W]` (or run one eager call first)"
                    )
                grid = (side, side)
            return grid
        if img_ids.ndim == 3:  # deprecated batched ids; diffusers uses the first
            img_ids = img_ids[0]
        # Inference tensors have no version counter (an in-place edit of one is not noticed).
        version = -1 if img_ids.is_inference() else img_ids._version
        key = (tuple(img_ids.shape), img_ids.device, img_ids.data_ptr(), version)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        grid = grid_from_ids(img_ids, num_tokens)
        self._last = (key, grid)
        self.by_tokens[num_tokens] = grid
        return grid


def to_raster(out: Any, inverse: torch.Tensor) -> Any:
    """The transformer's output (a tuple or an output object) with its sample back in raster order."""
    if isinstance(out, tuple):
        return (out[0].index_select(1, inverse), *out[1:])
    out.sample = out.sample.index_select(1, inverse)
    return out


def wrap_transformer(
    model: nn.Module, runtime: Runtime, ctx: CallContext, grids: GridResolver
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """The denoiser's forward: advance the step clock and set the per-call context."""

    def make(original: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(original)
        def forward(
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            pooled_projections: torch.Tensor | None = None,
            timestep: torch.Tensor | None = None,
            img_ids: torch.Tensor | None = None,
            txt_ids: torch.Tensor | None = None,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            if runtime.switched_on:  # the clock runs on steps that do not merge too
                begin_call(runtime, timestep)
            if not runtime.enabled:
                return original(
                    hidden_states,
                    encoder_hidden_states,
                    pooled_projections,
                    timestep,
                    img_ids,
                    txt_ids,
                    *args,
                    **kwargs,
                )
            if model.gradient_checkpointing and torch.is_grad_enabled():
                raise ValueError(
                    "Flux token merging does not support gradient checkpointing; disable one of them"
                )
            ctx.grid = grids(img_ids, hidden_states.shape[1])
            ctx.text_len = encoder_hidden_states.shape[1]
            ctx.rope = {}
            # Image tokens tile by tile for the whole call: merge and unmerge need no gather in any
            # block, and RoPE comes out in the same order from the permuted ids (three small gathers
            # per call instead of two per merged block). Positional extra arguments may hold
            # ControlNet residuals in raster order: then the tokens stay in raster order.
            order = runtime.region_order(ctx.grid, hidden_states.device) if len(args) <= 2 else None
            ctx.sequence = order is not None
            if order is not None:
                perm = order[0]
                hidden_states = hidden_states.index_select(1, perm)
                img_ids = None if img_ids is None else img_ids.index_select(-2, perm)
                for key in ("controlnet_block_samples", "controlnet_single_block_samples"):
                    if kwargs.get(key) is not None:
                        kwargs[key] = [None if r is None else r.index_select(1, perm) for r in kwargs[key]]
            ctx.on = True
            try:
                out = original(
                    hidden_states,
                    encoder_hidden_states,
                    pooled_projections,
                    timestep,
                    img_ids,
                    txt_ids,
                    *args,
                    **kwargs,
                )
            finally:
                ctx.on = False
            if order is None:
                return out
            return to_raster(out, order[1])

        return forward

    return make


# --------------------------------------------------------------------------- adapter


class FluxAdapter(ModelAdapter):
    """Flux transformer (``FluxTransformer2DModel``): double- and single-stream blocks."""

    name = "flux"
    default_preset = "toma-flux"
    timestep_scale = 1.0  # the pipeline passes t / 1000

    class Params(AdapterParams):
        name: Literal["flux"] = "flux"
        skip_double: int = Field(5, ge=0, description="The first N double-stream blocks are not merged.")
        skip_single: int = Field(5, ge=0, description="The first N single-stream blocks are not merged.")
        double: bool = Field(True, description="Merge in double-stream blocks at all.")
        single: bool = Field(True, description="Merge in single-stream blocks at all.")
        blocks: list[int] | None = Field(
            None,
            description=(
                "Explicit blocks to merge, as indices into [double blocks..., single blocks...]; overrides "
                "skip_double/skip_single (double/single still apply)."
            ),
        )
        grid: list[int] | None = Field(
            None,
            description=(
                "[H, W] image-token grid, for img_ids that are not a raster grid or cannot be read (compiled "
                "calls at a non-square size never run eagerly). Default: read from img_ids."
            ),
        )

        @field_validator("blocks")
        @classmethod
        def _check_blocks(cls, value: list[int] | None) -> list[int] | None:
            if value is not None and any(i < 0 for i in value):
                raise ValueError(f"block indices must be >= 0, got {value}")
            return value

        @field_validator("grid")
        @classmethod
        def _check_grid(cls, value: list[int] | None) -> list[int] | None:
            if value is not None and (len(value) != 2 or min(value) < 1):
                raise ValueError(f"grid must be [H, W] with positive sides, got {value}")
            return value

    @classmethod
    def matches(cls, model: nn.Module) -> bool:
        from diffusers import FluxTransformer2DModel  # lazy: keeps plugin discovery light

        return isinstance(model, FluxTransformer2DModel)

    # ---- selection (host, set-up time) ----

    def selected(self, model: nn.Module) -> tuple[list[int], list[int]]:
        """Indices of the merged double-stream and single-stream blocks."""
        p = self.params
        n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
        if p.blocks is None:
            double = list(range(p.skip_double, n_double))
            single = list(range(p.skip_single, n_single))
        else:
            chosen = set(p.blocks)
            double = [i for i in range(n_double) if i in chosen]
            single = [j for j in range(n_single) if n_double + j in chosen]
        return (double if p.double else []), (single if p.single else [])

    def check(self, config: Any) -> None:
        merger = get_registry().get("merger", config.merger.name)
        if merger.kv_only:
            raise ValueError(
                f"kv_only mergers are not supported on Flux joint attention: merger {merger.name!r} only "
                "shortens keys/values, while the flux adapter merges the image tokens themselves (queries "
                "included) and needs a merger that can unmerge"
            )

    def validate(self, model: nn.Module, config: Any) -> None:
        self.check(config)
        p = self.params
        n_double, n_single = len(model.transformer_blocks), len(model.single_transformer_blocks)
        if p.blocks is not None and any(i >= n_double + n_single for i in p.blocks):
            raise ValueError(
                f"blocks {p.blocks} out of range: the model has {n_double} double-stream and {n_single} "
                f"single-stream blocks (indices 0..{n_double + n_single - 1})"
            )
        double, single = self.selected(model)
        if p.size_weighting:
            for path, attn in [
                (f"transformer_blocks.{i}", model.transformer_blocks[i].attn) for i in double
            ] + [(f"single_transformer_blocks.{j}", model.single_transformer_blocks[j].attn) for j in single]:
                try:
                    route(attn)
                except ValueError as exc:
                    raise ValueError(f"{path}.attn: {exc}") from None
        if not double and not single:
            raise ValueError(
                f"the block filter selects no block: the model has {n_double} double-stream and {n_single} "
                f"single-stream blocks (skip_double={p.skip_double}, skip_single={p.skip_single}, "
                f"double={p.double}, single={p.single}, blocks={p.blocks})"
            )

    def sites(self, model: nn.Module, config: Any) -> list[SiteSpec]:
        per_block = instantiate("reuse", config.reuse).sharing == "block"
        grid = DEFAULT_GRID if self.params.grid is None else (self.params.grid[0], self.params.grid[1])
        double, single = self.selected(model)
        specs = []
        for kind, paths in (
            (DOUBLE, [f"transformer_blocks.{i}" for i in double]),
            (SINGLE, [f"single_transformer_blocks.{j}" for j in single]),
        ):
            for path in paths:
                site_path = f"{path}.attn" if kind == DOUBLE else path
                specs.append(
                    SiteSpec(path=site_path, site=kind, group=path if per_block else kind, grid=grid)
                )
        return specs

    def grids_for(self, model: nn.Module, height: int, width: int) -> dict[str, tuple[int, int]]:
        """Token grid per group for an image of ``height x width`` pixels (8x VAE, 2x2 patches)."""
        grid = (height // 16, width // 16)
        return {DOUBLE: grid, SINGLE: grid} | {s.group: grid for s in self.sites_for_groups(model)}

    def sites_for_groups(self, model: nn.Module) -> list[SiteSpec]:
        double, single = self.selected(model)
        return [
            SiteSpec(f"transformer_blocks.{i}", DOUBLE, f"transformer_blocks.{i}", None) for i in double
        ] + [
            SiteSpec(f"single_transformer_blocks.{j}", SINGLE, f"single_transformer_blocks.{j}", None)
            for j in single
        ]

    # ---- installation ----

    def install(self, model: nn.Module, runtime: Runtime, patches: Any) -> None:
        ctx = CallContext()
        double, single = self.selected(model)
        total = len(double) + len(single)
        place = 0

        weights: dict[str, KeyWeightsCache] = {}  # one per group: key weights built once per plan

        def site_for(kind: str, block: str, attn: nn.Module) -> Site:
            nonlocal place
            position = place / (total - 1) if total > 1 else 0.0
            place += 1
            group = runtime.group(kind, block, position)
            if not self.params.size_weighting:
                return Site(ctx, runtime, group)
            cache = weights.setdefault(group.name, KeyWeightsCache())
            return Site(ctx, runtime, group, SizeWeighting(attn, patches), cache)

        for i in double:
            block = model.transformer_blocks[i]
            site = site_for(DOUBLE, f"transformer_blocks.{i}", block.attn)
            patches.wrap_forward(block.attn, wrap_double_attn(site))
        for j in single:
            block = model.single_transformer_blocks[j]
            site = site_for(SINGLE, f"single_transformer_blocks.{j}", block.attn)
            patches.wrap_forward(block.norm, wrap_single_norm(site, block.norm))
            patches.wrap_forward(block.attn, wrap_single_attn(site))
            patches.wrap_forward(block.proj_out, wrap_single_proj_out(site, block.proj_out))
        self._grids = GridResolver(self.params.grid)
        patches.wrap_forward(model, wrap_transformer(model, runtime, ctx, self._grids))

    def prepare(self, model: nn.Module, runtime: Runtime, height: int, width: int) -> None:
        super().prepare(model, runtime, height, width)
        grid = (height // 16, width // 16)
        resolver = getattr(self, "_grids", None)
        if resolver is not None:  # compiled calls cannot read img_ids: tell them this size's grid
            resolver.by_tokens[grid[0] * grid[1]] = grid


@hookimpl
def tokenreduce_register(registry: Any) -> None:
    registry.add(FluxAdapter)
    registry.add_preset(
        "toma-flux",
        "tokenreduce.toma_plugin.presets",
        "toma-flux.yaml",
        "ToMA on Flux: r=0.5 at every 3rd step from step 2, facility location on 4x4 tiles, attention merge",
    )
    registry.add_preset(
        "toma-flux-fast",
        "tokenreduce.toma_plugin.presets",
        "toma-flux-fast.yaml",
        "ToMA on Flux, faster than toma-flux: r=0.5 at every 2nd step, same components",
    )
