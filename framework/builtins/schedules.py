"""Merge schedules: which denoising steps merge at all (the others run the unmodified model).

- ``always``: every step (the default).
- ``every``: steps ``offset, offset + k, offset + 2k, ...`` (``range(offset, steps, k)``); the
  ToMA release's ``merge_step = range(0, steps, 3)`` is ``{name: every, k: 3}``.
- ``window``: steps whose index lies in ``[start, stop)`` as fractions of the number of steps.
- ``timesteps``: steps whose normalised timestep ``t / num_train_timesteps`` lies in
  ``(above, below]``; ToDo's ``timestep / 1000 > timestep_threshold_stop`` is ``above: stop``.
- ``steps``: an explicit list of step indices.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tokenreduce.interfaces import MergeSchedule
from tokenreduce.params import StrictParams

#: Fractions of the step count are compared with this slack, so 0.5 of 20 steps is exactly step 10.
_EPS = 1e-9


def _need(what: str, name: str, how: str) -> ValueError:
    return ValueError(f"merge schedule {name!r} needs {what} of each generation: {how}")


_NUM_STEPS_HOW = (
    "apply to the pipeline (its scheduler gives it), call handle.set_num_steps(n) before generating "
    "with a bare denoiser, or pass num_steps to clock.reset() when driving the clock yourself"
)
_TIMESTEP_HOW = (
    "apply to the pipeline (its scheduler gives it), call a bare denoiser eagerly (it reads the "
    "timestep it receives), or pass timesteps to clock.reset() when driving the clock yourself"
)


class AlwaysSchedule(MergeSchedule):
    """Merge at every denoising step."""

    name = "always"
    needs = "nothing"

    class Params(StrictParams):
        name: Literal["always"] = "always"

    params: Params

    def merges(self, step: int, num_steps: int | None, timestep: float | None) -> bool:
        return True


class EverySchedule(MergeSchedule):
    """Merge at steps ``offset, offset + k, offset + 2k, ...``; the others run unmodified."""

    name = "every"
    needs = "step"

    class Params(StrictParams):
        name: Literal["every"] = "every"
        k: int = Field(3, ge=1, description="Merge every k-th step.")
        offset: int = Field(0, ge=0, description="First merged step (0-based); steps before it never merge.")

    params: Params

    def merges(self, step: int, num_steps: int | None, timestep: float | None) -> bool:
        k, offset = self.params.k, self.params.offset
        return step >= offset and (step - offset) % k == 0


class WindowSchedule(MergeSchedule):
    """Merge at steps ``i`` with ``start <= i / steps < stop`` (fractions of the number of steps)."""

    name = "window"
    needs = "num_steps"

    class Params(StrictParams):
        name: Literal["window"] = "window"
        start: float = Field(
            0.0, ge=0.0, le=1.0, description="First merged step, as a fraction of the steps."
        )
        stop: float = Field(1.0, ge=0.0, le=1.0, description="Steps from this fraction on do not merge.")

        @field_validator("start", "stop", mode="before")
        @classmethod
        def _number(cls, value: object) -> object:
            return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

        @model_validator(mode="after")
        def _ordered(self) -> WindowSchedule.Params:
            if self.start >= self.stop:
                raise ValueError(
                    f"start ({self.start}) must be below stop ({self.stop}); the window is empty"
                )
            return self

    params: Params

    def merges(self, step: int, num_steps: int | None, timestep: float | None) -> bool:
        if num_steps is None:
            raise _need("the number of steps", self.name, _NUM_STEPS_HOW)
        first = math.ceil(self.params.start * num_steps - _EPS)
        end = math.ceil(self.params.stop * num_steps - _EPS)
        return first <= step < end


class TimestepSchedule(MergeSchedule):
    """Merge at steps whose normalised timestep ``t / num_train_timesteps`` is in ``(above, below]``."""

    name = "timesteps"
    needs = "timestep"

    class Params(StrictParams):
        name: Literal["timesteps"] = "timesteps"
        above: float = Field(
            0.0,
            ge=0.0,
            le=1.0,
            description="Merge only while the normalised timestep is above this (1: noise).",
        )
        below: float = Field(1.0, ge=0.0, le=1.0, description="Merge only while it is at most this.")

        @field_validator("above", "below", mode="before")
        @classmethod
        def _number(cls, value: object) -> object:
            return float(value) if isinstance(value, int) and not isinstance(value, bool) else value

        @model_validator(mode="after")
        def _ordered(self) -> TimestepSchedule.Params:
            if self.above >= self.below:
                raise ValueError(
                    f"above ({self.above}) must be below `below` ({self.below}); no step would merge"
                )
            return self

    params: Params

    def merges(self, step: int, num_steps: int | None, timestep: float | None) -> bool:
        if timestep is None:
            raise _need("the timestep", self.name, _TIMESTEP_HOW)
        return self.params.above < timestep <= self.params.below


class StepListSchedule(MergeSchedule):
    """Merge at the listed step indices only."""

    name = "steps"
    needs = "step"

    class Params(StrictParams):
        name: Literal["steps"] = "steps"
        steps: list[int] = Field(description="0-based indices of the steps that merge.")

        @field_validator("steps")
        @classmethod
        def _valid(cls, value: list[int]) -> list[int]:
            if not value:
                raise ValueError(
                    "give at least one step (an empty list never merges: remove tokenreduce instead)"
                )
            if any(s < 0 for s in value):
                raise ValueError(f"step indices are 0-based and non-negative, got {value}")
            if len(set(value)) != len(value):
                raise ValueError(f"step indices must be unique, got {value}")
            return sorted(value)

    params: Params

    def __init__(self, params: StrictParams | None = None) -> None:
        super().__init__(params)
        self._steps = frozenset(self.params.steps)

    def merges(self, step: int, num_steps: int | None, timestep: float | None) -> bool:
        return step in self._steps


SCHEDULES = (AlwaysSchedule, EverySchedule, WindowSchedule, TimestepSchedule, StepListSchedule)
