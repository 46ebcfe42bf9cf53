"""Whole-generation timing on the tiny architectures (CPU): the loop runs as a pipeline does, every
variant is timed, the compositions install and leave the model as found. No timing assertions."""

from __future__ import annotations

import json

import pytest
import torch

import tokenreduce as tr
from tokenreduce.api import get_handle
from tokenreduce.bench import compose, generation
from tokenreduce.bench.variants import Variant
from tokenreduce.cli import main
from tokenreduce.config import load_config

#: Merging at every step, in versions with merge schedules (nothing to set in those without).
EVERY_STEP = {"schedule": {"name": "always"}} if "schedule" in load_config("toma-flux").model_dump() else {}


@pytest.fixture(scope="module", autouse=True)
def fresh_registry():
    tr.reset_manager()


@pytest.fixture(scope="module")
def flux() -> generation.Generation:
    return generation.build_generation("tiny-flux", 4, "cpu", "fp32", seed=0)


def test_generation_command_times_every_variant_of_every_tiny_arch(tmp_path) -> None:
    args = ["bench", "--generation", "--arch", "tiny-sdxl", "tiny-flux", "tiny-wan", "--device", "cpu"]
    assert main([*args, "--steps", "2", "--rounds", "1", "--warmup", "0", "-o", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    assert [r["arch"] for r in record["runs"]] == ["tiny-sdxl", "tiny-flux", "tiny-wan"]
    for run, family in zip(record["runs"], ("sdxl", "flux", "wan"), strict=True):
        names = [v["name"] for v in run["variants"]]
        ratio = run["variants"][1]["ratio"]
        assert names[:3] == ["unmodified", f"toma-{family}", f"ideal@{ratio:g}"]
        assert all(v["error"] is None and v["n"] == 1 and v["speedup"] > 0 for v in run["variants"])
        assert run["steps"] == 2 and run["unit"] == "generation" and "decode timed" in run["vae"]
        assert run["text_encoding"].startswith("excluded")
    assert record["runs"][2]["guidance_passes"] == 2  # Wan: conditional and unconditional apart
    for row in (v for run in record["runs"] for v in run["variants"]):
        # Where the time goes: each step, all steps, the rest (decode); they add up to the total.
        assert len(row["step_ms"]) == 2 and all(ms > 0 for ms in row["step_ms"])
        assert row["steps_ms"] == pytest.approx(sum(row["step_ms"])) and row["rest_ms"] > 0
        assert row["steps_ms"] + row["rest_ms"] == pytest.approx(row["median_ms"])
    assert "measured and predicted speedup" in (tmp_path / "bench.md").read_text()


def test_the_scheduler_drives_the_clock_and_the_vae_decodes(flux: generation.Generation) -> None:
    config = generation.generation_variants("flux").variants[1]
    assert config.method == "toma"
    with generation.applied(flux.pipe, config) as handle:
        clock = handle.runtime.clock
        assert clock.driver not in ("timestep", "manual")  # apply took it for a pipeline
        steps = []
        original = clock.end_step
        clock.end_step = lambda: (steps.append(clock.step), original())[1]
        image = flux()
        del clock.end_step
        assert steps == list(range(flux.steps))  # the scheduler closed every denoising step
    assert get_handle(flux.pipe.denoiser) is None
    assert image.shape == (1, 3, flux.height, flux.width) and torch.isfinite(image).all()
    # The same noise every generation: the unmodified generation is reproducible.
    torch.testing.assert_close(flux(), flux(), rtol=0, atol=0)


def test_the_cache_composes_with_toma_and_is_removed(flux: generation.Generation) -> None:
    plain = flux()
    scheduled = generation.generation_variants("flux").variants[1]
    # ToMA at every step: the token count stays the same from step to step, as the cache needs.
    toma = Variant(scheduled.name, scheduled.method, scheduled.ratio, {**scheduled.config, **EVERY_STEP})
    with compose.installed(flux, compose.Combination(None, cache=True)):
        cached = flux()  # attention reused on some steps: a different image
    with compose.installed(flux, compose.Combination(toma, cache=True)):
        assert get_handle(flux.pipe.denoiser) is not None
        both = flux()
    assert not torch.equal(cached, plain) and torch.isfinite(both).all()
    assert not flux.pipe.denoiser.is_cache_enabled and get_handle(flux.pipe.denoiser) is None
    torch.testing.assert_close(flux(), plain, rtol=0, atol=0)  # nothing left installed

    combos, skipped = compose.combinations("flux", ["cache"], flux.pipe.denoiser)
    names = [c.name for c in combos]
    assert names[:3] == ["unmodified", "cache", "toma-flux"]
    assert names[3:] == ["toma-flux+cache"] and not skipped.skipped  # the preset's own schedule
    result = compose.time_combinations(flux, combos, rounds=1, warmup=0)
    assert result.errors == {} and all(len(s) == 1 for s in result.samples.values())


def test_predictions_match_configs_regardless_of_schedule(flux: generation.Generation) -> None:
    variants = generation.generation_variants("flux")
    toma = variants.variants[1]
    timed = Variant("x", "toma", toma.ratio, {**toma.config, "schedule": {"name": "always"}})
    per_step = {
        "runs": [
            {
                "arch": "tiny-flux",
                "mode": "eager",
                "variants": [{"config": None, "speedup": 1.0}, {"config": timed.config, "speedup": 2.0}],
            }
        ]
    }
    run = generation.run_record(flux, variants, generation.Timings(), 1, 0)
    note = generation.add_predictions(run, per_step)
    try:
        from tokenreduce.quality.speed import schedule_speedup
    except ImportError:
        assert note is not None and "no prediction" in note
        return
    assert note is None
    predicted = {v["name"]: v["predicted_speedup"] for v in run["variants"]}
    steps = schedule_speedup(toma.config, 2.0, flux.steps)
    assert predicted["toma-flux"] == pytest.approx(steps)  # no step times measured: the steps alone
    assert predicted["unmodified"] is None and predicted[variants.variants[2].name] is None
    # With the unmodified generation's split measured, the rest (the decode) does not speed up.
    run["variants"][0].update(steps_ms=900.0, rest_ms=100.0)
    assert generation.add_predictions(run, per_step) is None
    predicted = {v["name"]: v["predicted_speedup"] for v in run["variants"]}
    assert predicted["toma-flux"] == pytest.approx(1000.0 / (900.0 / steps + 100.0))
    assert generation.add_predictions(run, {"runs": []}) is not None  # no run of this arch: said so


def test_predictions_match_configs_recorded_before_a_parameter_was_added(flux: generation.Generation) -> None:
    variants = generation.generation_variants("flux")
    toma = variants.variants[1]
    older = {**toma.config, "selector": {k: v for k, v in toma.config["selector"].items() if k != "jitter"}}
    assert older != toma.config  # the record lacks a parameter that has a default now
    per_step = {
        "runs": [{"arch": "tiny-flux", "mode": "eager", "variants": [{"config": older, "speedup": 2.0}]}]
    }
    run = generation.run_record(flux, variants, generation.Timings(), 1, 0)
    pytest.importorskip("tokenreduce.quality.speed")
    assert generation.add_predictions(run, per_step) is None
    assert {v["name"]: v["predicted_speedup"] for v in run["variants"]}["toma-flux"] is not None


def test_predictions_fall_back_to_graph_mode_and_say_so(flux: generation.Generation) -> None:
    variants = generation.generation_variants("flux")
    toma = variants.variants[1]
    graph_only = {
        "runs": [
            {"arch": "tiny-flux", "mode": "graph", "variants": [{"config": toma.config, "speedup": 2.0}]}
        ]
    }
    run = generation.run_record(flux, variants, generation.Timings(), 1, 0)
    pytest.importorskip("tokenreduce.quality.speed")
    assert generation.add_predictions(run, graph_only) is None and run["predicted_mode"] == "graph"
    assert {v["name"]: v["predicted_speedup"] for v in run["variants"]}["toma-flux"] is not None
    assert "no eager run" in (generation.add_predictions(run, graph_only, modes=("eager",)) or "")
    # Predicting again from a record that cannot predict leaves nothing of the earlier prediction.
    assert "predicted_mode" not in run
    assert all(v.get("predicted_speedup") is None for v in run["variants"])


@pytest.mark.slow
def test_compile_composes_with_toma(flux: generation.Generation) -> None:
    toma = generation.generation_variants("flux").variants[1]
    combos = [compose.Combination(None, compile=True), compose.Combination(toma, compile=True)]
    result = compose.time_combinations(flux, combos, rounds=1, warmup=0)
    assert result.errors == {}
    assert get_handle(flux.pipe.denoiser) is None and flux.pipe.forward is flux.pipe.denoiser


def test_compiled_combinations_run_on_copies_interleaved_with_the_rest(
    flux: generation.Generation, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[torch.nn.Module] = []
    monkeypatch.setattr(torch, "compile", lambda model, **_: compiled.append(model) or model)
    toma = generation.generation_variants("flux").variants[1]
    combos = [
        compose.Combination(None),
        compose.Combination(None, compile=True),
        compose.Combination(toma),
        compose.Combination(toma, compile=True),
    ]
    weights = [p.data_ptr() for p in flux.pipe.denoiser.parameters()]
    result = compose.time_combinations(flux, combos, rounds=2, warmup=0)
    assert result.errors == {} and all(len(s) == 2 for s in result.samples.values())
    # The compiled ones are compiled once each, on copies: the shared model is never compiled.
    assert len(compiled) == 2 and all(m is not flux.pipe.denoiser for m in compiled)
    assert [p.data_ptr() for p in flux.pipe.denoiser.parameters()] == weights
    assert get_handle(flux.pipe.denoiser) is None and flux.pipe.forward is flux.pipe.denoiser
    # A first untimed round compiles; then every round times every combination.
    names = [c.name for c in combos]
    assert result.log == [(-1, "compile"), (-1, "toma-flux+compile")] + [
        (r, n) for r in (0, 1) for n in names
    ]
    # Step times of each timed generation, the compiled ones' from their copies.
    assert set(result.step_ms) == set(names)
    assert all(
        len(rounds) == 2 and all(len(s) == flux.steps for s in rounds) for rounds in result.step_ms.values()
    )
    # A "compiled" copy computes what its eager twin computes: no difference, and said so per row.
    rows: list[dict[str, object]] = [{} for _ in combos]
    compose.add_compiled_differences(rows, combos, result.outputs)
    assert [r["compiled_difference"] for r in rows] == [None, 0.0, None, 0.0]


def test_a_compiled_model_that_computes_something_else_shows_in_the_record(
    flux: generation.Generation, monkeypatch: pytest.MonkeyPatch
) -> None:
    def replays_its_first_output(model: torch.nn.Module, **_: object) -> object:
        first: list[object] = []  # what a graph replaying a stale step would give back

        def forward(*args: object, **kwargs: object) -> object:
            first.append(model(*args, **kwargs)) if not first else None
            return first[0]

        return forward

    monkeypatch.setattr(torch, "compile", replays_its_first_output)
    toma = generation.generation_variants("flux").variants[1]
    combos = [compose.Combination(toma), compose.Combination(toma, compile=True)]
    result = compose.time_combinations(flux, combos, rounds=1, warmup=0)
    rows: list[dict[str, object]] = [{} for _ in combos]
    compose.add_compiled_differences(rows, combos, result.outputs)
    difference = rows[1]["compiled_difference"]
    assert rows[0]["compiled_difference"] is None and isinstance(difference, float) and difference > 0.01


def test_the_compile_mode_reaches_every_compiled_combination(
    flux: generation.Generation, monkeypatch: pytest.MonkeyPatch
) -> None:
    modes: list[str | None] = []
    monkeypatch.setattr(torch, "compile", lambda model, mode=None: modes.append(mode) or model)
    combos, _ = compose.combinations("flux", ["compile"], flux.pipe.denoiser, "reduce-overhead")
    assert [c.compile_mode for c in combos] == [None, "reduce-overhead", None, "reduce-overhead"]
    result = compose.time_combinations(flux, combos, rounds=1, warmup=0)
    assert result.errors == {} and modes == ["reduce-overhead", "reduce-overhead"]


def test_configs_replace_the_preset_in_the_compositions(flux: generation.Generation, tmp_path) -> None:
    config = load_config("toma-flux").model_dump()
    config["reuse"] = {"name": "step_sharing", "destinations_every": 1, "weights_every": 1}
    every_step = tmp_path / "every-step.json"
    every_step.write_text(json.dumps(config))
    combos, skipped = compose.combinations("flux", ["compile"], flux.pipe.denoiser, configs=[every_step])
    assert [c.name for c in combos] == ["unmodified", "compile", "every-step", "every-step+compile"]
    assert not skipped.skipped and combos[3].variant.method == "config+compile"
    assert combos[2].variant.config == load_config(config).model_dump()


def test_methods_choose_the_variants_and_unmodified_stays() -> None:
    every = generation.generation_variants("sd3")  # a family without a -fast preset
    assert [v.method for v in every.variants] == ["unmodified", "toma", "ideal"]
    assert [v.name for v in generation.only_methods(every, ["toma"]).variants] == ["unmodified", "toma-sd3"]
    assert [v.name for v in generation.only_methods(every, []).variants] == ["unmodified"]
    with_fast = generation.only_methods(generation.generation_variants("wan"), ["toma"])
    assert [v.name for v in with_fast.variants] == ["unmodified", "toma-wan", "toma-wan-fast"]


def test_generation_of_the_other_tiny_transformers_runs_every_variant(tmp_path) -> None:
    archs = ["tiny-sd3", "tiny-flux2", "tiny-qwenimage"]
    args = ["bench", "--generation", "--arch", *archs, "--device", "cpu", "--steps", "2"]
    assert main([*args, "--rounds", "1", "--warmup", "0", "-o", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "bench.json").read_text())
    assert [r["arch"] for r in record["runs"]] == archs
    for run in record["runs"]:
        assert all(v["error"] is None and v["speedup"] > 0 for v in run["variants"]), run["arch"]


def test_generation_records_carry_their_provenance() -> None:
    record = generation.generation_record([])
    assert {"revision", "command", "version", "started"} <= set(record)
