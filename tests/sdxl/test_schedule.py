"""Merge schedules: which denoising steps merge, under every clock driver, composed with reuse."""

from __future__ import annotations

import copy
from fractions import Fraction
from typing import Any

import pytest
import torch

import tokenreduce as tr
from tokenreduce.builtins.schedules import EverySchedule, StepListSchedule, TimestepSchedule, WindowSchedule
from tokenreduce.quality.proxy.models import ProxyPipeline, build_denoiser, build_prompts
from tokenreduce.testing.tiny_flux import tiny_flux_inputs, tiny_flux_transformer
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs

from .conftest import config, run
from .test_reuse import GROUPS, count_calls

TIMESTEPS = [float(t) for t in torch.linspace(950.0, 50.0, 10)]


def at(inputs: dict[str, Any], timestep: float, key: str = "timestep") -> dict[str, Any]:
    value = inputs[key]
    return {**inputs, key: torch.full_like(value, timestep) if value.ndim else torch.tensor(timestep)}


# --------------------------------------------------------------------------- the schedules themselves


@pytest.mark.parametrize(("k", "offset"), [(1, 0), (3, 0), (3, 2), (4, 1), (2, 5)])
def test_every_is_the_release_range(k, offset):
    """``every`` merges exactly the steps of ``range(offset, steps, k)`` (the release: offset 0, k 3)."""
    schedule = EverySchedule(EverySchedule.Params(k=k, offset=offset))
    for steps in (1, 7, 20, 50):
        assert [i for i, m in enumerate(schedule.steps(steps)) if m] == list(range(offset, steps, k))


@pytest.mark.parametrize("steps", [4, 10, 20, 30, 50])
def test_window_by_fraction(steps):
    schedule = WindowSchedule(WindowSchedule.Params(start=0.5, stop=0.9))
    got = [i for i, m in enumerate(schedule.steps(steps)) if m]
    assert got == [i for i in range(steps) if Fraction(1, 2) <= Fraction(i, steps) < Fraction(9, 10)]
    with pytest.raises(ValueError, match="number of steps.*set_num_steps"):
        schedule.merges(0, None, None)


def test_timestep_thresholds_as_todo():
    """ToDo merges while ``timestep / 1000 > timestep_threshold_stop``."""
    stop = 0.4
    schedule = TimestepSchedule(TimestepSchedule.Params(above=stop))
    for t in TIMESTEPS:
        assert schedule.merges(0, None, t / 1000) == (t / 1000 > stop)
    with pytest.raises(ValueError, match="needs the timestep"):
        schedule.merges(0, 10, None)


def test_explicit_steps_and_bad_params():
    schedule = StepListSchedule(StepListSchedule.Params(steps=[7, 0, 3]))
    assert [i for i, m in enumerate(schedule.steps(10)) if m] == [0, 3, 7]
    for bad, match in (
        ({"name": "steps", "steps": []}, "at least one step"),
        ({"name": "steps", "steps": [1, 1]}, "unique"),
        ({"name": "steps", "steps": [-1]}, "non-negative"),
        ({"name": "every", "k": 0}, "schedule.k"),
        ({"name": "window", "start": 0.6, "stop": 0.5}, "window is empty"),
        ({"name": "timesteps", "above": 0.8, "below": 0.2}, "no step would merge"),
        ({"name": "sometimes"}, "valid schedules: always, every"),
    ):
        with pytest.raises(tr.ConfigError, match=match):
            tr.load_config(config(schedule=bad))


# --------------------------------------------------------------------------- bare denoisers


def merged_per_call(model: torch.nn.Module, runtime: Any) -> list[bool]:
    """Record, after each call's clock tick, whether the call merged."""
    log: list[bool] = []
    model.register_forward_hook(lambda *_: log.append(runtime.enabled))
    return log


def test_unmerged_steps_are_bit_exact_and_merged_ones_are_not(unet):
    twin = copy.deepcopy(unet)
    handle = tr.apply(unet, config(schedule={"name": "every", "k": 3, "offset": 1}))
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=1)
    for generation in range(2):
        for step, t in enumerate(TIMESTEPS):
            got, want = run(unet, at(inputs, t)), run(twin, at(inputs, t))
            merges = step >= 1 and (step - 1) % 3 == 0
            assert torch.equal(got, want) != merges, (generation, step)
            assert handle.runtime.clock.step == step


def test_reuse_counts_the_merged_steps(unet):
    """Destinations every 2 merged steps under ``every k: 2``: selected on steps 0, 4, 8, weights on 2, 6."""
    handle = tr.apply(
        unet,
        config(
            reuse={"name": "step_sharing", "destinations_every": 2, "weights_every": 1},
            schedule={"name": "every", "k": 2},
        ),
    )
    calls = count_calls(handle.runtime)
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=2)
    selects, weights = [], []
    for t in TIMESTEPS:
        before = dict(calls)
        run(unet, at(inputs, t))
        selects.append(calls["select"] - before["select"])
        weights.append(calls["weights"] - before["weights"])
    merged = [i % 2 == 0 for i in range(len(TIMESTEPS))]
    count = [sum(merged[:i]) for i in range(len(TIMESTEPS))]  # merged steps before each step
    assert weights == [GROUPS if m else 0 for m in merged]
    assert selects == [GROUPS if m and c % 2 == 0 else 0 for m, c in zip(merged, count, strict=True)]


def test_window_on_a_bare_denoiser_needs_the_step_count(unet):
    handle = tr.apply(unet, config(schedule={"name": "window", "start": 0.5}))
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=3)
    with pytest.raises(ValueError, match="set_num_steps"):
        run(unet, at(inputs, TIMESTEPS[0]))
    handle.set_num_steps(len(TIMESTEPS))
    log = merged_per_call(unet, handle.runtime)
    for t in TIMESTEPS:
        run(unet, at(inputs, t))
    assert log == [i >= len(TIMESTEPS) // 2 for i in range(len(TIMESTEPS))]
    with pytest.raises(ValueError, match="positive integer"):
        handle.set_num_steps(0)


@pytest.mark.parametrize(
    "schedule",
    [{"name": "timesteps", "above": 0.4}, {"name": "window", "start": 0.5}],
    ids=["timesteps", "window"],
)
def test_restarting_a_bare_denoiser_before_its_first_call(unet, schedule):
    """``reset`` and ``set_num_steps`` work before the schedule has what it needs; the first call asks it."""
    handle = tr.apply(unet, config(schedule=schedule))
    handle.reset()
    handle.set_num_steps(len(TIMESTEPS))
    handle.reset()
    log = merged_per_call(unet, handle.runtime)
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=5)
    for t in TIMESTEPS:
        run(unet, at(inputs, t))
    if schedule["name"] == "timesteps":
        assert log == [t / 1000 > 0.4 for t in TIMESTEPS]
    else:
        assert log == [i >= len(TIMESTEPS) // 2 for i in range(len(TIMESTEPS))]
    # A cache hook on the denoiser hears that the merged steps' tokens are gone.
    heard: list[int] = []
    handle.runtime.on_new_tokens = lambda: heard.append(1)
    merging = handle.runtime.enabled  # the window merges the last step, the timesteps do not
    assert merging == log[-1]
    handle.reset()
    assert heard == ([1] if merging else []) and not handle.runtime.enabled
    # Driven by hand there is no first call to wait for: what the schedule lacks is said at once.
    manual = tr.apply(copy.deepcopy(unet), config(schedule=schedule))
    manual.runtime.clock.driver = "manual"
    with pytest.raises(ValueError, match="needs the"):
        manual.reset()


def test_disabled_and_schedule_compose(unet):
    handle = tr.apply(unet, config(schedule={"name": "steps", "steps": [1]}))
    log = merged_per_call(unet, handle.runtime)
    inputs = tiny_sdxl_inputs(unet, batch=2, seed=4)
    run(unet, at(inputs, 900.0))
    with handle.disabled():
        run(unet, at(inputs, 950.0))  # the user's switch wins; the clock does not tick
    run(unet, at(inputs, 800.0))  # step 1 of the first generation
    run(unet, at(inputs, 700.0))
    assert log == [False, False, True, False]


def test_flux_timestep_schedule_reads_the_normalised_timestep():
    """Flux's transformer receives ``t / 1000``: the same thresholds apply as for SDXL's ``t``."""
    model = tiny_flux_transformer(seed=0)
    handle = tr.apply(
        model,
        {
            "adapter": {"name": "flux", "skip_double": 1, "skip_single": 1},
            "partitioner": {"name": "tile", "size": [4, 4]},
            "schedule": {"name": "timesteps", "above": 0.5},
        },
    )
    log = merged_per_call(model, handle.runtime)
    inputs = tiny_flux_inputs(model, batch=2, seed=0)
    with torch.no_grad():
        for t in TIMESTEPS:
            model(**at(inputs, t / 1000))
    assert log == [t / 1000 > 0.5 for t in TIMESTEPS]


# --------------------------------------------------------------------------- pipelines (scheduler clock)


EVERY = {"name": "every", "k": 3, "offset": 2}
WINDOW = {"name": "window", "start": 0.25, "stop": 0.75}
TIMESTEP_WINDOW = {"name": "timesteps", "above": 0.3, "below": 0.8}


@pytest.mark.parametrize(
    ("kind", "schedule"),
    [("sdxl", EVERY), ("sdxl", TIMESTEP_WINDOW), ("flux", WINDOW), ("flux", TIMESTEP_WINDOW)],
    ids=lambda v: v if isinstance(v, str) else v["name"],
)
def test_pipeline_schedules_follow_the_scheduler(kind, schedule):
    torch.manual_seed(0)
    pipe = ProxyPipeline(kind, build_denoiser(kind).eval(), build_prompts(kind, 2), ["a", "b"])
    adapter = {"name": "flux", "skip_double": 1, "skip_single": 1} if kind == "flux" else {"name": "sdxl"}
    steps = 8
    handle = tr.apply(pipe, "toma", adapter=adapter, schedule=schedule)
    log = merged_per_call(pipe.denoiser, handle.runtime)
    pipe([0], [0], steps=steps)
    scheduler = pipe.scheduler
    normalised = [float(t) / scheduler.config.num_train_timesteps for t in scheduler.timesteps]
    expected = handle.runtime.schedule.steps(steps, normalised)
    assert log == expected and any(expected) and not all(expected)
    log.clear()
    pipe([1], [1], steps=steps)  # a second call starts over
    assert log == expected
    handle.reset()  # between calls, whatever the schedule needs
    handle.set_num_steps(steps)
    log.clear()
    pipe([1], [1], steps=steps)
    assert log == expected


def test_explain_shows_the_schedule():
    from io import StringIO

    from rich.console import Console

    from tokenreduce.explain import explain

    out = StringIO()
    explain(
        config(schedule={"name": "every", "k": 3}),
        arch="sdxl",
        steps=20,
        console=Console(file=out, width=200),
    )
    text = out.getvalue()
    assert "merges 7 of 20 steps: 0, 3, 6, 9, 12, 15, 18" in text


@pytest.mark.parametrize("model", ["sdxl", "flux"])
def test_presets_merge_the_steps_their_comments_name(model):
    """Defaults: the second half of the steps; `-fast`: the same steps at a higher ratio."""
    default = tr.load_config(f"toma-{model}")
    fast = tr.load_config(f"toma-{model}-fast")
    for preset in (default, fast):
        merged = [i for i, m in enumerate(tr.config.resolve(preset).schedule.steps(20)) if m]
        assert merged == list(range(10, 20))
    assert (default.ratio, fast.ratio) == (0.5, 0.75)
    assert fast.merger == default.merger and fast.reuse == default.reuse and fast.adapter == default.adapter


def test_wan_unmerged_steps_are_bit_exact():
    from tokenreduce.testing.tiny_wan import tiny_wan_inputs, tiny_wan_transformer

    model = tiny_wan_transformer(num_layers=2)
    twin = copy.deepcopy(model)
    tr.apply(model, "toma-wan", schedule={"name": "every", "k": 2, "offset": 1})
    inputs = tiny_wan_inputs(model, batch=2)
    with torch.no_grad():
        for step, t in enumerate(TIMESTEPS[:4]):
            step_inputs = {**inputs, "timestep": torch.full((2,), t)}
            same = torch.equal(model(**step_inputs).sample, twin(**step_inputs).sample)
            assert same == (step % 2 == 0), step
