"""The denoising-step clock that drives reuse decisions.

The step index comes from the timestep the denoiser receives: a new value is a new step, the
same value again is another guidance pass of the same step, a larger value starts a new
generation. When the model belongs to a pipeline, the scheduler's ``set_timesteps`` resets the
clock at the start of every pipeline call and ``step`` closes each denoising step (exact, with
no device read; this is also what drives the clock when the denoiser runs compiled).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from framework.interfaces import Decision

if TYPE_CHECKING:
    from framework.engine.runtime import Runtime


def timestep_value(timestep: Any) -> float:
    """The first element of a timestep as a Python float (one small device read if on a GPU)."""
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0].item()) if timestep.numel() else 0.0
    return float(timestep)


class Clock:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.step = 0
        self.pass_index = 0
        self.last_t: float | None = None
        self.scheduler_attached = False
        self._step_opened_by_scheduler = False
        self.calls = 0
        self._passes_in_step = 0  # compiled calls since the scheduler opened the step

    # ---- driven by the pipeline's scheduler (host only) ----

    def reset(self) -> None:
        """Start of a pipeline call: step 0, every plan recomputed."""
        self.step = 0
        self.pass_index = 0
        self.last_t = None
        self._step_opened_by_scheduler = True
        self._passes_in_step = 0
        self._mark()

    def end_step(self) -> None:
        """The scheduler finished a denoising step."""
        self.step += 1
        self.pass_index = 0
        self._step_opened_by_scheduler = True
        self._passes_in_step = 0
        self._mark()

    # ---- driven by the denoiser's own forward ----

    def begin_call(self, timestep: Any) -> None:
        """Called at the top of every eager denoiser call."""
        self.calls += 1
        policy = self.runtime.reuse
        if not policy.needs_step:
            self.pass_index = 0
            self.runtime.mark_all(Decision.SELECT)
            return
        t = timestep_value(timestep) if timestep is not None else None
        if self._step_opened_by_scheduler:
            self._step_opened_by_scheduler = False
        elif t is None or self.last_t is None or t > self.last_t:
            self.step = 0  # a new generation
            self.pass_index = 0
            self._mark()
        elif t == self.last_t:
            self.pass_index += 1  # another guidance pass of the same step
        else:
            self.step += 1
            self.pass_index = 0
            self._mark()
        self.last_t = t

    def begin_compiled_call(self) -> None:
        """The traced counterpart of :meth:`begin_call`: no device reads, few distinct values."""
        if not self.runtime.reuse.needs_step or not self.scheduler_attached:
            # Nothing outside the graph advances the clock: recompute, never reuse a stale plan.
            self.pass_index = 0
            self.runtime.mark_all(Decision.SELECT)
        else:
            # Guidance passes of one step keep separate plans (values 0, 1: few graphs).
            self.pass_index = self._passes_in_step
            self._passes_in_step += 1

    def _mark(self) -> None:
        self.runtime.mark_all(self.runtime.reuse.decide(self.step))
