"""End-to-end speed implied by a merge schedule and a reuse policy."""

from __future__ import annotations

import pytest

from tokenreduce.builtins.schedules import AlwaysSchedule, EverySchedule, WindowSchedule
from tokenreduce.quality.speed import end_to_end_speedup, schedule_speedup, step_kinds
from tokenreduce.toma_plugin.step_sharing import StepSharingPolicy


def policy(d: int, w: int) -> StepSharingPolicy:
    return StepSharingPolicy(StepSharingPolicy.Params(destinations_every=d, weights_every=w))


def every(k: int, offset: int = 0) -> EverySchedule:
    return EverySchedule(EverySchedule.Params(k=k, offset=offset))


@pytest.mark.parametrize(("k", "offset", "steps"), [(1, 0, 20), (3, 0, 20), (3, 2, 20), (4, 1, 50)])
def test_counts_follow_the_clock(k, offset, steps):
    """Reuse counts merged steps only: with weights every 5 merged steps, 1 in 5 merged steps computes."""
    counts = step_kinds(every(k, offset), policy(10, 5), steps)
    merged = len(range(offset, steps, k))
    assert counts == {
        "unmerged": steps - merged,
        "computed": len(range(0, merged, 5)),
        "reused": merged - len(range(0, merged, 5)),
    }


def test_always_selecting_policy_computes_every_merged_step():
    counts = step_kinds(WindowSchedule(WindowSchedule.Params(start=0.5)), policy(1, 1), 20)
    assert counts == {"unmerged": 10, "computed": 10, "reused": 0}


def test_end_to_end_speedup_mixes_step_kinds():
    times = {"unmerged": 1.0, "computed": 0.8, "reused": 0.5}
    # 10 steps: 4 unmerged, 2 computed, 4 reused -> 10 / (4 + 1.6 + 2.0)
    assert end_to_end_speedup(times, {"unmerged": 4, "computed": 2, "reused": 4}) == pytest.approx(10 / 7.6)
    # Every step merged and reused: the per-step speedup itself.
    assert end_to_end_speedup(times, {"reused": 5}) == pytest.approx(2.0)
    # Nothing merged: no speedup.
    assert end_to_end_speedup(times, {"unmerged": 7}) == pytest.approx(1.0)


def test_schedule_speedup_of_a_config():
    config = {"adapter": {"name": "sdxl"}, "reuse": {"name": "always"}, "schedule": {"name": "every", "k": 3}}
    # 20 steps, 7 merged at 2x: 20 / (13 + 3.5)
    assert schedule_speedup(config, 2.0, 20) == pytest.approx(20 / 16.5)
    assert schedule_speedup({**config, "schedule": {"name": "always"}}, 2.0, 20) == pytest.approx(2.0)
    assert step_kinds(AlwaysSchedule(), policy(1, 1), 3) == {"unmerged": 0, "computed": 3, "reused": 0}


@pytest.mark.parametrize(
    ("times", "counts", "match"),
    [
        ({"unmerged": 1.0}, {"merged": 2}, "unknown step kinds"),
        ({"unmerged": 1.0}, {"computed": 2}, "no per-step time"),
        ({"unmerged": 1.0, "computed": 0.0}, {"computed": 2}, "positive"),
        ({"unmerged": 1.0}, {"unmerged": 0}, "not all zero"),
    ],
)
def test_bad_input_is_named(times, counts, match):
    with pytest.raises(ValueError, match=match):
        end_to_end_speedup(times, counts)
