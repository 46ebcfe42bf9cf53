"""Step-sharing reuse policy: the recompute schedule and the attributes the runtime reads."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

import tokenreduce.toma_plugin
from tokenreduce.config import load_config, resolve
from tokenreduce.engine.runtime import Runtime
from tokenreduce.interfaces import Decision
from tokenreduce.registry import Registry
from tokenreduce.toma_plugin.step_sharing import StepSharingPolicy

S, W, R = Decision.SELECT, Decision.WEIGHTS, Decision.REUSE


def policy(**params: object) -> StepSharingPolicy:
    return StepSharingPolicy(StepSharingPolicy.Params(**params))


def test_default_schedule_matches_the_paper() -> None:
    # destinations every 10 steps, weights every 5 steps
    expected = [S, R, R, R, R, W, R, R, R, R] * 3 + [S]
    assert [policy().decide(step) for step in range(31)] == expected


def test_custom_schedule() -> None:
    expected = [S, R, W, R, W, R, S, R, W, R, W, R, S]
    assert [policy(destinations_every=6, weights_every=2).decide(step) for step in range(13)] == expected


def test_weights_period_longer_than_destinations_period() -> None:
    # destinations imply weights: step 0, 2, 4, 6 select; 3 is a weights-only step; 6 selects, not weights
    expected = [S, R, S, W, S, R, S, R, S, W]
    assert [policy(destinations_every=2, weights_every=3).decide(step) for step in range(10)] == expected


@given(st.integers(1, 12), st.integers(1, 12), st.integers(1, 60))
def test_recomputes_exactly_on_schedule(dest_every: int, weights_every: int, steps: int) -> None:
    decisions = [
        policy(destinations_every=dest_every, weights_every=weights_every).decide(s) for s in range(steps)
    ]
    selects = [s for s, d in enumerate(decisions) if d is S]
    weights = [s for s, d in enumerate(decisions) if d is not R]
    assert selects == list(range(0, steps, dest_every))
    assert weights == sorted(set(range(0, steps, dest_every)) | set(range(0, steps, weights_every)))
    assert decisions[0] is S  # a fresh generation always starts from new destinations


def test_needs_step() -> None:
    assert policy().needs_step
    assert policy(destinations_every=2, weights_every=1).needs_step
    assert not policy(destinations_every=1, weights_every=1).needs_step
    # destinations every step already recompute everything every step
    assert not policy(destinations_every=1, weights_every=3).needs_step


@pytest.mark.parametrize("sharing", ["kind", "block"])
def test_sharing_is_an_instance_attribute(sharing: str) -> None:
    assert policy(sharing=sharing).sharing == sharing
    assert StepSharingPolicy().sharing == "kind"


@pytest.mark.parametrize(
    "params",
    [
        {"destinations_every": 0},
        {"weights_every": 0},
        {"weights_every": -5},
        {"sharing": "layer"},
        {"every": 2},
    ],
)
def test_invalid_params_are_rejected(params: dict) -> None:
    with pytest.raises(ValidationError):
        StepSharingPolicy.Params(**params)


# --------------------------------------------------------------------------- through the runtime


def toma_runtime(**reuse: object) -> Runtime:
    registry = Registry()
    tokenreduce.toma_plugin.tokenreduce_register(registry=registry)
    config = load_config(
        {
            "adapter": {"name": "auto"},
            "ratio": 0.5,
            "selector": {"name": "facility_location"},
            "merger": {"name": "attention"},
            "partitioner": {"name": "tile", "size": 4},
            "reuse": {"name": "step_sharing", **reuse},
        },
        registry=registry,
    )
    return Runtime(resolve(config, registry))


def record_steps(runtime: Runtime, owner: object, method: str) -> list[int]:
    """Log the denoising step of every call of ``owner.method`` (instance attribute, this runtime only)."""
    log: list[int] = []
    original = getattr(owner, method)

    def recorded(*args: object) -> object:
        log.append(runtime.clock.step)
        return original(*args)

    setattr(owner, method, recorded)
    return log


def run_generation(runtime: Runtime, steps: int, passes: int) -> None:
    """Denoise ``steps`` steps with ``passes`` guidance passes each through one sharing group."""
    group = runtime.group("level", "block0")
    gen = torch.Generator().manual_seed(0)
    for step, t in enumerate(torch.linspace(999, 0, steps)):
        for _ in range(passes):
            runtime.clock.begin_call(t)
            x = torch.randn(2, 96, 8, generator=gen)
            merged = runtime.plan(group, x, (8, 12)).merge(x)
            assert merged.shape == (2, 48, 8)
            if runtime.reuse.needs_step:
                assert runtime.clock.step == step


@pytest.mark.parametrize("passes", [1, 2])
def test_runtime_recomputes_on_schedule(passes: int) -> None:
    runtime = toma_runtime(destinations_every=4, weights_every=2)
    selected = record_steps(runtime, runtime.selector, "select")
    planned = record_steps(runtime, runtime.merger, "plan")
    run_generation(runtime, 11, passes)
    assert selected == [s for s in (0, 4, 8) for _ in range(passes)]
    assert planned == [s for s in (0, 2, 4, 6, 8, 10) for _ in range(passes)]
    # A new generation starts from new destinations again.
    selected.clear()
    run_generation(runtime, 3, passes)
    assert selected == [0] * passes


def test_runtime_recomputes_every_call_when_periods_are_one() -> None:
    runtime = toma_runtime(destinations_every=1, weights_every=1)
    selected = record_steps(runtime, runtime.selector, "select")
    planned = record_steps(runtime, runtime.merger, "plan")
    run_generation(runtime, 4, 2)
    assert len(selected) == len(planned) == 8


@pytest.mark.parametrize(("sharing", "shared"), [("kind", True), ("block", False)])
def test_runtime_groups_follow_sharing(sharing: str, shared: bool) -> None:
    runtime = toma_runtime(sharing=sharing)
    assert (runtime.group("level", "block0") is runtime.group("level", "block1")) is shared
