"""End-to-end generation speed implied by a merge schedule: the speed axis of the fidelity plots.

A generation runs three kinds of denoising steps: ``unmerged`` (the schedule skips the step: the
unmodified model), ``computed`` (merged, new destinations and/or weights) and ``reused`` (merged,
the cached plan). Its time is the sum over steps of each kind's per-step time; the speedup over
the unmodified model is ``steps x unmerged time / that sum``. The per-step speed of a merged
step alone (what ``tokenreduce bench`` reports) overstates a schedule that merges some steps only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenreduce.interfaces import Decision, MergeSchedule, ReusePolicy

STEP_KINDS = ("unmerged", "computed", "reused")


def step_kinds(
    schedule: MergeSchedule, reuse: ReusePolicy, num_steps: int, timesteps: Sequence[float] | None = None
) -> dict[str, int]:
    """How many steps of each kind a ``num_steps``-step generation runs.

    Follows the clock: the reuse policy's step is the count of merged steps before this one.
    ``timesteps`` (normalised, one per step) for timestep schedules; default evenly spaced from 1.
    """
    if timesteps is None and schedule.needs == "timestep":
        timesteps = [1 - i / num_steps for i in range(num_steps)]
    counts = dict.fromkeys(STEP_KINDS, 0)
    merged = 0
    for merges in schedule.steps(num_steps, timesteps):
        if not merges:
            counts["unmerged"] += 1
            continue
        decision = reuse.decide(merged) if reuse.needs_step else Decision.SELECT
        counts["reused" if decision is Decision.REUSE else "computed"] += 1
        merged += 1
    return counts


def end_to_end_speedup(step_seconds: Mapping[str, float], counts: Mapping[str, int]) -> float:
    """Unmodified generation time over this generation's: ``sum(counts) x unmerged / sum(count x time)``.

    ``step_seconds``: per-step time of each kind in :data:`STEP_KINDS` (any unit; only kinds
    with a non-zero count are read).
    """
    unknown = set(counts) - set(STEP_KINDS)
    if unknown:
        raise ValueError(f"unknown step kinds {sorted(unknown)}; valid: {', '.join(STEP_KINDS)}")
    if any(n < 0 for n in counts.values()) or not sum(counts.values()):
        raise ValueError(f"step counts must be non-negative and not all zero, got {dict(counts)}")
    missing = [k for k, n in counts.items() if n and k not in step_seconds]
    missing += [] if "unmerged" in step_seconds else ["unmerged"]
    if missing:
        raise ValueError(f"no per-step time for {sorted(set(missing))}")
    if any(step_seconds[k] <= 0 for k, n in counts.items() if n) or step_seconds["unmerged"] <= 0:
        raise ValueError(f"per-step times must be positive, got {dict(step_seconds)}")
    total = sum(n * step_seconds[k] for k, n in counts.items() if n)
    return sum(counts.values()) * step_seconds["unmerged"] / total


def times_from_bench(merged_speedup: float) -> dict[str, float]:
    """Relative per-step times from a ``tokenreduce bench`` speedup: the unmodified step is 1.

    The bench times merged steps averaged over the reuse policy's cycle, so one speedup gives one
    time for both merged kinds (their mix in the cycle is the policy's, as in a generation).
    """
    if merged_speedup <= 0:
        raise ValueError(f"speedup must be positive, got {merged_speedup}")
    return {"unmerged": 1.0, "computed": 1.0 / merged_speedup, "reused": 1.0 / merged_speedup}


def schedule_speedup(config: Any, merged_speedup: float, num_steps: int) -> float:
    """End-to-end speedup of ``config`` (a config mapping or object) from the bench's merged-step speedup."""
    from tokenreduce.config import load_config, resolve

    resolved = resolve(load_config(config))
    schedule = resolved.schedule
    assert schedule is not None
    counts = step_kinds(schedule, resolved.reuse, num_steps)
    return end_to_end_speedup(times_from_bench(merged_speedup), counts)
