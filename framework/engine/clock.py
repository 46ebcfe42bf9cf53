"""The denoising-step clock that drives reuse decisions.

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
"""

from __future__ import annotations

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

    # ---- external drivers (scheduler hooks, benchmarks) ----

    def reset(self) -> None:
        """Start of a generation: step 0, every plan recomputed."""
        self.step = 0
        self.last_t = None
        self._open_step()

    def end_step(self) -> None:
        """A denoising step finished."""
        self.step += 1
        self._open_step()

    def start_generation(self) -> None:
        """A pipeline call starts denoising (its scheduler drives the steps from here)."""
        self.in_generation = True
        self.reset()

    def end_generation(self) -> None:
        """A pipeline call finished: the next call, from anywhere, starts a new generation."""
        self.in_generation = False
        self.last_t = None
        self._open_step()

    def _open_step(self) -> None:
        self.pass_index = 0
        self._passes_in_step = 0
        self.runtime.mark_all(self.runtime.reuse.decide(self.step))

    # ---- called at the top of every denoiser call ----

    def begin_call(self, timestep: Any) -> None:
        policy = self.runtime.reuse
        if not policy.needs_step:
            self.pass_index = 0
            self.runtime.mark_all(Decision.SELECT)
        elif self.driver == "manual" or (self.driver == "pipeline" and self.in_generation):
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
                self._observe_call(timestep)
        else:
            self._observe_call(timestep)

    def _observe_call(self, timestep: Any) -> None:
        if torch.compiler.is_compiling():
            # The timestep cannot be read inside a graph: recompute, never reuse a stale plan.
            self.pass_index = 0
            self.runtime.mark_all(Decision.SELECT)
        else:
            self._observe(timestep_value(timestep) if timestep is not None else None)

    def _observe(self, t: float | None) -> None:
        if t is None or self.last_t is None or t > self.last_t:
            self.reset()  # a new generation
        elif t == self.last_t and self.pass_index + 1 < MAX_PASSES_PER_STEP:
            self.pass_index += 1  # another guidance pass of the same step
        elif t == self.last_t:
            self.reset()  # the same timestep again and again: repeated one-step generations
        else:
            self.end_step()
        self.last_t = t
