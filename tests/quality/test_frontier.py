"""The frontier sweep's bookkeeping: its points are valid configs, the bench configs give the
speeds the points name, and the Pareto and equal-speed checks say what the rows show."""

from __future__ import annotations

import pytest

from tokenreduce.config import load_config
from tokenreduce.quality import frontier


@pytest.mark.parametrize("kind", ["flux-latent", "sdxl-latent"])
def test_points_are_valid_and_name_their_bench_variant(kind: str) -> None:
    points = frontier.points(kind)
    labels = [p.label for p in points]
    assert len(labels) == len(set(labels))
    configs = frontier.bench_configs("flux" if kind.startswith("flux") else "sdxl")
    for point in points:
        config = load_config(point.config)
        if point.speed_name in configs:  # a config file's stem names its bench variant
            bench = load_config(configs[point.speed_name])
            assert bench.ratio == config.ratio and bench.selector.name == config.selector.name
            assert bench.adapter.size_weighting == config.adapter.size_weighting  # type: ignore[attr-defined]
        elif point.speed_name is not None:
            assert point.speed_name.split("@")[0] in ("toma", "tomesd", "tofu", "todo")
    presets = [p for p in points if p.method == "preset"]
    assert [p.label for p in presets] == [f"toma-{kind.split('-')[0]}", f"toma-{kind.split('-')[0]}-fast"]


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
    assert "ToMA vs random at equal or higher end-to-end speed, psnr: better at 1 of 2" in lines[1]
    assert "1 no faster than the unmodified model" in lines[2]


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
    found = {}
    for path in packaged["records"]:
        record = json.loads((root / path).read_text(encoding="utf-8"))
        assert record["env"]["gpu"] == packaged["gpu"] and record["revision"] == packaged["revision"]
        run = next(r for r in record["runs"] if r["mode"] == packaged["mode"])
        found[f"toma-{run['arch']}"] = {
            f"{v['ratio']:g}": round(v["speedup"], 4) for v in run["variants"] if v["method"] == "toma"
        }
    assert found == packaged["speedups"]
    config = load_config("toma-flux")
    assert gpu_speedup("toma-flux", config, 20) == pytest.approx(20 / (10 + 10 / found["toma-flux"]["0.5"]))
    assert gpu_speedup("toma-flux", load_config("toma-flux", ratio=0.3), 20) is None
