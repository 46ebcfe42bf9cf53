"""The latency harness on the tiny models (CPU): it runs, interleaves, drives the reuse schedule,
computes speedups correctly and leaves the model exactly as it found it. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import tokenreduce as tr
from tokenreduce.api import get_handle
from tokenreduce.bench import models, report, timing
from tokenreduce.bench.runner import BenchSettings, resolve_modes
from tokenreduce.bench.variants import Variant, check_against, default_variants
from tokenreduce.cli import main
from tokenreduce.config import load_config
from tokenreduce.interfaces import Decision
from tokenreduce.manager import get_registry

S, W, R = Decision.SELECT, Decision.WEIGHTS, Decision.REUSE


@pytest.fixture(scope="module", autouse=True)
def fresh_registry():
    tr.reset_manager()


@pytest.fixture(scope="module")
def sdxl() -> tuple[torch.nn.Module, models.DenoiserCall]:
    model = models.build_model("tiny-sdxl", "cpu", torch.float32, seed=0)
    return model, models.make_inputs("tiny-sdxl", model, 2, 256, 256, torch.float32, "cpu")


def variants_by_name(family: str, **kwargs: object) -> dict[str, Variant]:
    return {v.name: v for v in default_variants(family, **kwargs).variants}


def reuse_policy(name: str, **params: object):
    cls = get_registry().get("reuse", name)
    return cls(cls.Params(**params))


# --------------------------------------------------------------------------- variants


@pytest.mark.parametrize(
    ("family", "baselines"), [("sdxl", ["tomesd", "tofu", "todo"]), ("flux", ["tomesd", "tofu"])]
)
def test_default_variants_are_built_from_the_registered_presets(family: str, baselines: list[str]) -> None:
    found = default_variants(family)
    names = found.names()
    expected = ["unmodified", "identity"]
    for ratio in ("0.25", "0.5", "0.75"):
        expected += [f"ideal@{ratio}", f"toma@{ratio}"] + [f"{m}@{ratio}" for m in baselines if m != "todo"]
    expected += [f"todo@{load_config('todo-sdxl').ratio:g}"] if "todo" in baselines else []
    assert sorted(names) == sorted(expected)
    assert all("not registered" in s["reason"] for s in found.skipped)  # nothing failed validation
    for variant in found.variants:
        if variant.config is not None:  # round trip: what is applied is a valid config
            assert load_config(variant.config).model_dump() == variant.config
            assert variant.config["ratio"] == variant.ratio


def test_identity_and_ideal_keep_the_toma_placement() -> None:
    toma = load_config("toma-sdxl").model_dump()
    variants = variants_by_name("sdxl", ratios=[0.25])
    identity, ideal = variants["identity"].config, variants["ideal@0.25"].config
    assert identity["merger"]["name"] == "identity"
    assert {k: v for k, v in identity.items() if k not in ("merger", "ratio")} == {
        k: v for k, v in toma.items() if k not in ("merger", "ratio")
    }
    assert ideal["adapter"] == toma["adapter"] and ideal["ratio"] == 0.25
    assert (ideal["merger"]["name"], ideal["partitioner"]["name"]) == ("ideal", "global")
    # Plans shared per block kind like ToMA's, a new one every call (the strict ceiling).
    assert ideal["reuse"]["sharing"] == toma["reuse"]["sharing"] == "kind"
    assert ideal["reuse"]["destinations_every"] == 1


def test_every_variant_applies_to_the_tiny_models() -> None:
    for arch in ("tiny-sdxl", "tiny-flux"):
        found = default_variants(models.spec(arch).family)
        checked = check_against(models.meta_model(arch), found)
        assert checked.names() == found.names(), checked.skipped


def test_methods_and_extra_configs(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("adapter: {name: sdxl}\nratio: 0.3\nmerger: {name: ideal}\npartitioner: {name: global}\n")
    found = default_variants("sdxl", ratios=[0.5], methods=["toma"], configs=[path, path])
    assert found.names() == ["unmodified", "toma@0.5", "mine", "mine-2"]
    assert found.variants[2].ratio == 0.3
    with pytest.raises(ValueError, match="unknown method"):
        default_variants("sdxl", methods=["fastest"])


@pytest.mark.slow
def test_default_variants_apply_to_the_published_architectures() -> None:
    for arch in ("sdxl", "flux"):  # meta device: validation only, no memory
        found = default_variants(arch)
        assert check_against(models.meta_model(arch), found).names() == found.names()


# --------------------------------------------------------------------------- cycles and the manual clock


def test_reuse_cycle_is_the_policy_period() -> None:
    assert timing.reuse_cycle(reuse_policy("step_sharing")) == [S, R, R, R, R, W, R, R, R, R]
    assert timing.reuse_cycle(reuse_policy("step_sharing", destinations_every=6, weights_every=2)) == [
        S,
        R,
        W,
        R,
        W,
        R,
    ]
    assert timing.reuse_cycle(reuse_policy("every_k", k=4)) == [S, R, R, R]
    assert timing.reuse_cycle(reuse_policy("always")) == [S]
    assert timing.reuse_cycle(None) == [S]
    never = timing.reuse_cycle(reuse_policy("never"))  # no period: one long generation
    assert len(never) == timing.MAX_CYCLE and never[0] == S and set(never[1:]) == {R}


def test_manual_clock_drives_the_reuse_schedule(sdxl, monkeypatch) -> None:
    model, call = sdxl
    preset = variants_by_name("sdxl", ratios=[0.5], methods=["toma"])["toma@0.5"]
    assert preset.config is not None
    reusing = {"name": "step_sharing", "destinations_every": 10, "weights_every": 5}  # the release's reuse
    variant = Variant(preset.name, preset.method, preset.ratio, {**preset.config, "reuse": reusing})
    selector_cls = get_registry().get("selector", variant.config["selector"]["name"])
    merger_cls = get_registry().get("merger", variant.config["merger"]["name"])
    counts = {"select": 0, "plan": 0}

    def counting(cls, method: str, key: str) -> None:
        original = getattr(cls, method)

        def wrapper(self, *args, **kwargs):
            counts[key] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, method, wrapper)

    counting(selector_cls, "select", "select")
    counting(merger_cls, "plan", "plan")
    with torch.no_grad(), timing.applied(model, variant) as handle:
        policy = handle.runtime.reuse
        steps = variant.config["reuse"]["destinations_every"]
        schedule = [policy.decide(step) for step in range(steps)]
        timing.run_cycle(model, call, handle, 1)  # priming creates the groups
        counts.update(select=0, plan=0)
        timing.run_cycle(model, call, handle, steps)
        groups = len(handle.runtime.groups)
    assert groups >= 2  # the tiny UNet's two attention levels
    assert counts["select"] == schedule.count(S) * groups
    assert counts["plan"] == (schedule.count(S) + schedule.count(W)) * groups
    assert counts["plan"] < steps * groups  # plans were reused in between


# --------------------------------------------------------------------------- eager timing


def test_variants_are_interleaved_round_robin(sdxl) -> None:
    model, call = sdxl
    pool = variants_by_name("sdxl", ratios=[0.5])
    chosen = [pool["unmodified"], pool["ideal@0.5"], pool["tomesd@0.5"]]
    broken = Variant("broken", "custom", 0.5, {"ratio": 0.5, "merger": {"name": "no-such-merger"}})
    result = timing.time_eager(model, call, [*chosen, broken], rounds=2, warmup=1, device="cpu")
    names = [v.name for v in chosen]
    assert result.log == [(rnd, name) for rnd in (-1, 0, 1) for name in names]
    assert all(len(result.samples[n]) == 2 and min(result.samples[n]) > 0 for n in names)
    assert "no-such-merger" in result.errors["broken"] and result.samples["broken"] == []


def test_apply_and_remove_leave_the_model_bit_identical(sdxl) -> None:
    model, call = sdxl
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = call(model)
    variants = default_variants("sdxl", ratios=[0.5]).variants
    result = timing.time_eager(model, call, variants, rounds=1, warmup=0, device="cpu")
    assert not result.errors
    with torch.no_grad():
        after = call(model)
    assert torch.equal(before, after)
    state = model.state_dict()
    assert state.keys() == before_state.keys() and all(torch.equal(state[k], before_state[k]) for k in state)
    assert get_handle(model) is None
    assert not [name for name, m in model.named_modules() if "forward" in m.__dict__]


# --------------------------------------------------------------------------- models


def test_weights_are_seeded_and_initialised_on_the_device() -> None:
    a = models.build_model("tiny-flux", "cpu", torch.float32, seed=0)
    b = models.build_model("tiny-flux", "cpu", torch.float32, seed=0)
    c = models.build_model("tiny-flux", "cpu", torch.float32, seed=1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters(), strict=True))
    for name, param in a.named_parameters():
        if param.dim() >= 2 and param.numel() >= 2000:
            fan_in = param[0].numel()
            assert 0.8 < float(param.std()) * fan_in**0.5 < 1.2, name
        elif param.dim() == 1:
            expected = 1.0 if name.endswith("weight") else 0.0
            assert torch.all(param == expected), name


def test_flux_inputs_follow_the_pipeline_layout() -> None:
    model = models.build_model("tiny-flux", "cpu", torch.float32)
    call = models.make_inputs("tiny-flux", model, 1, 64, 96, torch.float32, "cpu")  # 4 x 6 tokens
    kw = call.kwargs
    assert kw["hidden_states"].shape == (1, 24, model.config.in_channels)
    assert kw["txt_ids"].shape == (models.spec("tiny-flux").text_tokens, 3)
    expected = [[0.0, r, c] for r in range(4) for c in range(6)]
    assert kw["img_ids"].tolist() == expected
    assert 0.0 <= float(kw["timestep"][0]) <= 1.0
    with torch.no_grad():
        assert call(model).shape == kw["hidden_states"].shape


# --------------------------------------------------------------------------- report


def test_stats_median_quartiles_and_spread() -> None:
    s = report.stats([4.0, 1.0, 100.0, 3.0, 2.0])
    assert (s["median_ms"], s["q1_ms"], s["q3_ms"], s["iqr_ms"], s["min_ms"], s["max_ms"]) == (
        3,
        2,
        4,
        2,
        1,
        100,
    )
    assert report.stats([])["median_ms"] is None


def test_speedup_and_efficiency_arithmetic() -> None:
    rows = [
        {"method": "unmodified", "ratio": None, "median_ms": 100.0},
        {"method": "identity", "ratio": 0.5, "median_ms": 125.0},
        {"method": "ideal", "ratio": 0.5, "median_ms": 50.0},
        {"method": "toma", "ratio": 0.5, "median_ms": 80.0},
        {"method": "toma", "ratio": 0.25, "median_ms": 80.0},  # no ideal at 0.25
        {"method": "ideal", "ratio": 0.75, "median_ms": 110.0},  # ideal slower: no headroom
        {"method": "tomesd", "ratio": 0.75, "median_ms": 90.0},
        {"method": "tofu", "ratio": 0.5, "median_ms": None},  # failed
    ]
    report.add_speedups(rows)
    speedup = [r["speedup"] for r in rows]
    assert speedup[:4] == [1.0, 0.8, 2.0, 1.25] and speedup[7] is None
    assert rows[3]["efficiency"] == pytest.approx(0.25)  # (1.25 - 1) / (2 - 1)
    assert [rows[i]["efficiency"] for i in (0, 1, 2, 4, 5, 6, 7)] == [None] * 7


def test_errors_name_the_root_cause() -> None:
    class Fails:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise RuntimeError("capture invalidated")

    try:
        with Fails():
            raise ValueError("synchronising call")
    except RuntimeError as exc:
        text = timing.describe_error(exc)
    assert (
        text.startswith("ValueError: synchronising call") and "then RuntimeError: capture invalidated" in text
    )


# --------------------------------------------------------------------------- command line


def test_modes_are_checked_before_anything_runs() -> None:
    assert resolve_modes(BenchSettings(), "cpu") == ["eager"]
    with pytest.raises(ValueError, match="CUDA"):
        resolve_modes(BenchSettings(modes=["graph"]), "cpu")
    assert resolve_modes(BenchSettings(modes=["eager", "compile"]), "cpu") == ["eager", "compile"]
    assert main(["bench", "--arch", "tiny-sdxl", "--modes", "graph", "--device", "cpu"]) == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--compose", "compile"], "without --generation, --compose would be ignored"),
        (["--predict-from", "x.json"], "without --generation, --predict-from would be ignored"),
        (
            ["--generation", "--compile-mode", "reduce-overhead"],
            "--compile-mode reduce-overhead needs --compose",
        ),
        (["--generation", "--compose", "cache", "--compile-mode", "max-autotune"], "needs --compose compile"),
    ],
)
def test_options_that_would_be_ignored_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "--arch", "tiny-sdxl", "--device", "cpu", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_bench_command_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "results"
    argv = ["bench", "--arch", "tiny-sdxl", "tiny-flux", "--ratios", "0.5", "--rounds", "2", "--warmup", "1"]
    assert main([*argv, "--device", "cpu", "--output", str(out)]) == 0
    record = json.loads((out / "bench.json").read_text())
    assert {"torch", "diffusers"} <= record["env"].keys() and record["date"]
    assert [(r["arch"], r["mode"]) for r in record["runs"]] == [
        ("tiny-sdxl", "eager"),
        ("tiny-flux", "eager"),
    ]
    for run in record["runs"]:
        rows = {v["name"]: v for v in run["variants"]}
        base = rows["unmodified"]["median_ms"]
        for row in rows.values():
            assert row["error"] is None and row["n"] == 2 and len(row["samples_ms"]) == 2
            assert row["speedup"] == pytest.approx(base / row["median_ms"])
        assert {"toma@0.5", "ideal@0.5", "identity", "tomesd@0.5", "tofu@0.5"} <= rows.keys()
    text = (out / "bench.md").read_text()
    assert "| variant | ratio | mode | median ms |" in text and "toma@0.5" in text
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out / "bench.png") as image:
        assert image.width > 100 and image.height > 100


@pytest.mark.slow
def test_pipeline_mode_times_whole_generations(tmp_path: Path) -> None:
    from tokenreduce.testing.tiny_sdxl import tiny_sdxl_pipeline

    # A 32x32 latent: the tiny UNet's attention grids are 16x16 and 8x8, enough for 8x8 tiles.
    tiny_sdxl_pipeline(sample_size=32).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "results"
    argv = ["bench", "--pipeline", "--model", str(tmp_path / "pipe"), "--steps", "2", "--ratios", "0.5"]
    argv += [
        "--methods",
        "unmodified",
        "toma",
        "--rounds",
        "2",
        "--warmup",
        "0",
        "--device",
        "cpu",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    (run,) = json.loads((out / "bench.json").read_text())["runs"]
    assert (run["arch"], run["mode"], run["unit"], run["steps"]) == ("sdxl", "pipeline", "generation", 2)
    assert [v["name"] for v in run["variants"]] == ["unmodified", "toma@0.5"]
    assert all(v["error"] is None and v["n"] == 2 for v in run["variants"])


@pytest.mark.parametrize("arch", ["tiny-sd3", "tiny-flux2", "tiny-qwenimage", "tiny-wan"])
def test_every_tiny_architecture_builds_runs_and_restores_its_constant_buffers(arch: str) -> None:
    """What ``bench --arch`` does on a GPU, on a CPU: built on the meta device, materialised and
    seeded there, constant buffers recomputed (equal to a freshly constructed model's), one call."""
    spec = models.spec(arch)
    model = models.build_model(arch, "cpu", torch.float32, seed=0)
    fresh = spec.model().from_config(spec.config_dict())
    for name, buffer in fresh.named_buffers():
        torch.testing.assert_close(model.get_buffer(name), buffer)
    height, width = spec.size, spec.width or spec.size
    call = models.make_inputs(arch, model, 1, height, width, torch.float32, "cpu")
    with torch.no_grad():
        out = call(model)
    assert torch.isfinite(out).all()
    assert call.tokens > 0


@pytest.mark.slow
def test_compile_mode_times_every_variant_and_restores_the_model(sdxl) -> None:
    """Backend ``eager``: Dynamo traces (graph breaks and guards as with inductor) without codegen."""
    model, call = sdxl
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forward = model.forward
    chosen = [v for v in default_variants("sdxl", [0.5]).variants if v.method in ("unmodified", "toma")]
    result = timing.time_compiled(model, call, chosen, rounds=2, warmup=1, device="cpu", backend="eager")
    assert result.errors == {}
    for variant in chosen:
        assert len(result.samples[variant.name]) == 2
        # one graph per distinct step kind of the cycle at most per compiled region
        assert result.notes["compile"]["graphs"][variant.name] >= 1
    assert len(result.notes["compile"]["unmodified_again_ms"]) == 2
    assert [name for _, name in result.log][-2:] == ["unmodified", "unmodified"]
    assert model.forward == forward and get_handle(model) is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    ("revision", "said"),
    [
        ({"commit": "0123456789abcdef", "dirty": False}, "at revision 0123456\n"),
        ({"commit": "0123456789abcdef", "dirty": True}, "at revision 0123456 with uncommitted changes\n"),
        ("fedcba9876543210", "at revision fedcba9\n"),
        (None, "`tokenreduce bench`\n"),
    ],
)
def test_record_markdown_starts_with_the_command_and_revision(revision, said) -> None:
    record = {"command": ["tokenreduce", "bench"], "revision": revision, "runs": []}
    assert said in report.markdown(record)
