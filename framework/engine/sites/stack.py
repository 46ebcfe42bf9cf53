"""A model adapter for transformers made of block stacks: the adapter declares, this class does.

A subclass names its stacks (module list, site kind, the ``Params`` fields that skip or disable
it), its RoPE layout and how to read a call (timestep, token grid, text length); block selection,
validation, site specs, installation and grid prediction are shared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from tokenreduce.config import instantiate
from tokenreduce.engine.attention import KeyWeightsCache, SizeWeighting, route
from tokenreduce.engine.sites.call import CallContext, CallInfo, Reorder, Site, Wrapper, wrap_denoiser
from tokenreduce.engine.sites.grid import GridResolver
from tokenreduce.engine.sites.joint_stream import wrap_image_ff, wrap_image_self_attn, wrap_joint_attn
from tokenreduce.engine.sites.rope import Rope
from tokenreduce.engine.sites.run import RunCell, Source, runs, wrap_run_attn, wrap_run_block
from tokenreduce.engine.sites.single_stream import (
    wrap_single_attn,
    wrap_single_fused,
    wrap_single_norm,
    wrap_single_proj_out,
)
from tokenreduce.interfaces import ModelAdapter, SiteSpec
from tokenreduce.manager import get_registry
from tokenreduce.params import AdapterParams

if TYPE_CHECKING:
    from tokenreduce.config import ConfigBase
    from tokenreduce.engine.patch import PatchSet
    from tokenreduce.engine.runtime import Group, Runtime

SiteKind = Literal["joint", "single_split", "single_fused"]


@dataclass(frozen=True)
class Stack:
    """One stack of blocks: ``model.<attr>[i]``, merged as ``site`` in sharing group ``kind``."""

    kind: str  # block kind: the sharing group and the site name in `explain`
    attr: str  # the model's module list
    site: SiteKind
    skip: str | None = None  # Params field: the first N blocks are not merged
    enable: str | None = None  # Params field: merge in this stack at all
    noun: str = "transformer"  # in messages: "<n> <noun> blocks"
    extra_self: str | None = None  # joint blocks: an optional image-only self-attention on the same tokens
    #: Params field (bool), joint blocks: the image stream's feed-forward ``ff`` runs on merged tokens too.
    image_ff: str | None = None
    #: Params field, single-stream blocks: ``"block"`` merges in each block, ``"run"`` once around each
    #: run of consecutive merged blocks (:mod:`.run`).
    placement: str | None = None


def site_name(stack: Stack, params: object) -> str:
    """The site name ``explain`` and ``bench --ops`` show for a stack's merged blocks."""
    if stack.image_ff and getattr(params, stack.image_ff):
        return f"{stack.kind}_ff"
    if stack.placement and getattr(params, stack.placement) == "run":
        return f"{stack.kind}_run"
    return stack.kind


#: What the opt-in site names (:func:`site_name`) mean, for ``explain``.
PLACEMENT_NOTES = {
    "_run": "merged once around each run of consecutive merged blocks (the residual stream is carried "
    "merged inside a run: opt-in, approximate)",
    "_ff": "the image feed-forward runs on merged tokens too, besides the attention (opt-in)",
}


def placement_notes(sites: list[SiteSpec]) -> list[str]:
    """One line per opt-in placement among ``sites``: ``"<site>: <what it does>"``."""
    names = sorted({s.site for s in sites})
    return [f"{n}: {note}" for n in names for suffix, note in PLACEMENT_NOTES.items() if n.endswith(suffix)]


def run_source(stack: Stack, block: nn.Module) -> Source:
    """The tokens a merged run's plan is computed from: what the first block's ``norm`` makes of them
    (split blocks: the modulated norm, from the block's ``temb``; fused: the norm before modulation)."""
    norm = _child(block, "norm")
    if stack.site == "single_split":

        def split(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
            temb = kwargs["temb"] if "temb" in kwargs else args[0]
            return lambda v: norm(v, emb=temb)[0]

        return split

    def fused(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[torch.Tensor], torch.Tensor]:
        return norm

    return fused


def check_blocks(value: list[int] | None) -> list[int] | None:
    """Validator of a ``blocks`` parameter."""
    if value is not None and any(i < 0 for i in value):
        raise ValueError(f"block indices must be >= 0, got {value}")
    return value


def check_grid(value: list[int] | None) -> list[int] | None:
    """Validator of a ``grid`` parameter."""
    if value is not None and (len(value) != 2 or min(value) < 1):
        raise ValueError(f"grid must be [H, W] with positive sides, got {value}")
    return value


def _child(module: nn.Module, name: str) -> nn.Module:
    """The sub-module ``module.<name>`` (``nn.Module`` types its attributes ``Tensor | Module``)."""
    return getattr(module, name)


class StackedTransformerAdapter(ModelAdapter):
    """Shared mechanics; subclasses set the class attributes and :meth:`reader`."""

    stacks: ClassVar[tuple[Stack, ...]]
    rope: ClassVar[Rope]
    label: ClassVar[str]  # the model's name in error messages
    #: Image size (pixels) of the pipeline's default call: ``apply`` checks the site grids at it.
    default_size: ClassVar[int] = 1024
    shared_positions: ClassVar[bool] = True  # RoPE rows of merged tokens: one table for the batch
    #: Joint attention's key order: ``[text; image]`` (else ``[image; text]``), for size weighting.
    text_first: ClassVar[bool] = True
    _grids: GridResolver | None = None

    def reader(self, model: nn.Module) -> Callable[..., CallInfo]:
        """A function with the denoiser's forward signature returning the call's :class:`CallInfo`."""
        raise NotImplementedError

    def token_grid(self, model: nn.Module, height: int, width: int) -> tuple[int, int]:
        """Image-token grid of a ``height x width`` pixel image (8x VAE, 2x2 patches by default)."""
        return (height // 16, width // 16)

    # ---- selection (host, set-up time) ----

    def _blocks(self, model: nn.Module, stack: Stack) -> nn.ModuleList:
        return getattr(model, stack.attr)

    def selected(self, model: nn.Module) -> tuple[list[int], ...]:
        """Indices of the merged blocks, per stack."""
        p = self.params
        explicit: list[int] | None = getattr(p, "blocks", None)
        out, offset = [], 0
        for stack in self.stacks:
            n = len(self._blocks(model, stack))
            if explicit is None:
                skip = getattr(p, stack.skip) if stack.skip else 0
                chosen = list(range(skip, n))
            else:
                wanted = set(explicit)
                chosen = [i for i in range(n) if offset + i in wanted]
            out.append(chosen if (stack.enable is None or getattr(p, stack.enable)) else [])
            offset += n
        return tuple(out)

    def _counts(self, model: nn.Module) -> str:
        return " and ".join(f"{len(self._blocks(model, s))} {s.noun}" for s in self.stacks) + " blocks"

    def check(self, config: ConfigBase) -> None:
        merger = get_registry().get("merger", config.merger.name)
        if merger.kv_only:
            raise ValueError(
                f"kv_only mergers are not supported on {self.label} joint attention: merger {merger.name!r} "
                f"only shortens keys/values, while the {self.name} adapter merges the image tokens themselves "
                "(queries included) and needs a merger that can unmerge"
            )

    def validate(self, model: nn.Module, config: ConfigBase) -> None:
        self.check(config)
        total = sum(len(self._blocks(model, s)) for s in self.stacks)
        blocks = getattr(self.params, "blocks", None)
        if blocks is not None and any(i >= total for i in blocks):
            raise ValueError(
                f"blocks {blocks} out of range: the model has {self._counts(model)} (indices 0..{total - 1})"
            )
        if not any(self.selected(model)):
            settings = ", ".join(
                f"{k}={v}" for k, v in self.params.model_dump().items() if k not in ("name", "grid")
            )
            raise ValueError(
                f"the block filter selects no block: the model has {self._counts(model)} ({settings})"
            )
        for stack, path in self._paths(model):
            ff = getattr(model.get_submodule(path), "ff", None)
            if stack.image_ff and getattr(self.params, stack.image_ff) and not isinstance(ff, nn.Module):
                raise ValueError(f"{path} has no image feed-forward `ff` to merge ({stack.image_ff})")
        if getattr(self.params, "size_weighting", False):
            for path, attn in self._attentions(model):
                try:
                    route(attn)
                except ValueError as exc:
                    raise ValueError(f"{path}: {exc}") from None

    def _attentions(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The attention modules that see merged keys, with their paths."""
        found = []
        for stack, path in self._paths(model):
            block = model.get_submodule(path)
            found.append((f"{path}.attn", _child(block, "attn")))
            extra = getattr(block, stack.extra_self, None) if stack.extra_self else None
            if extra is not None:
                found.append((f"{path}.{stack.extra_self}", extra))
        return found

    def _paths(self, model: nn.Module) -> list[tuple[Stack, str]]:
        return [
            (stack, f"{stack.attr}.{i}")
            for stack, chosen in zip(self.stacks, self.selected(model), strict=True)
            for i in chosen
        ]

    def sites(self, model: nn.Module, config: ConfigBase) -> list[SiteSpec]:
        per_block = instantiate("reuse", config.reuse).sharing == "block"
        g = getattr(self.params, "grid", None)
        size = self.default_size
        grid = self.token_grid(model, size, size) if g is None else (g[0], g[1])
        firsts = {path: first for _, first, path in self._runs(model)}
        return [
            SiteSpec(
                path=f"{path}.attn" if stack.site == "joint" else path,
                site=site_name(stack, self.params),
                group=(firsts.get(path, path) if per_block else stack.kind),
                grid=grid,
            )
            for stack, path in self._paths(model)
        ]

    def _runs(self, model: nn.Module) -> list[tuple[Stack, str, str]]:
        """``(stack, first block's path, block's path)`` of every block merged in a run (the
        ``placement: run`` stacks)."""
        out = []
        for stack, chosen in zip(self.stacks, self.selected(model), strict=True):
            if stack.placement and getattr(self.params, stack.placement) == "run":
                for run in runs(chosen):
                    out += [(stack, f"{stack.attr}.{run[0]}", f"{stack.attr}.{i}") for i in run]
        return out

    def grids_for(self, model: nn.Module, height: int, width: int, **size: int) -> dict[str, tuple[int, ...]]:
        grid: tuple[int, ...] = self.token_grid(model, height, width)
        return {s.kind: grid for s in self.stacks} | {path: grid for _, path in self._paths(model)}

    # ---- installation ----

    def install(self, model: nn.Module, runtime: Runtime, patches: PatchSet) -> None:
        ctx = CallContext()
        paths = self._paths(model)
        what = self.label
        weighted = bool(getattr(self.params, "size_weighting", False))
        caches: dict[str, KeyWeightsCache] = {}  # one per group: key weights built once per plan

        def site_for(group: Group, attn: nn.Module) -> Site:
            if not weighted:
                return Site(ctx, runtime, group)
            cache = caches.setdefault(group.name, KeyWeightsCache())
            return Site(ctx, runtime, group, SizeWeighting(attn, patches), cache, self.text_first)

        in_run = {path: first for _, first, path in self._runs(model)}
        last_of_run = {first: path for path, first in in_run.items()}  # ascending: the last wins
        cells: dict[str, RunCell] = {}
        for place, (stack, path) in enumerate(paths):
            position = place / (len(paths) - 1) if len(paths) > 1 else 0.0
            block = model.get_submodule(path)
            first = in_run.get(path)
            group = runtime.group(stack.kind, first or path, position)
            site = site_for(group, _child(block, "attn"))
            if first is not None:  # merged once around the run (see .run)
                cell = cells.setdefault(first, RunCell())
                if path == first or path == last_of_run[first]:
                    source = run_source(stack, block)
                    enter = wrap_run_block(site, cell, path == first, path == last_of_run[first], source)
                    patches.wrap_forward(block, enter)
                patches.wrap_forward(_child(block, "attn"), wrap_run_attn(site, cell, self.rope, what))
            elif stack.site == "joint":
                image_ff = bool(stack.image_ff and getattr(self.params, stack.image_ff))
                patches.wrap_forward(block.attn, wrap_joint_attn(site, self.rope, what, hand_on=image_ff))
                if image_ff:
                    patches.wrap_forward(_child(block, "ff"), wrap_image_ff(site))
                extra = getattr(block, stack.extra_self, None) if stack.extra_self else None
                if extra is not None:
                    patches.wrap_forward(extra, wrap_image_self_attn(site_for(group, extra), what))
            elif stack.site == "single_fused":
                patches.wrap_forward(block.attn, wrap_single_fused(site, self.rope, what))
            else:
                norm, proj_out = _child(block, "norm"), _child(block, "proj_out")
                patches.wrap_forward(norm, wrap_single_norm(site, norm))
                patches.wrap_forward(block.attn, wrap_single_attn(site, self.rope, what))
                patches.wrap_forward(proj_out, wrap_single_proj_out(site, proj_out))
        patches.wrap_forward(model, self._denoiser(model, runtime, ctx))

    def reorderer(self, runtime: Runtime) -> Reorder | None:
        """How the denoiser's arguments are put in region order (``None``: the blocks see raster
        order, e.g. when positions are added before the blocks or read from the grid)."""
        return None

    def _denoiser(self, model: nn.Module, runtime: Runtime, ctx: CallContext) -> Wrapper:
        return wrap_denoiser(model, runtime, ctx, self.reader(model), self.label, self.reorderer(runtime))

    def id_grids(self) -> GridResolver:
        """A resolver reading the grid from per-token ids (kept so :meth:`prepare` can seed it)."""
        self._grids = GridResolver(getattr(self.params, "grid", None), self.name)
        return self._grids

    def prepare(self, model: nn.Module, runtime: Runtime, height: int, width: int, **size: int) -> None:
        super().prepare(model, runtime, height, width, **size)
        grid = self.token_grid(model, height, width)
        if self._grids is not None:  # compiled calls cannot read ids: tell them this size's grid
            self._grids.by_tokens[grid[0] * grid[1]] = grid


class DualStreamParams(AdapterParams):
    """The parameters of an adapter whose model has double-stream (joint attention) blocks followed
    by single-stream blocks; an adapter subclasses it with its ``name`` (and its own defaults)."""

    skip_double: int = Field(5, ge=0, description="The first N double-stream blocks are not merged.")
    skip_single: int = Field(5, ge=0, description="The first N single-stream blocks are not merged.")
    double: bool = Field(True, description="Merge in double-stream blocks at all.")
    single: bool = Field(True, description="Merge in single-stream blocks at all.")
    single_placement: Literal["block", "run"] = Field(
        "block",
        description=(
            "'block': each merged single-stream block merges and unmerges itself, its residual full "
            "length. 'run' (opt-in, approximate): merge once before each run of consecutive merged "
            "single-stream blocks and unmerge the run's update after its last block; the residual "
            "stream is carried merged through the run. Fewer kernels per block."
        ),
    )
    double_ff: bool = Field(
        False,
        description=(
            "Opt-in: the image stream's feed-forward of merged double-stream blocks runs on merged "
            "tokens too (merge its normalised input, feed-forward, unmerge), besides the attention."
        ),
    )


def dual_stream_stacks(single_site: Literal["single_split", "single_fused"]) -> tuple[Stack, Stack]:
    """The stacks of a model with double-stream blocks (``transformer_blocks``: joint attention)
    followed by single-stream blocks (``single_transformer_blocks``, site kind ``single_site``),
    switched by the fields of :class:`DualStreamParams`; the block kinds are "double" and "single"."""
    return (
        Stack(
            "double",
            "transformer_blocks",
            "joint",
            skip="skip_double",
            enable="double",
            noun="double-stream",
            image_ff="double_ff",
        ),
        Stack(
            "single",
            "single_transformer_blocks",
            single_site,
            skip="skip_single",
            enable="single",
            noun="single-stream",
            placement="single_placement",
        ),
    )
