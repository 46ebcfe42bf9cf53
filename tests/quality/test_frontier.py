"""The frontier sweep's bookkeeping: its points are valid configs, the bench configs give the
speeds the points name, and the Pareto and equal-speed checks say what the rows show."""

from __future__ import annotations

from typing import Any

import pytest

from tokenreduce.config import load_config
from tokenreduce.quality import frontier


@pytest.mark.parametrize("kind", ["flux-latent", "sdxl-latent", "wan-latent"])
def test_points_are_valid_and_name_their_bench_variant(kind: str) -> None:
    points = frontier.points(kind)
    labels = [p.label for p in points]
    assert len(labels) == len(set(labels))
    arch = kind.split("-")[0]
    configs = frontier.bench_configs(arch)
    for point in points:
        config = load_config(point.config)
        if point.speed_name in configs:  # a config file's stem names its bench variant
            bench = load_config(configs[point.speed_name])
            assert bench.ratio == config.ratio
            # the noise's scale is not timed: any nonzero jitter runs the same kernels
            assert _noise_on(bench.selector) == _noise_on(config.selector)
            assert bench.partitioner == config.partitioner
            assert bench.adapter.size_weighting == config.adapter.size_weighting  # type: ignore[attr-defined]
        else:  # one of the bench's own variants
            assert point.speed_name.split("@")[0] in ("toma", "tomesd", "tofu", "todo")
    presets = [p.label for p in points if p.method == "preset"]
    assert presets[0] == f"toma-{arch}" and all(p.startswith(f"toma-{arch}") for p in presets)
    assert {"random", "grid", "toma"} <= {p.method for p in points}
    # Every method the sweep scores is drawn in the plot, in its own colour.
    assert {p.method for p in points} - {"preset"} <= set(frontier.COLOURS)


def test_the_plot_refuses_a_method_it_would_leave_out(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    row = {"kind": "flux-latent", "method": "unknown", "speedup": 1.2, "psnr": 30.0, "label": "x"}
    with pytest.raises(ValueError, match="no plot colour for the methods \\['unknown'\\]"):
        frontier.plot([row], [], "psnr", tmp_path / "frontier.png", "t")


def _noise_on(selector: Any) -> dict[str, Any]:
    params = selector.model_dump()
    if "jitter" in params:
        params["jitter"] = params["jitter"] > 0
    return params


def test_the_jitter_knob_is_tried_beside_each_presets_own_value() -> None:
    points = {p.label: p for p in frontier.points("wan-latent")}
    configs = frontier.bench_configs("wan")
    for preset in ("toma-wan", "toma-wan-fast"):
        own = load_config(preset).selector.jitter  # type: ignore[attr-defined]
        tried = {
            p.config["selector"]["jitter"]: p
            for p in points.values()
            if p.label.startswith(f"{preset}, jitter")
        }
        assert set(tried) == set(frontier.JITTERS) - {own}
        for jitter, point in tried.items():
            assert (configs[point.speed_name]["selector"]["jitter"] > 0) == (jitter > 0)


def test_each_plan_reuse_is_tried_beside_the_presets_own_with_toma_and_random_destinations() -> None:
    for kind, arch in (("sdxl-latent", "sdxl"), ("flux-latent", "flux")):
        points = frontier.points(kind)
        configs = frontier.bench_configs(arch)
        for preset in (f"toma-{arch}", f"toma-{arch}-fast"):
            own = load_config(preset)
            reuse, ratio = own.reuse.model_dump(), own.ratio
            for label, _, values in frontier.REUSES:
                expected = {**reuse, **values}
                toma = [p for p in points if p.label == f"{preset}, {label}"]
                random = [
                    p
                    for p in points
                    if p.method == "random" and p.label.endswith(f", {label}") and p.config["ratio"] == ratio
                ]
                if expected == reuse:
                    assert toma == [] and random == []  # the preset's own value
                    continue
                assert [p.config["reuse"] for p in toma + random] == [expected, expected]
                assert random[0].config["selector"]["name"] == "random"
                assert random[0].config["schedule"] == own.schedule.model_dump(mode="json")
                for point in toma + random:
                    bench = configs[point.speed_name]
                    assert bench["reuse"] == expected
                    assert bench["selector"]["name"] == point.config["selector"]["name"]


def test_knobs_are_timed_on_the_real_model_at_the_proxys_fraction_of_blocks() -> None:
    points = {p.label: p for p in frontier.points("flux-latent")}
    knob = points["toma-flux, skip 2+2"]
    assert (knob.config["adapter"]["skip_double"], knob.config["adapter"]["skip_single"]) == (2, 2)
    bench = frontier.bench_configs("flux")[knob.speed_name]
    assert (bench["adapter"]["skip_double"], bench["adapter"]["skip_single"]) == (10, 10)
    assert bench["ratio"] == knob.config["ratio"] == 0.5
    grid = points["grid@0.75 second half"].config
    assert grid["selector"] == {"name": "grid", "stride": [2, 2]}
    assert grid["schedule"] == load_config("toma-flux").model_dump(mode="json")["schedule"]


def _row(label: str, method: str, speedup: float, psnr: float) -> dict:
    return {"kind": "k", "label": label, "method": method, "speedup": speedup, "psnr": psnr}


def test_pareto_drops_dominated_rows_and_rows_no_faster_than_unmodified() -> None:
    rows = [
        _row("a", "toma", 1.5, 30.0),
        _row("b", "toma", 1.2, 35.0),
        _row("c", "toma", 1.1, 34.0),  # b is faster and closer
        _row("d", "tomesd", 0.95, 50.0),  # the unmodified model is faster and exact
    ]
    assert [r["label"] for r in frontier.pareto(rows, "psnr")] == ["a", "b"]


def test_checks_find_dominated_presets_and_compare_at_equal_speed() -> None:
    rows = [
        _row("toma-x", "preset", 1.1, 34.0),
        _row("toma@0.5", "toma", 1.2, 35.0),
        _row("random@0.5", "random", 1.15, 34.5),
        _row("random@0.75", "random", 1.4, 30.0),  # no ToMA row this fast
        _row("tomesd@0.5", "tomesd", 0.9, 45.0),
    ]
    lines = frontier.checks(rows)
    assert lines[0].startswith("k toma-x (1.100x, 34.00): dominated by toma@0.5")
    assert lines[1] == (
        "k toma-x vs the best random row at equal or higher speed, psnr: NOT better "
        "(34.00 vs 34.50, random@0.5, 1.150x)"
    )
    assert "ToMA vs random at equal or higher end-to-end speed, psnr: better at 1 of 2" in lines[2]
    assert "1 no faster than the unmodified model" in lines[3]


def test_reports_name_the_presets_as_shipped_now() -> None:
    shipped = frontier.config_for("sdxl-latent", "toma-sdxl")
    earlier = {**shipped, "ratio": 0.4}  # a row made before the preset changed
    knob = {**earlier, "partitioner": {"name": "tile", "size": [4, 4]}}
    rows = [
        {"kind": "sdxl-latent", "method": "preset", "label": "toma-sdxl", "config": earlier},
        {"kind": "sdxl-latent", "method": "toma-knob", "label": "toma-sdxl, tile 4", "config": knob},
        {"kind": "sdxl-latent", "method": "toma-knob", "label": "toma-sdxl, jitter 1", "config": shipped},
        {"kind": "sdxl-latent", "method": "random", "label": "random@0.5", "config": shipped},
    ]
    out = frontier.as_shipped(rows)
    assert [(r["method"], r["label"]) for r in out] == [
        ("toma-knob", "toma-sdxl (earlier)"),
        ("toma-knob", "toma-sdxl (earlier), tile 4"),
        ("preset", "toma-sdxl"),
        ("random", "random@0.5"),  # only ToMA's own rows are renamed
    ]
    assert frontier.as_shipped(out) == out  # nothing changes twice


def test_speeds_are_joined_through_the_schedule() -> None:
    config = load_config("toma-flux").model_dump(mode="json")
    row = {"kind": "flux-latent", "speed_name": "toma@0.5", "config": config, "steps": 20}
    (joined,) = frontier.with_speed([row], {("flux", "toma@0.5"): 1.5})
    # the second half merges: 10 steps at 1/1.5, 10 at 1
    assert joined["speedup"] == pytest.approx(20 / (10 + 10 / 1.5))
    (missing,) = frontier.with_speed([row], {})
    assert missing["speedup"] is None


def test_the_demos_gpu_speeds_are_those_of_the_committed_records() -> None:
    """The packaged per-step speedups are copied from the bench records they name, not typed in."""
    import json
    from pathlib import Path

    from tokenreduce.demo import GPU_SPEEDS, gpu_speedup

    root = Path(__file__).resolve().parents[2]
    packaged = json.loads(GPU_SPEEDS.read_text(encoding="utf-8"))

    def ratio_aside(config: object) -> dict:
        return {**load_config(config).model_dump(mode="json"), "ratio": None}

    found: dict[str, dict[str, float]] = {}
    for path, revision in packaged["records"].items():
        record = json.loads((root / path).read_text(encoding="utf-8"))
        assert record["env"]["gpu"] == packaged["gpu"] and record["revision"] == revision
        run = next(r for r in record["runs"] if r["mode"] == packaged["mode"])
        preset = ratio_aside(f"toma-{run['arch']}")  # the default preset's config at every ratio
        speeds: dict[str, float] = {}
        for v in run["variants"]:  # the bench's own preset rows first, then any config file equal to it
            if v["config"] is not None and ratio_aside(v["config"]) == preset:
                speeds.setdefault(f"{v['ratio']:g}", round(v["speedup"], 4))
        found[f"toma-{run['arch']}"] = speeds
    assert found == packaged["speedups"]
    config = load_config("toma-flux")
    assert gpu_speedup("toma-flux", config, 20) == pytest.approx(20 / (10 + 10 / found["toma-flux"]["0.5"]))
    assert gpu_speedup("toma-flux", load_config("toma-flux", ratio=0.3), 20) is None


def test_run_scores_videos_per_clip_shards_the_points_and_resumes(tmp_path) -> None:
    out = tmp_path / "rows.jsonl"
    kw = {"steps": 2, "num_seeds": 2, "device": "cpu", "only": ["preset", "grid"], "log": lambda _: None}
    first = list(frontier.run(["wan-latent"], out, shard=(0, 8), **kw))
    expected = [p.label for p in frontier.points("wan-latent") if p.method in ("preset", "grid")][0::8]
    assert [r["label"] for r in first] == expected
    assert all(len(r["psnr_per_image"]) == 2 and r["psnr"] > 0 for r in first)
    assert list(frontier.run(["wan-latent"], out, shard=(0, 8), **kw)) == []  # resumed: nothing left
    with pytest.raises(ValueError, match="shard 8/8"):
        list(frontier.run(["wan-latent"], out, shard=(8, 8), **kw))


def test_same_seed_metrics_score_a_video_as_the_mean_of_its_frames() -> None:
    import torch

    from tokenreduce.quality import metrics

    features = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 16 * 16, 8))
    refs = torch.rand(2, 3, 3, 16, 16)
    videos = refs.clone()
    videos[1, 2] = (videos[1, 2] + 0.1).clamp(0, 1)  # one frame of the second clip changed
    scores = metrics.same_seed(features, videos, refs)
    per_frame = metrics.psnr(videos[1], refs[1])
    assert torch.isinf(scores["psnr"][0]) and scores["psnr"][1] == per_frame.mean()
    assert scores["feature_similarity"][0] == pytest.approx(1.0)
    assert scores["ssim"].shape == (2,)


def test_comparisons_give_the_paired_difference_and_say_when_it_is_noise() -> None:
    preset = _row("toma-x", "preset", 1.2, 31.0) | {"psnr_per_image": [30.0, 31.0, 32.0, 31.0]}
    close = _row("random@0.5", "random", 1.2, 30.9) | {"psnr_per_image": [31.0, 30.0, 31.6, 31.0]}
    clear = _row("random@0.5 b", "random", 1.2, 30.0) | {"psnr_per_image": [29.0, 30.0, 31.0, 30.0]}
    mean, se = frontier.paired(preset, close, "psnr")  # type: ignore[misc]
    assert mean == pytest.approx(0.1) and se == pytest.approx(
        (2.12 / 3) ** 0.5 / 2
    )  # sample sd of (-1, 1, 0.4, 0), over sqrt(4)
    assert frontier.paired_text(preset, close, "psnr").endswith("over 4 images; within noise")
    assert frontier.paired_text(preset, clear, "psnr") == "; paired difference +1.00 ± 0.00 over 4 images"
    assert frontier.paired(preset, _row("old", "random", 1.2, 30.0), "psnr") is None  # no per-image values
