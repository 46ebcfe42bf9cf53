"""The denoising-step clock that drives the merge schedule and the reuse decisions.

Three drivers:

- ``"timestep"`` (a bare denoiser, the default): the step index comes from the timestep the
  denoiser receives: a new value is a new step, the same value again is another guidance pass of
  the same step, a larger value starts a new generation. Reading it costs one small device read
  per call, and only when the reuse policy depends on the step.
- ``"pipeline"`` (the model belongs to a pipeline given to ``apply``): while a pipeline call is
  generating, the pipeline's *current* scheduler drives the clock: ``set_timesteps`` and the
  start of the denoising loop start a generation and ``step`` closes each denoising step;
  guidance passes are counted between the two. Exact, host-only, no device read, and it keeps
  working when the denoiser runs compiled or captured in a CUDA graph. The hooks follow
  ``pipe.scheduler`` when it is replaced (see ``tokenreduce.api``). Outside a pipeline call (a
  custom loop calling the denoiser, with any scheduler or none) the clock reads the timestep as
  the ``"timestep"`` driver does, so a new generation never inherits the last one's plans.
- ``"manual"``: the caller drives :meth:`reset` and :meth:`end_step` (benchmarks, custom loops).

Under ``torch.compile`` the timestep cannot be read inside the graph, so calls observed through
the timestep recompute their plans (correct, without cross-step reuse); use a pipeline or
``"manual"`` there.

At the start of each step the clock asks the merge schedule whether the step merges and sets
``runtime.enabled`` (host-side, once per step: a compiled graph sees a constant, so it has one
graph for merged steps and one for unmerged ones). The reuse policy counts merged steps only: its
step ``n`` is the ``n``-th step that merges, so ``destinations_every: 2`` under ``every k: 3``
selects on steps 0, 6, 12, ... and reuses on 3, 9, 15, ...; steps that do not merge neither use
nor change the cached plans.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch

from tokenreduce.interfaces import Decision

if TYPE_CHECKING:
    from tokenreduce.engine.runtime import Runtime

Driver = Literal["timestep", "pipeline", "manual"]

#: More calls than this within one step means nothing is closing steps (e.g. the denoiser of a
#: patched pipeline called from a custom loop): recompute on every call instead of piling up passes.
MAX_PASSES_PER_STEP = 4


def timestep_value(timestep: Any) -> float:
    """The first element of a timestep as a Python float (one small device read if on a GPU)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item()) if timestep.numel() else 0.0
    return float(timestep)


class Clock:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.driver: Driver = "timestep"
        self.step = 0
        self.pass_index = 0
        self.last_t: float | None = None
        self._passes_in_step = 0
        self.in_generation = False  # "pipeline" driver: a pipeline call is denoising
        self.merging = True  # whether the current step merges (the schedule's answer)
        self.merged_steps = 0  # steps of this generation that merged before the current one
        self.num_steps: int | None = None  # steps of the generation, where known
        self.timesteps: list[float] | None = None  # normalised timestep of each step, where known
        self.timestep_scale = 1000.0  # what the denoiser receives at pure noise (the adapter's)
        self._observed_t: float | None = None  # normalised timestep seen by the "timestep" driver

    # ---- external drivers (pipeline hooks, benchmarks) ----

    def reset(
        self, num_steps: int | None = None, timesteps: Sequence[float] | None = None, *, ask: bool = True
    ) -> None:
        """Start of a generation: step 0, every plan recomputed.

        ``num_steps`` (kept for later generations until given again) and ``timesteps`` (normalised
        to [0, 1], one per step; this generation only) are what schedules that need them read.
        ``ask=False``: step 0 does not merge and the schedule is not asked (see :meth:`restart`).
        """
        self.timesteps = None if timesteps is None else [float(t) for t in timesteps]
        if self.timesteps is not None:
            num_steps = len(self.timesteps)
        if num_steps is not None:
            self.num_steps = num_steps
        self.step = 0
        self.merged_steps = 0
        self.last_t = None
        self.runtime.restart_draws()  # noise-drawing selectors: the same seed, the same image
        self._open_step(ask)

    def restart(self, num_steps: int | None = None) -> None:
        """Back to step 0 outside a denoiser call (``handle.reset``, ``handle.set_num_steps``).

        Driven by the timesteps or a pipeline, the next call or pipeline generation starts a
        generation and asks the merge schedule then: a schedule that needs a timestep, or a step
        count not known yet, is not asked now (nothing merges until then). The ``"manual"`` driver
        has no such next start: it is asked now, and reports what it lacks."""
        needs = self.runtime.schedule.needs
        known = num_steps is not None or self.num_steps is not None
        waits = self.driver != "manual" and (needs == "timestep" or (needs == "num_steps" and not known))
        self.reset(num_steps, self.timesteps if needs == "timestep" else None, ask=not waits)

    def start(self, scheduler: Any) -> None:
        """A generation of ``scheduler``'s current timesteps begins."""
        timesteps = getattr(scheduler, "timesteps", None)
        num_steps = len(timesteps) if timesteps is not None else None
        if self.runtime.schedule.needs == "timestep" and timesteps is not None:
            # One small device read per generation, before its first step.
            scale = float(getattr(getattr(scheduler, "config", None), "num_train_timesteps", 1000) or 1000)
            values = timesteps.tolist() if isinstance(timesteps, torch.Tensor) else list(timesteps)
            self.reset(timesteps=[float(t) / scale for t in values])
        else:
            self.reset(num_steps=num_steps)

    def end_step(self) -> None:
        """A denoising step finished."""
        if self.merging:
            self.merged_steps += 1
        self.step += 1
        self._open_step()

    def start_generation(self, scheduler: Any = None) -> None:
        """A pipeline call starts denoising with ``scheduler`` (which drives the steps from here)."""
        self.in_generation = True
        if scheduler is None:
            self.reset()
        else:
            self.start(scheduler)

    def end_generation(self) -> None:
        """A pipeline call finished: the next call, from anywhere, starts a new generation."""
        self.in_generation = False
        self.last_t = None
        self._open_step()

    def _open_step(self, ask: bool = True) -> None:
        self.pass_index = 0
        self._passes_in_step = 0
        runtime = self.runtime
        # Past the scheduler's last timestep (after its last step) there is no step to merge.
        beyond = self.timesteps is not None and self.step >= len(self.timesteps)
        self.merging = (
            ask and not beyond and runtime.schedule.merges(self.step, self.num_steps, self._timestep())
        )
        was = runtime.enabled
        runtime.enabled = runtime.switched_on and self.merging
        decision = runtime.reuse.decide(self.merged_steps) if self.merging else None
        if decision is not None:
            runtime.mark_all(decision)
        if runtime.on_new_tokens is not None and (was != runtime.enabled or decision is Decision.SELECT):
            # What a cache hook kept from the last step holds other tokens now (another count, or
            # other destinations): let such hooks compute again.
            runtime.on_new_tokens()

    def _timestep(self) -> float | None:
        if self.runtime.schedule.needs != "timestep":
            return None
        return self.timesteps[self.step] if self.timesteps is not None else self._observed_t

    # ---- called at the top of every denoiser call ----

    def begin_call(self, timestep: Any) -> None:
        policy = self.runtime.reuse
        scheduled = self.runtime.schedule.needs != "nothing"
        if not policy.needs_step and not scheduled:
            self.pass_index = 0
            self.runtime.mark_all(Decision.SELECT)
            return
        if self.driver == "manual" or (self.driver == "pipeline" and self.in_generation):
            if self._passes_in_step < MAX_PASSES_PER_STEP:
                # Guidance passes of one step keep separate plans.
                self.pass_index = self._passes_in_step
                self._passes_in_step += 1
            elif self.driver == "manual":
                self.pass_index = 0
                self.runtime.mark_all(Decision.SELECT)
            else:
                # Nothing closes steps (a custom loop with another scheduler): follow the timesteps.
                self.in_generation = False
                self.last_t = None
                self._observe_call(timestep, scheduled)
        else:
            self._observe_call(timestep, scheduled)
        if not policy.needs_step and self.merging:
            self.pass_index = 0
            self.runtime.mark_all(Decision.SELECT)

    def _observe_call(self, timestep: Any, scheduled: bool) -> None:
        if torch.compiler.is_compiling():
            if scheduled:
                raise RuntimeError(
                    f"merge schedule {self.runtime.schedule.name!r} cannot follow the steps of a compiled bare "
                    "denoiser (the timestep cannot be read inside the graph): apply tokenreduce to the "
                    "pipeline, or drive the clock yourself (handle.runtime.clock.driver = 'manual')"
                )
            # The timestep cannot be read inside a graph: recompute, never reuse a stale plan.
            self.pass_index = 0
            self.runtime.mark_all(Decision.SELECT)
        else:
            self._observe(timestep_value(timestep) if timestep is not None else None)

    def _observe(self, t: float | None) -> None:
        self._observed_t = None if t is None else t / self.timestep_scale
        if t is None or self.last_t is None or t > self.last_t:
            self.reset()  # a new generation
        elif t == self.last_t and self.pass_index + 1 < MAX_PASSES_PER_STEP:
            self.pass_index += 1  # another guidance pass of the same step
        elif t == self.last_t:
            self.reset()  # the same timestep again and again: repeated one-step generations
        else:
            self.end_step()
        self.last_t = t
