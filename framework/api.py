"""Public API: ``apply(pipe_or_model, config)`` -> handle; ``remove``; a context that disables.

Everything that can be wrong with the input is checked before the model is touched; a failure
while installing undoes what was installed, so nothing is left half-applied.

A denoiser already compiled with ``torch.compile`` (an ``OptimizedModule``, alone or inside a
pipeline) is patched through its ``_orig_mod``: the compiled module traces the patched forward on
its next call. A pipeline's step clock follows the pipeline, not the scheduler object seen at
apply time: the pipeline's ``progress_bar`` (entered by every diffusers pipeline right before its
denoising loop, after ``set_timesteps``) re-attaches the clock to ``pipe.scheduler`` when it was
replaced and starts a generation; ``maybe_free_model_hooks`` (called at the end of every
pipeline call) ends it. Hooking these two host-side methods keeps the denoiser's hot path free of
any check, and it works under ``torch.compile`` and CUDA graphs. The pipeline's ``__call__``
cannot be hooked on the instance (Python looks special methods up on the class).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tokenreduce import parallel
from tokenreduce.config import ConfigBase, ConfigError, check_combination, instantiate, load_config, resolve
from tokenreduce.engine import PatchSet, Runtime
from tokenreduce.engine.patch import PICKLE_HINT
from tokenreduce.interfaces import ModelAdapter, SiteSpec
from tokenreduce.layout import grid_fits, grid_text
from tokenreduce.manager import get_registry

HANDLE_ATTR = "_tokenreduce_handle"
#: The config of ``apply(model)`` when the model's adapter names no default preset.
FALLBACK_PRESET = "toma"


class UnsupportedModelError(TypeError):
    """No registered adapter serves this model."""


class TokenReduceHandle:
    """An applied configuration. ``remove()`` restores the original forward methods exactly."""

    def __init__(
        self,
        model: nn.Module,
        pipeline: Any,
        adapter: ModelAdapter,
        runtime: Runtime,
        patches: PatchSet,
        sites: list[SiteSpec],
        pipeline_patches: PatchSet | None = None,
    ) -> None:
        self.model, self.pipeline, self.adapter = model, pipeline, adapter
        self.runtime, self.sites = runtime, sites
        self._patches = patches
        self._pipeline_patches = pipeline_patches if pipeline_patches is not None else PatchSet()

    @property
    def config(self) -> ConfigBase:
        return self.runtime.config

    @property
    def active(self) -> bool:
        return len(self._patches) > 0

    def remove(self) -> None:
        """Undo every patch; a second call does nothing."""
        self._pipeline_patches.undo()
        self._patches.undo()
        for owner in (self.model, self.pipeline):
            if owner is not None and owner.__dict__.get(HANDLE_ATTR) is self:
                object.__delattr__(owner, HANDLE_ATTR)

    def enable(self) -> None:
        self.runtime.switch(True)

    def disable(self) -> None:
        self.runtime.switch(False)

    @contextmanager
    def disabled(self) -> Iterator[TokenReduceHandle]:
        """Run the original computation inside the block (state is kept for later)."""
        previous = self.runtime.switched_on
        self.runtime.switch(False)
        try:
            yield self
        finally:
            self.runtime.switch(previous)

    def set_num_steps(self, num_steps: int) -> None:
        """The number of denoising steps of the next generations, for merge schedules that depend on
        it, where no scheduler says it (a bare denoiser); restarts the step clock."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
        self.runtime.clock.restart(num_steps=num_steps)

    def prepare(self, height: int, width: int, **size: int) -> None:
        """Build the layouts for images of ``height x width`` pixels now (before a compiled call at
        a new resolution; eager calls build them on first use). Video adapters also take ``frames``."""
        self.adapter.prepare(self.model, self.runtime, height, width, **size)

    def reset(self) -> None:
        """Forget cached plans and restart the step clock."""
        self.runtime.reset_state()

    def __enter__(self) -> TokenReduceHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __deepcopy__(self, memo: dict[int, Any]) -> TokenReduceHandle:
        """The handle of a deep-copied model (reached through the model's ``__dict__``).

        Copying the denoiser alone gives a patched model of its own, driven by its timesteps;
        the pipeline's hooks stay with the original pipeline. Copying the whole pipeline copies them.
        """
        new = TokenReduceHandle.__new__(TokenReduceHandle)
        memo[id(self)] = new
        state = dict(self.__dict__)
        with_pipeline = self.pipeline is not None and id(self.pipeline) in memo
        if not with_pipeline:
            state["pipeline"], state["_pipeline_patches"] = None, PatchSet()
        new.__dict__.update(copy.deepcopy(state, memo))
        if not with_pipeline and new.runtime.clock.driver == "pipeline":
            new.runtime.clock.driver = "timestep"
            new.runtime.clock.in_generation = False
        return new

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise pickle.PicklingError(PICKLE_HINT)

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"TokenReduceHandle({self.adapter.name}, ratio={self.config.ratio}, sites={len(self.sites)}, {state})"


def find_denoiser(pipe_or_model: Any) -> tuple[nn.Module, Any, type[ModelAdapter] | None]:
    """(denoiser, pipeline or None, matching adapter class or None)."""
    registry = get_registry()
    adapters = [registry.get("adapter", n) for n in registry.names("adapter")]
    if isinstance(pipe_or_model, nn.Module):
        model = uncompiled(pipe_or_model)
        for cls in adapters:
            if cls.matches(model):
                return model, None, cls
        return model, None, None
    for cls in adapters:
        denoiser = cls.denoiser_of(pipe_or_model)
        if denoiser is not None:
            return denoiser, pipe_or_model, cls
    names = ", ".join(registry.names("adapter")) or "(none)"
    raise UnsupportedModelError(
        f"{type(pipe_or_model).__name__} is neither a torch module nor a pipeline with a supported "
        f"`unet`/`transformer`; registered adapters: {names}"
    )


def default_preset(pipe_or_model: Any) -> str:
    """The preset the adapter of this pipeline or denoiser names as its default."""
    model, _, detected = find_denoiser(pipe_or_model)
    if detected is None:
        names = ", ".join(get_registry().names("adapter"))
        raise UnsupportedModelError(
            f"no adapter supports {type(model).__name__}; registered adapters: {names}"
        )
    return detected.default_preset or FALLBACK_PRESET


def uncompiled(module: Any) -> Any:
    """The module a ``torch.compile``-d ``OptimizedModule`` wraps (patched in its place)."""
    while isinstance(module, torch._dynamo.eval_frame.OptimizedModule):
        module = module._orig_mod
    return module


def prepare(
    pipe_or_model: Any, config: Any = None, **overrides: Any
) -> tuple[nn.Module, Any, ModelAdapter, Runtime, list[SiteSpec]]:
    """Validate everything against the model without modifying it (``config=None``: the preset
    the model's adapter names as its default)."""
    if config is None:
        config = default_preset(pipe_or_model)
    config = load_config(config, **overrides)
    model, pipeline, detected = find_denoiser(pipe_or_model)
    registry = get_registry()
    if config.adapter.name == "auto":
        if detected is None:
            raise UnsupportedModelError(
                f"no adapter supports {type(model).__name__}; registered adapters: {', '.join(registry.names('adapter'))}"
            )
        adapter = detected(detected.Params(size_weighting=config.adapter.size_weighting))
    else:
        adapter = instantiate("adapter", config.adapter)
        if not adapter.matches(model):
            raise UnsupportedModelError(
                f"adapter {adapter.name!r} does not support {type(model).__name__}"
                + (f"; the model matches adapter {detected.name!r}" if detected else "")
            )
    if config.adapter.name == "auto":
        # Component checks that depend on the adapter run again with the one detected.
        check_combination(config.model_copy(update={"adapter": adapter.params}))
    resolved = resolve(config, adapter=adapter)
    runtime = Runtime(resolved)
    runtime.clock.timestep_scale = adapter.timestep_scale
    runtime.parallel_guard = parallel.Guard(model, adapter)
    runtime.on_new_tokens = functools.partial(reset_cache_hooks, model)
    try:
        parallel.check(model, adapter)  # context parallelism already enabled
        runtime.check_rank(adapter.grid_rank)
        adapter.validate(model, config)
        sites = adapter.sites(model, config)
        check_grids_fit(sites, runtime)
        for grid in {s.grid for s in sites if s.grid is not None}:
            runtime.layout(grid)
    except ValueError as exc:
        raise ConfigError(f"{adapter.name}: {exc}") from None
    return model, pipeline, adapter, runtime, sites


def reset_cache_hooks(model: nn.Module) -> None:
    """Reset the state of diffusers' stateful hooks (Pyramid Attention Broadcast, FirstBlockCache,
    FasterCache, ...) on ``model``: a step that merges after one that did not (or the reverse), or
    that selects new destinations, must not be served an output cached for other tokens.

    Not while ``torch.compile`` traces a step: the hooks' state lives outside the graph."""
    if torch.compiler.is_compiling():
        return
    for module in model.modules():
        registry = module.__dict__.get("_diffusers_hook")
        if registry is not None:
            registry.reset_stateful_hooks(recurse=False)


def check_grids_fit(sites: list[SiteSpec], runtime: Runtime) -> None:
    """Refuse grids the partitioner cannot tile at the model's default size (other sizes, seen only
    at run time, leave such a level unmerged with a warning)."""
    minimum = runtime.partitioner.min_grid()
    small: dict[str, tuple[int, ...]] = {}
    for site in sites:
        if site.grid is not None and not grid_fits(site.grid, minimum):
            small.setdefault(site.group, site.grid)
    if small:
        where = ", ".join(f"{group} ({grid_text(grid)})" for group, grid in small.items())
        raise ValueError(
            f"at the model's default size, the token grid of {where} is smaller than partitioner "
            f"{runtime.partitioner.name!r} needs ({grid_text(minimum)} on its last {len(minimum)} axes); "
            "use a smaller partitioner size or leave those sites out of the adapter's selection"
        )


def apply(pipe_or_model: Any, config: Any = None, **overrides: Any) -> TokenReduceHandle:
    """Apply a config (preset name, file, mapping or Config) to a pipeline or denoiser; without
    one, the preset the model's adapter names as its default (SDXL: ``toma-sdxl``, Flux:
    ``toma-flux``). Keyword overrides are merged into the config (see :func:`load_config`).

    Re-applying replaces the previous application. Returns the handle.
    """
    model, pipeline, adapter, runtime, sites = prepare(pipe_or_model, config, **overrides)
    previous = get_handle(model)
    if previous is not None:
        previous.remove()
    patches, pipeline_patches = PatchSet(), PatchSet()
    try:
        adapter.install(model, runtime, patches)
        if pipeline is not None:
            _attach_pipeline(pipeline, runtime, pipeline_patches)
            _prepare_default_size(pipeline, model, adapter, runtime)
    except BaseException:
        pipeline_patches.undo()
        patches.undo()
        raise
    handle = TokenReduceHandle(model, pipeline, adapter, runtime, patches, sites, pipeline_patches)
    object.__setattr__(model, HANDLE_ATTR, handle)
    if pipeline is not None:
        object.__setattr__(pipeline, HANDLE_ATTR, handle)
    return handle


def _prepare_default_size(pipeline: Any, model: nn.Module, adapter: ModelAdapter, runtime: Runtime) -> None:
    """Build the layouts of the pipeline's default image size now, so that a denoiser compiled
    right after ``apply`` traces no set-up code at that size. ``default_sample_size`` is in latent
    pixels; adapters take image pixels at SDXL's and Flux's 8x VAE."""
    size = getattr(pipeline, "default_sample_size", None)
    if isinstance(size, int) and size > 0:
        # A size this config cannot merge is reported when (if) it is used.
        with contextlib.suppress(ValueError):
            adapter.prepare(model, runtime, 8 * size, 8 * size)


class SchedulerFollower:
    """Keeps the clock's hooks on the pipeline's current scheduler (re-attached when replaced)."""

    def __init__(self, pipeline: Any, runtime: Runtime) -> None:
        self.pipeline, self.clock = pipeline, runtime.clock
        self.scheduler: Any = None
        self._patches = PatchSet()

    def follow(self) -> None:
        scheduler = getattr(self.pipeline, "scheduler", None)
        if scheduler is self.scheduler:
            return
        self.undo()
        if scheduler is None or not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
            return
        clock = self.clock

        def on_set_timesteps(original):
            def set_timesteps(*args, **kwargs):
                out = original(*args, **kwargs)
                clock.start_generation(scheduler)
                return out

            return set_timesteps

        def on_step(original):
            def step(*args, **kwargs):
                out = original(*args, **kwargs)
                clock.end_step()
                return out

            return step

        # Links keep the signatures visible (`__wrapped__`): pipelines inspect them (Flux: `sigmas`).
        self._patches.wrap_method(scheduler, "set_timesteps", on_set_timesteps)
        self._patches.wrap_method(scheduler, "step", on_step)
        self.scheduler = scheduler

    def undo(self) -> None:
        self._patches.undo()
        self.scheduler = None


def _attach_pipeline(pipeline: Any, runtime: Runtime, patches: PatchSet) -> None:
    """Drive the clock from the pipeline's calls and its current scheduler (host only)."""
    follower = SchedulerFollower(pipeline, runtime)
    follower.follow()
    if follower.scheduler is None:
        return
    patches.add(follower)
    clock = runtime.clock

    def on_progress_bar(original):
        def progress_bar(*args, **kwargs):
            follower.follow()  # `pipe.scheduler` may have been replaced since the last call
            clock.start_generation(follower.scheduler)
            return original(*args, **kwargs)

        return progress_bar

    def on_free_hooks(original):
        def maybe_free_model_hooks(*args, **kwargs):
            clock.end_generation()
            return original(*args, **kwargs)

        return maybe_free_model_hooks

    if callable(getattr(pipeline, "progress_bar", None)):
        patches.wrap_method(pipeline, "progress_bar", on_progress_bar)
    if callable(getattr(pipeline, "maybe_free_model_hooks", None)):
        patches.wrap_method(pipeline, "maybe_free_model_hooks", on_free_hooks)
    patches.set(clock, "driver", "pipeline")


def get_handle(pipe_or_model: Any) -> TokenReduceHandle | None:
    pipe_or_model = uncompiled(pipe_or_model)
    handle = getattr(pipe_or_model, "__dict__", {}).get(HANDLE_ATTR)
    if handle is None and not isinstance(pipe_or_model, nn.Module):
        for attr in ("unet", "transformer"):
            module = uncompiled(getattr(pipe_or_model, attr, None))
            if module is not None and HANDLE_ATTR in module.__dict__:
                return module.__dict__[HANDLE_ATTR]
    return handle


def remove(pipe_or_model: Any) -> bool:
    """Remove whatever tokenreduce applied to this pipeline or model; ``True`` if there was something."""
    handle = get_handle(pipe_or_model)
    if handle is None:
        return False
    handle.remove()
    return True


@contextmanager
def disabled(pipe_or_model: Any) -> Iterator[None]:
    """Temporarily run the unmodified computation."""
    handle = get_handle(pipe_or_model)
    if handle is None:
        yield
        return
    with handle.disabled():
        yield


def begin_call(runtime: Runtime, timestep: Any) -> None:
    """For adapters: call at the top of the denoiser's forward (before any site runs) whenever
    ``runtime.switched_on``; afterwards ``runtime.enabled`` says whether this call merges (off on a
    step the merge schedule skips: then every site must run the original computation). A model
    whose context parallelism (enabled after ``apply``) the adapter cannot serve raises here."""
    if runtime.parallel_guard is not None:
        runtime.parallel_guard()
    runtime.clock.begin_call(timestep)
