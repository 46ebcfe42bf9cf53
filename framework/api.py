"""Public API: ``apply(pipe_or_model, config)`` -> handle; ``remove``; a context that disables.

Everything that can be wrong with the input is checked before the model is touched; a failure
while installing undoes what was installed, so nothing is left half-applied.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from tokenreduce.config import ConfigBase, ConfigError, check_combination, instantiate, load_config, resolve
from tokenreduce.engine import PatchSet, Runtime
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
    ) -> None:
        self.model, self.pipeline, self.adapter = model, pipeline, adapter
        self.runtime, self.sites = runtime, sites
        self._patches = patches

    @property
    def config(self) -> ConfigBase:
        return self.runtime.config

    @property
    def active(self) -> bool:
        return len(self._patches) > 0

    def remove(self) -> None:
        """Undo every patch; a second call does nothing."""
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
        self.runtime.clock.reset(num_steps=num_steps)

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

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"TokenReduceHandle({self.adapter.name}, ratio={self.config.ratio}, sites={len(self.sites)}, {state})"


def find_denoiser(pipe_or_model: Any) -> tuple[nn.Module, Any, type[ModelAdapter] | None]:
    """(denoiser, pipeline or None, matching adapter class or None)."""
    registry = get_registry()
    adapters = [registry.get("adapter", n) for n in registry.names("adapter")]
    if isinstance(pipe_or_model, nn.Module):
        for cls in adapters:
            if cls.matches(pipe_or_model):
                return pipe_or_model, None, cls
        return pipe_or_model, None, None
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
        adapter = detected(detected.Params())
    else:
        adapter = instantiate("adapter", config.adapter)  # type: ignore[assignment]
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
    try:
        runtime.check_rank(adapter.grid_rank)
        adapter.validate(model, config)
        sites = adapter.sites(model, config)
        check_grids_fit(sites, runtime)
        for grid in {s.grid for s in sites if s.grid is not None}:
            runtime.layout(grid)
    except ValueError as exc:
        raise ConfigError(f"{adapter.name}: {exc}") from None
    return model, pipeline, adapter, runtime, sites


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
    patches = PatchSet()
    try:
        adapter.install(model, runtime, patches)
        if pipeline is not None:
            _attach_scheduler(pipeline, runtime, patches)
    except BaseException:
        patches.undo()
        raise
    handle = TokenReduceHandle(model, pipeline, adapter, runtime, patches, sites)
    object.__setattr__(model, HANDLE_ATTR, handle)
    if pipeline is not None:
        object.__setattr__(pipeline, HANDLE_ATTR, handle)
    return handle


def _attach_scheduler(pipeline: Any, runtime: Runtime, patches: PatchSet) -> None:
    """Reset the clock at each pipeline call (with its number of steps) and close each denoising step
    (host only)."""
    scheduler = getattr(pipeline, "scheduler", None)
    if scheduler is None or not hasattr(scheduler, "step") or not hasattr(scheduler, "set_timesteps"):
        return
    clock = runtime.clock

    # functools.wraps keeps the signatures: pipelines inspect them (e.g. Flux checks for `sigmas`).
    def on_set_timesteps(original):
        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            out = original(*args, **kwargs)
            clock.start(scheduler)
            return out

        return set_timesteps

    def on_step(original):
        @functools.wraps(original)
        def step(*args, **kwargs):
            out = original(*args, **kwargs)
            clock.end_step()
            return out

        return step

    patches.wrap_method(scheduler, "set_timesteps", on_set_timesteps)
    patches.wrap_method(scheduler, "step", on_step)
    patches.set(clock, "driver", "scheduler")


def get_handle(pipe_or_model: Any) -> TokenReduceHandle | None:
    handle = getattr(pipe_or_model, "__dict__", {}).get(HANDLE_ATTR)
    if handle is None and not isinstance(pipe_or_model, nn.Module):
        for attr in ("unet", "transformer"):
            module = getattr(pipe_or_model, attr, None)
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
    step the merge schedule skips: then every site must run the original computation)."""
    runtime.clock.begin_call(timestep)
