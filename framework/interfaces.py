"""The six extension points. Each implementation carries a ``name`` and a pydantic ``Params`` model.

Components are plain objects resolved once at apply time; the per-block hot path calls only
their tensor methods (no registry look-ups, no config parsing, no host synchronisation).
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from tokenreduce import noise
from tokenreduce.layout import Layout, Regions
from tokenreduce.params import AdapterParams, StrictParams

if TYPE_CHECKING:
    from torch import nn

    from tokenreduce.config import ConfigBase
    from tokenreduce.engine.patch import PatchSet
    from tokenreduce.engine.runtime import Runtime


class Component(ABC):
    """Common base: a registered name, a parameter model, and the parameters it was built with."""

    kind: ClassVar[str]
    name: ClassVar[str]
    Params: ClassVar[type[StrictParams]]

    #: Token-grid ranks this component works on (2: rows x cols, 3: frames x rows x cols);
    #: ``None``: any rank. Validation refuses a component on a model whose grid has another rank.
    grid_ranks: ClassVar[tuple[int, ...] | None] = None

    def __init__(self, params: StrictParams | None = None) -> None:
        self.params = params if params is not None else self.Params()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params!r})"

    def check(self, config: ConfigBase) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` if this component cannot work with the rest of ``config``.

        Called at validation time, before any model is touched.
        """


# --------------------------------------------------------------------------- Partitioner


class Partitioner(Component):
    """Token grid (``(H, W)``, ``(T, H, W)``, any rank) -> regions processed as one batch row each."""

    kind = "partitioner"
    #: One region holding the whole grid in raster order (what grid-wide methods such as pooling need).
    whole_grid: ClassVar[bool] = False

    @abstractmethod
    def partition(self, grid: tuple[int, ...]) -> Regions:
        """Regions of a raster grid, outermost axis first (host tensors, built once per grid)."""

    def min_grid(self) -> tuple[int, ...]:
        """The smallest grid this partitioner accepts, on the grid's trailing axes (validated before
        patching): a grid needs at least this rank, and leading axes beyond it are unconstrained."""
        return (1, 1)


# --------------------------------------------------------------------------- Selector


@dataclass(frozen=True)
class SelectContext:
    """What a selector may know besides the features: the layout, a dedicated generator, and a
    draw counter on the device with the seed (for noise that compiles, :meth:`normal`)."""

    layout: Layout
    generator: torch.Generator | None = None
    draws: torch.Tensor | None = None
    seed: int = 0

    def normal(self, shape: Sequence[int], device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """Standard normal noise, new at every call in the runtime (the counter advances in place),
        with the same values eager, compiled (up to float rounding) and replayed from a CUDA graph, on
        the counter's device; outside the runtime (no counter given) the first draw of the seed, on
        ``device``."""
        draws = self.draws if self.draws is not None else torch.zeros((), dtype=torch.int64, device=device)
        return noise.normal(shape, draws, self.seed, dtype)

    def random_source(self, device: torch.device | str) -> torch.Generator:
        """The dedicated generator; outside the runtime (no generator given) a fresh one on
        ``device`` with seed 0, so a selector never draws from the global RNG."""
        if self.generator is not None:
            return self.generator
        generator = torch.Generator(device=device)
        generator.manual_seed(0)
        return generator


class Selector(Component):
    """Region features -> destination indices, shared by every sample of the batch."""

    kind = "selector"

    def count(self, regions: Regions, keep: Sequence[int]) -> tuple[int, ...]:
        """Destinations per region; by default one per kept token."""
        return tuple(keep)

    @abstractmethod
    def select(self, features: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        """Pick destinations.

        ``features``: ``(B, R, S, C)`` float32, L2-normalised per token (padding slots are zero).
        Returns local slot indices ``(R, k)`` (``k = ctx.layout.k``); for region ``r`` only the
        first ``ctx.layout.dests[r]`` entries are used and they must be unique valid slots.
        """


# --------------------------------------------------------------------------- Merger


class MergePlan(ABC):
    """A resolved merge for one layer and batch: ``merge`` shortens, ``unmerge`` restores."""

    #: indices ``(N',)`` into the tokens as ``merge`` received them (raster order, or region order when
    #: the adapter hands tokens region by region) whose positional data (e.g. RoPE rows) each merged
    #: token takes
    positions: torch.Tensor | None = None
    #: ``(B or 1, N')`` float32: how many source tokens each merged token stands for (a hard group's
    #: count, a soft merge's assignment column sum), computed once per plan; read by size-weighted
    #: attention. ``None`` from a merger with ``gives_sizes``: every size is 1 (nothing merged).
    sizes: torch.Tensor | None = None
    #: every merged token is a convex combination of input tokens (merge rows sum to 1), so merging
    #: commutes with per-channel affine maps (adapters may merge before a modulation)
    convex: bool = False
    #: the merged tokens are the first ``prefix`` input tokens, unchanged (merging is a slice)
    prefix: int | None = None
    #: ``True`` when nothing is merged: sites then run the original code (exact at ratio 0)
    is_identity: ClassVar[bool] = False

    @abstractmethod
    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` -> ``(B, N', C)``."""

    @abstractmethod
    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, N', C)`` -> ``(B, N, C)``."""

    def unmerge_into(self, y: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``unmerge(y)`` into ``out`` (plans that can, without a copy)."""
        out.copy_(self.unmerge(y))

    def residual_update(self, x: torch.Tensor, merged: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``x + unmerge(out - merged)``: the update a merged computation ``out = f(merged)`` makes to ``x``."""
        return x + self.unmerge(out - merged)


class Merger(Component):
    """Features + destinations -> a :class:`MergePlan`.

    ``output`` says how long the merged sequence is: ``"destinations"`` (one merged token per
    destination: the selector must pick exactly the kept count) or ``"keep"`` (the layer's kept
    count; unmatched sources stay, as in bipartite matching). ``kv_only`` mergers shorten only
    keys and values (ToDo) and need no unmerge.
    """

    kind = "merger"
    output: ClassVar[Literal["destinations", "keep"]] = "destinations"
    kv_only: ClassVar[bool] = False
    needs_destinations: ClassVar[bool] = True
    #: Whether ``plan`` reads ``features``; if neither it nor selection does, the engine skips the
    #: float32 normalisation pass and passes ``None``.
    needs_features: ClassVar[bool] = True
    #: Whether every plan sets ``sizes`` (required by adapters with ``size_weighting`` on).
    gives_sizes: ClassVar[bool] = False
    #: Whether plans touch tokens only through the layout's helpers (``to_regions``, ``from_regions``,
    #: ``compact_slots``, ``expand_slots``, ``global_destinations``), so that an adapter may hand them
    #: tokens region by region (``Runtime.region_order``) and skip the gathers.
    any_token_order: ClassVar[bool] = False

    def for_site(self, position: float) -> Merger:
        """The merger to use at a site ``position`` in [0, 1] through the merged blocks (default: self).

        Lets a method vary per block (ToFu: prune early, fuse late) without the adapter knowing.
        """
        return self

    @abstractmethod
    def plan(
        self, x: torch.Tensor, features: torch.Tensor, destinations: torch.Tensor, layout: Layout
    ) -> MergePlan:
        """Build the plan.

        ``x``: ``(B, N, C)`` tokens in the model dtype; ``features``: ``(B, R, S, C)`` normalised
        float32 region features (``None`` when ``needs_features`` and ``needs_destinations`` are
        both false); ``destinations``: ``(R, k)`` local indices from the selector.
        """


# --------------------------------------------------------------------------- ReusePolicy


class Decision(enum.Enum):
    """What the first block of a sharing group does in one denoiser call."""

    SELECT = "select"  # new destinations and new weights
    WEIGHTS = "weights"  # cached destinations, new weights
    REUSE = "reuse"  # cached plan


class ReusePolicy(Component):
    """(step, block group) -> recompute destinations / recompute weights / reuse.

    ``sharing="kind"``: every block of a kind (SDXL: resolution level; Flux: double or single)
    uses the plan computed in the first block of that kind; ``"block"``: each block its own.
    """

    kind = "reuse"
    sharing: Literal["kind", "block"] = "kind"

    @property
    def needs_step(self) -> bool:
        """Whether decisions depend on the denoising step (else every call selects anew)."""
        return True

    @abstractmethod
    def decide(self, step: int) -> Decision:
        """The decision for denoising step ``step`` (0-based within one pipeline call)."""


# --------------------------------------------------------------------------- MergeSchedule


class MergeSchedule(Component):
    """(step, number of steps, timestep) -> whether this denoising step merges at all.

    On a step that does not merge every site runs the unmodified computation. The decision is
    made on the host once per step by the clock, never inside a block. ``needs`` says what a
    decision reads, so the clock can say clearly when it is not known:

    - ``"nothing"``: the same answer at every step (``merges`` is called with step 0);
    - ``"step"``: the step index (0-based within one generation);
    - ``"num_steps"``: the step index and the number of steps of the generation;
    - ``"timestep"``: the step's normalised timestep ``t / num_train_timesteps`` in [0, 1]
      (1: pure noise; the scheduler's timesteps, or what the denoiser receives).
    """

    kind = "schedule"
    needs: ClassVar[Literal["nothing", "step", "num_steps", "timestep"]] = "step"

    @abstractmethod
    def merges(self, step: int, num_steps: int | None, timestep: float | None) -> bool:
        """Whether step ``step`` merges. ``num_steps`` / ``timestep`` are ``None`` where unknown;
        a schedule that needs one of them raises ``ValueError`` saying how to provide it."""

    def steps(self, num_steps: int, timesteps: Sequence[float] | None = None) -> list[bool]:
        """The decision for every step of a ``num_steps``-step generation (``explain``, speed estimates)."""
        return [
            self.merges(i, num_steps, None if timesteps is None else float(timesteps[i]))
            for i in range(num_steps)
        ]


# --------------------------------------------------------------------------- ModelAdapter


@dataclass(frozen=True)
class SiteSpec:
    """One place in a model where tokens are reduced, described for ``explain``."""

    path: str  # dotted module path
    site: str  # e.g. "attn1", "block", "double", "single"
    group: str  # sharing group (block kind)
    grid: tuple[int, ...] | None  # token grid at the reference resolution, if known


class ModelAdapter(Component):
    """Finds the sites in one model family, installs and removes the wrappers.

    Declared capabilities (read by other components' validation instead of adapter names):
    ``shared_positions``: merged tokens carry positional data (e.g. RoPE rows, one table for the
    whole batch), so every sample must keep the same tokens; ``kv_only_sites``: the adapter has a
    site where a ``kv_only`` merger (shortened keys/values, full-length queries) can act;
    ``context_parallel``: under diffusers' context parallelism the adapter reads each rank's token
    grid from the rank's own chunk and its plans depend on their tiles only (see
    :mod:`tokenreduce.parallel`); other adapters refuse a model with context parallelism enabled.
    """

    kind = "adapter"
    Params: ClassVar[type[AdapterParams]]
    #: Rank of the token grids this adapter's sites see (2: images; 3: video frames x rows x cols).
    grid_rank: ClassVar[int] = 2
    #: The preset ``apply(pipe)`` uses when no config is given (``None``: the generic ``toma``).
    default_preset: ClassVar[str | None] = None
    #: The timestep the denoiser receives at pure noise (SDXL's UNet: 1000; Flux's transformer,
    #: which receives ``t / 1000``: 1); timestep schedules of bare denoisers divide by it.
    timestep_scale: ClassVar[float] = 1000.0
    shared_positions: ClassVar[bool] = False
    kv_only_sites: ClassVar[bool] = False
    context_parallel: ClassVar[bool] = False

    @classmethod
    @abstractmethod
    def matches(cls, model: nn.Module) -> bool:
        """Whether ``model`` (a denoiser, not a pipeline) is of this adapter's family."""

    @classmethod
    def denoiser_of(cls, pipe: object) -> nn.Module | None:
        """The denoiser inside a pipeline object, or ``None``."""
        for attr in ("unet", "transformer"):
            module = getattr(pipe, attr, None)
            # torch.compile-d: the module it wraps (patched in its place)
            module = getattr(module, "_orig_mod", module)
            if module is not None and cls.matches(module):
                return module
        return None

    @abstractmethod
    def sites(self, model: nn.Module, config: ConfigBase) -> list[SiteSpec]:
        """The sites the config selects, without modifying the model (used by validation and explain)."""

    @abstractmethod
    def install(self, model: nn.Module, runtime: Runtime, patches: PatchSet) -> None:
        """Install the wrappers through ``patches``.

        Wrap sub-modules' ``forward`` on the instance; never copy a block's forward. Call
        :func:`tokenreduce.api.begin_call` at the top of the denoiser's forward while
        ``runtime.switched_on``; sites merge only while ``runtime.enabled``. If this raises
        part-way, the caller undoes what ``patches`` holds.
        """

    def validate(self, model: nn.Module, config: ConfigBase) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` for a model/config combination this adapter cannot serve."""

    def grids_for(self, model: nn.Module, height: int, width: int, **size: int) -> dict[str, tuple[int, ...]]:
        """Token grid per sharing group for an image of ``height x width`` pixels."""
        raise NotImplementedError(f"adapter {self.name!r} cannot predict token grids from an image size")

    def prepare(self, model: nn.Module, runtime: Runtime, height: int, width: int, **size: int) -> None:
        """Build, on the model's device, everything a call at this image size builds lazily.

        A model compiled with ``fullgraph=True`` cannot run that set-up inside its graph: call this
        (through ``handle.prepare``) before the first compiled call at a new resolution.
        """
        device = next(model.parameters()).device
        runtime.generator(device)
        runtime.draws(device)
        for grid in set(self.grids_for(model, height, width, **size).values()):
            runtime.prepare_grid(grid, device)
