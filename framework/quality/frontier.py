"""The speed-fidelity frontier per proxy: ratio x merge schedule x size weighting for ToMA, the same
schedules for random destinations, ToMeSD, ToFu and ToDo, and ToMA's other knobs one at a time.

Two steps, because fidelity and speed are measured on different machines::

    python -m tokenreduce.quality.frontier configs -o CONFIG_DIR     # bench configs the speeds need
    tokenreduce bench --arch ARCH --modes graph --configs CONFIG_DIR/ARCH-*.yaml ...
    python -m tokenreduce.quality.frontier run --kinds flux-latent sdxl-latent -o rows.jsonl
    python -m tokenreduce.quality.frontier report rows.jsonl --speed bench.json -o OUT

``run`` generates one image per pipeline call (batch 1, guidance in one batch), the demo's classes
and seeds, with every variant, and scores PSNR, SSIM and feature similarity against the
unmodified proxy's images; rows are appended as they finish (a stopped run keeps what it did).
``report`` joins each row with the per-step speedup of its bench variant (same method, ratio and
size weighting, measured on the real architecture) and the row's merge schedule, giving the
end-to-end speedup of a generation (:func:`tokenreduce.quality.speed.schedule_speedup`), marks
the Pareto frontier, and checks the presets against it and against the baselines at equal speed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenreduce.quality import metrics
from tokenreduce.quality.fidelity import config_for, merged
from tokenreduce.quality.proxy.models import LATENT_KINDS, spec
from tokenreduce.quality.speed import schedule_speedup

RATIOS = (0.25, 0.5, 0.75)
#: (label, schedule config). Every field given: an override is merged into the preset's entry.
SCHEDULES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("always", {"name": "always"}),
    ("every 2/0", {"name": "every", "k": 2, "offset": 0}),
    ("every 2/1", {"name": "every", "k": 2, "offset": 1}),
    ("every 3/0", {"name": "every", "k": 3, "offset": 0}),  # the authors' release
    ("every 3/2", {"name": "every", "k": 3, "offset": 2}),
    ("every 4/3", {"name": "every", "k": 4, "offset": 3}),
    ("second half", {"name": "window", "start": 0.5, "stop": 1.0}),
)
#: Methods compared with ToMA at equal end-to-end speed.
BASELINES = ("random", "grid", "tomesd", "tofu")
#: Grid destinations: the stride whose one corner per cell keeps ``1 - ratio`` of the tokens.
GRID_STRIDES = {0.5: [1, 2], 0.75: [2, 2]}
#: The real architecture whose per-step speed each proxy architecture's rows take.
BENCH_ARCHS = {"flux": "flux", "sdxl": "sdxl", "wan": "wan-1.3b"}
#: Skipped blocks, ``(proxy, real)``: the proxies are shallower (Flux-shaped 4 + 8 blocks against
#: Flux-dev's 19 + 38; Wan-shaped 8 against Wan 2.1 1.3B's 30), so a proxy skipping the first
#: ``proxy`` blocks of each kind is timed as the real model skipping about the same fraction.
SKIPS = {"flux": ((0, 0), (2, 10)), "wan": ((2, 8), (4, 15))}
#: Tile sizes tried beside each preset's (one per side).
TILES = {"flux": (2, 4), "sdxl": (4,), "wan": (2, 4, 8)}
#: Plan reuse tried beside each preset's: ``(label, bench name part, reuse update)``. New plans at
#: every merged step, or the release's reuse (destinations every 10 merged steps, weights every 5).
#: Random destinations are tried under each too: reuse changes what any selector's errors do over
#: the steps (a plan made once repeats its errors; one drawn anew at every step spreads them).
REUSES: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("plans every step", "plans1", {"destinations_every": 1, "weights_every": 1}),
    ("plans reused", "reused", {"destinations_every": 10, "weights_every": 5}),
)
#: Facility location's similarity noise tried beside each preset's (0: the paper's selector). Its scale
#: does not change the kernels, so every nonzero value takes the speed of one bench variant.
JITTERS = (0.0, 0.5, 1.5)


@dataclass(frozen=True)
class Point:
    """One configuration on one proxy, and the bench variant whose per-step speed it has."""

    kind: str
    method: str  # toma, random, grid, tomesd, tofu, todo, toma-knob; "preset": the shipped presets
    label: str
    config: dict[str, Any] = field(hash=False)
    speed_name: str  # the bench variant with the same per-step speed


def bench_config_name(arch: str, what: str, ratio: float) -> str:
    return f"{arch}-{what}-{ratio:g}"


def _weighting(config: dict[str, Any]) -> bool:
    return bool(config["adapter"].get("size_weighting", False))


def knobs(arch: str) -> list[tuple[str, str, dict[str, Any], dict[str, Any]]]:
    """ToMA's placement and tile knobs, one at a time: ``(label, bench name part, proxy update,
    real-model update)``. Each is tried at both presets' ratios (with their schedules)."""
    out: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = []
    if arch == "flux":
        for proxy, real in SKIPS["flux"]:
            out.append(
                (
                    f"skip {proxy}+{proxy}",
                    f"skip{real}",
                    {"adapter": {"skip_double": proxy, "skip_single": proxy}},
                    {"adapter": {"skip_double": real, "skip_single": real}},
                )
            )
    elif arch == "wan":
        for proxy, real in SKIPS["wan"]:
            out.append(
                (f"skip {proxy}", f"skip{real}", {"adapter": {"skip": proxy}}, {"adapter": {"skip": real}})
            )
    else:  # SDXL: merge only at the highest-resolution attention level
        levels = {"adapter": {"levels": [0]}}
        out.append(("level 0 only", "level0", levels, levels))
    for size in TILES[arch]:
        tile = {"partitioner": {"size": [size, size]}}
        out.append((f"tile {size}", f"tile{size}", tile, tile))
    for jitter in JITTERS:
        noise = {"selector": {"jitter": jitter}}
        out.append((f"jitter {jitter:g}", "jitter" if jitter else "nojitter", noise, noise))
    # What reusing plans across steps saves, and what it costs in fidelity (the preset's own value
    # is skipped by the callers).
    for label, name, reuse in REUSES:
        out.append((label, name, {"reuse": reuse}, {"reuse": reuse}))
    return out


def _schedule_label(schedule: dict[str, Any]) -> str:
    return next((label for label, s in SCHEDULES if s == schedule), "preset schedule")


def random_under_reuse(kind: str, preset: str) -> list[Point]:
    """Random destinations at ``preset``'s ratio and schedule under each plan reuse other than the
    preset's own (random rows of the sweep take the preset's reuse)."""
    arch = spec(kind).arch
    base = config_for(kind, preset)
    out = []
    for label, name, reuse in REUSES:
        config = merged(base, {"selector": {"name": "random"}, "reuse": reuse})
        if config["reuse"] == base["reuse"]:
            continue
        ratio = base["ratio"]
        speed = bench_config_name(arch, f"random-{name}", ratio)
        text = f"random@{ratio:g} {_schedule_label(base['schedule'])}, {label}"
        out.append(Point(kind, "random", text, config, speed))
    return out


def points(kind: str, ratios: Sequence[float] = RATIOS) -> list[Point]:
    arch = spec(kind).arch
    toma = f"toma-{arch}"
    preset_weighting = _weighting(config_for(kind, toma))
    has = {method: f"{method}-{arch}" in _registered() for method in ("tomesd", "tofu", "todo")}
    out: list[Point] = []
    presets = [toma, f"{toma}-fast"] if f"{toma}-fast" in _registered() else [toma]
    for preset in presets:
        config = config_for(kind, preset)
        out.append(Point(kind, "preset", preset, config, f"toma@{config['ratio']:g}"))
    for ratio in ratios:
        for label, schedule in SCHEDULES:
            for weighted in (preset_weighting, not preset_weighting):
                config = config_for(
                    kind, toma, ratio=ratio, schedule=schedule, adapter={"size_weighting": weighted}
                )
                speed = (
                    f"toma@{ratio:g}"
                    if weighted == preset_weighting
                    else bench_config_name(arch, "weighted" if weighted else "unweighted", ratio)
                )
                tag = "sw" if weighted else "no sw"
                out.append(Point(kind, "toma", f"toma@{ratio:g} {label} {tag}", config, speed))
            config = config_for(kind, toma, ratio=ratio, schedule=schedule, selector={"name": "random"})
            speed = bench_config_name(arch, "random", ratio)
            out.append(Point(kind, "random", f"random@{ratio:g} {label}", config, speed))
            if ratio in GRID_STRIDES:
                grid = {"name": "grid", "stride": GRID_STRIDES[ratio]}
                config = config_for(kind, toma, ratio=ratio, schedule=schedule, selector=grid)
                speed = bench_config_name(arch, "grid", ratio)
                out.append(Point(kind, "grid", f"grid@{ratio:g} {label}", config, speed))
            for method in ("tomesd", "tofu"):
                if has[method]:
                    config = config_for(kind, f"{method}-{arch}", ratio=ratio, schedule=schedule)
                    out.append(
                        Point(kind, method, f"{method}@{ratio:g} {label}", config, f"{method}@{ratio:g}")
                    )
    if has["todo"]:
        for label, schedule in SCHEDULES:
            config = config_for(kind, f"todo-{arch}", schedule=schedule)
            out.append(Point(kind, "todo", f"todo@0.75 {label}", config, "todo@0.75"))
    for preset in presets:
        base = config_for(kind, preset)
        for label, name, proxy, _ in knobs(arch):
            config = merged(base, proxy)
            if config == base:
                continue  # the preset's own value
            speed = bench_config_name(arch, name, base["ratio"])
            out.append(Point(kind, "toma-knob", f"{preset}, {label}", config, speed))
        out.extend(random_under_reuse(kind, preset))
    return out


def _registered() -> Any:
    from tokenreduce.manager import get_registry

    return get_registry().presets


def bench_configs(arch: str, ratios: Sequence[float] = RATIOS) -> dict[str, dict[str, Any]]:
    """Config files for ``tokenreduce bench --configs``, keyed by variant name: the per-step speeds
    the points need that the bench's own variants lack (size weighting flipped from the preset,
    random and grid destinations, the knobs), on the real architecture."""
    from tokenreduce.config import load_config

    def full(source: Any, **update: Any) -> dict[str, Any]:
        return load_config(merged(load_config(source).model_dump(mode="json"), update)).model_dump(
            mode="json"
        )

    toma = f"toma-{arch}"
    flipped = not load_config(toma).adapter.size_weighting
    out = {}
    for ratio in ratios:
        what = "weighted" if flipped else "unweighted"
        out[bench_config_name(arch, what, ratio)] = full(
            toma, ratio=ratio, adapter={"size_weighting": flipped}
        )
        out[bench_config_name(arch, "random", ratio)] = full(toma, ratio=ratio, selector={"name": "random"})
        if ratio in GRID_STRIDES:
            grid = {"name": "grid", "stride": GRID_STRIDES[ratio]}
            out[bench_config_name(arch, "grid", ratio)] = full(toma, ratio=ratio, selector=grid)
    for preset in (toma, f"{toma}-fast"):
        if preset not in _registered():
            continue
        base = load_config(preset).model_dump(mode="json")
        for _, name, _, real in knobs(arch):
            variant = bench_config_name(arch, name, base["ratio"])
            if merged(base, real) != base and variant not in out:
                out[variant] = full(preset, **real)
        for _, name, reuse in REUSES:
            if merged(base, {"reuse": reuse}) != base:
                variant = bench_config_name(arch, f"random-{name}", base["ratio"])
                out[variant] = full(preset, selector={"name": "random"}, reuse=reuse)
    return out


# --------------------------------------------------------------------------- fidelity (run)


def _generate(pipe: Any, labels: Sequence[int], seeds: Sequence[int], steps: int) -> torch.Tensor:
    return torch.cat([pipe([lab], [s], steps=steps) for lab, s in zip(labels, seeds, strict=True)]).cpu()


def _done(output: Path, steps: int, num_seeds: int) -> set[tuple[str, str]]:
    """(kind, label) of the rows ``output`` already has at these steps and seeds."""
    if not output.exists():
        return set()
    rows = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {(r["kind"], r["label"]) for r in rows if r["steps"] == steps and r["seeds"] == num_seeds}


def run(
    kinds: Sequence[str],
    output: Path,
    steps: int = 20,
    num_seeds: int = 8,
    device: str | None = None,
    weights: Path | None = None,
    only: Sequence[str] | None = None,
    shard: tuple[int, int] = (0, 1),
    log: Any = print,
) -> Iterator[dict[str, Any]]:
    """Score every point of ``kinds`` (``only``: these methods), appending a JSON line per row to
    ``output``; points it already holds at the same steps and seeds are skipped, so a stopped run
    resumes. ``shard=(i, n)``: only every n-th point from the i-th, so n processes share a sweep."""
    from tokenreduce.api import apply
    from tokenreduce.demo import DEMO_CLASSES
    from tokenreduce.quality.proxy.features import load_features
    from tokenreduce.quality.proxy.models import load_proxy

    index, count = shard
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: the index must be in [0, {count})")
    todo = [p for kind in kinds for p in points(kind) if not only or p.method in only][index::count]
    done = _done(output, steps, num_seeds)
    todo = [p for p in todo if (p.kind, p.label) not in done]  # resumes a stopped run
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    where = f"{dev} ({torch.cuda.get_device_name(dev)})" if str(dev).startswith("cuda") else str(dev)
    features = load_features(weights, dev)
    output.parent.mkdir(parents=True, exist_ok=True)
    seeds = list(range(num_seeds))
    for kind in dict.fromkeys(p.kind for p in todo):
        pipe = load_proxy(kind, weights, dev)
        labels = [pipe.class_names.index(DEMO_CLASSES[i % len(DEMO_CLASSES)]) for i in seeds]
        base = _generate(pipe, labels, seeds, steps)
        base_embeddings = metrics.embed(features, metrics.frames(base))
        for point in (p for p in todo if p.kind == kind):
            start = time.perf_counter()
            with apply(pipe, point.config):
                images = _generate(pipe, labels, seeds, steps)
            scores = metrics.same_seed(features, images, base, base_embeddings)
            row = {
                "kind": kind,
                "method": point.method,
                "label": point.label,
                "speed_name": point.speed_name,
                "config": point.config,
                "steps": steps,
                "seeds": num_seeds,
                "batch": 1,
                "device": where,
                **{name: float(values.mean()) for name, values in scores.items()},
                # Per image, in seed order: paired differences between rows need them.
                "psnr_per_image": [round(float(x), 4) for x in scores["psnr"]],
                "feature_similarity_per_image": [round(float(x), 6) for x in scores["feature_similarity"]],
                "seconds": round(time.perf_counter() - start, 2),
            }
            with output.open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            log(f"{kind} {point.label}: {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f}, {row['seconds']} s")
            yield row


# --------------------------------------------------------------------------- speed and frontier (report)


def bench_speeds(bench: dict[str, Any], mode: str) -> dict[tuple[str, str], float]:
    """(arch, variant name) -> per-step speedup of a merged step."""
    out = {}
    for r in bench.get("runs", []):
        if r.get("mode") == mode:
            for v in r["variants"]:
                if v.get("speedup") is not None:
                    out[(r["arch"], v["name"])] = float(v["speedup"])
    return out


def _same_config(config: dict[str, Any]) -> str:
    """``config`` validated (parameters added since a row was made get their defaults), as text."""
    from tokenreduce.config import load_config

    return json.dumps(load_config(config).model_dump(mode="json"), sort_keys=True)


def as_shipped(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with the presets as shipped now: a preset or knob row whose config is a registered
    preset's (on its proxy) becomes that preset's row; a preset's row whose config no longer is
    becomes a knob row named "<preset> (earlier)", and so do the knob rows varied from it."""
    current: dict[tuple[str, str], str] = {}
    for kind in {r["kind"] for r in rows}:
        toma = f"toma-{spec(kind).arch}"
        for preset in (p for p in (toma, f"{toma}-fast") if p in _registered()):
            current[(kind, _same_config(config_for(kind, preset)))] = preset
    earlier = {
        (r["kind"], r["label"])
        for r in rows
        if r["method"] == "preset" and (r["kind"], _same_config(r["config"])) not in current
    }
    out = []
    for row in rows:
        if row["method"] not in ("preset", "toma-knob"):
            out.append(row)
            continue
        shipped = current.get((row["kind"], _same_config(row["config"])))
        base, _, knob = row["label"].partition(", ")
        if shipped is not None:
            row = row | {"method": "preset", "label": shipped}
        elif (row["kind"], base) in earlier:
            row = row | {"method": "toma-knob", "label": f"{base} (earlier)" + (f", {knob}" if knob else "")}
        out.append(row)
    return out


def with_speed(rows: list[dict[str, Any]], speeds: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        arch = BENCH_ARCHS[spec(row["kind"]).arch]
        step = speeds.get((arch, row["speed_name"])) if row["speed_name"] else None
        speed = None if step is None else schedule_speedup(row["config"], step, row["steps"])
        out.append(row | {"step_speedup": step, "speedup": speed})
    return out


def pareto(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Rows no other row beats on both end-to-end speed and ``metric`` (ties kept). A row no faster
    than the unmodified model is dominated by it (same images, at least the same speed)."""
    timed = [r for r in rows if r["speedup"] is not None and r["speedup"] > 1.0]
    return [
        r
        for r in timed
        if not any(
            o["speedup"] >= r["speedup"]
            and o[metric] >= r[metric]
            and (o["speedup"], o[metric]) != (r["speedup"], r[metric])
            for o in timed
        )
    ]


def best_at_least(
    rows: list[dict[str, Any]], method: str, speed: float, metric: str
) -> dict[str, Any] | None:
    """``method``'s best row on ``metric`` among those at least ``speed`` fast."""
    found = [r for r in rows if r["method"] == method and r["speedup"] is not None and r["speedup"] >= speed]
    return max(found, key=lambda r: r[metric], default=None)


def paired(a: dict[str, Any], b: dict[str, Any], metric: str) -> tuple[float, float] | None:
    """Mean and standard error of ``a - b`` on ``metric`` over the same seeds' images (``None``
    when the rows lack per-image values)."""
    xs, ys = a.get(f"{metric}_per_image"), b.get(f"{metric}_per_image")
    if not xs or not ys or len(xs) != len(ys) or len(xs) < 2:
        return None
    return metrics.mean_and_sem(torch.tensor(xs, dtype=torch.float64) - torch.tensor(ys, dtype=torch.float64))


def paired_text(a: dict[str, Any], b: dict[str, Any], metric: str) -> str:
    """``a - b`` per image, and whether it is within two standard errors of no difference."""
    found = paired(a, b, metric)
    if found is None:
        return ""
    mean, se = found
    digits = 2 if metric == "psnr" else 5
    noise = "; within noise" if abs(mean) <= 2 * se else ""
    return f"; paired difference {mean:+.{digits}f} ± {se:.{digits}f} over {len(a[f'{metric}_per_image'])} images{noise}"


def checks(rows: list[dict[str, Any]], metric: str = "psnr", slack: float = 0.005) -> list[str]:
    """The targets, in words: presets on the frontier; ToMA beats each baseline at equal speed.

    ``slack``: a preset within this relative speed of a dominating row counts as on the frontier
    (per-step speeds are measured once; their noise is about that size). Where rows carry per-image
    values, each comparison also gives the paired difference over the same seeds and its standard
    error, and says when it is within two standard errors of none.
    """
    lines = []
    digits = 2 if metric == "psnr" else 5
    for kind in sorted({r["kind"] for r in rows}):
        mine = [r for r in rows if r["kind"] == kind]
        for preset in (r for r in mine if r["method"] == "preset" and r["speedup"] is not None):
            beaten = [
                o
                for o in mine
                if o["speedup"] is not None
                and o["speedup"] >= preset["speedup"] * (1 + slack)
                and o[metric] > preset[metric]
            ]
            best = max(beaten, key=lambda o: o[metric], default=None)
            verdict = "on the frontier"
            if best is not None:
                verdict = f"dominated by {best['label']} ({best['speedup']:.3f}x, {best[metric]:.{digits}f}"
                verdict += f"{paired_text(best, preset, metric)})"
            lines.append(
                f"{kind} {preset['label']} ({preset['speedup']:.3f}x, {preset[metric]:.{digits}f}): {verdict}"
            )
        for preset in (r for r in mine if r["method"] == "preset" and r["speedup"] is not None):
            for method in ("random", "grid", "tomesd", "tofu", "todo"):
                rival = best_at_least(mine, method, preset["speedup"] * (1 - slack), metric)
                if rival is not None:
                    verdict = "better" if preset[metric] > rival[metric] else "NOT better"
                    lines.append(
                        f"{kind} {preset['label']} vs the best {method} row at equal or higher speed, "
                        f"{metric}: {verdict} ({preset[metric]:.{digits}f} vs {rival[metric]:.{digits}f}, "
                        f"{rival['label']}, {rival['speedup']:.3f}x{paired_text(preset, rival, metric)})"
                    )
        for method in ("random", "grid", "tomesd", "tofu", "todo"):
            wins = losses = slower = 0
            worst = None
            for r in (r for r in mine if r["method"] == method and r["speedup"] is not None):
                if r["speedup"] <= 1.0:
                    slower += 1  # dominated by the unmodified model itself
                    continue
                toma = best_at_least(mine, "toma", r["speedup"], metric)
                if toma is not None and toma[metric] > r[metric]:
                    wins += 1
                else:
                    losses += 1
                    worst = r
            if wins or losses or slower:
                tail = "" if worst is None else f"; not at {worst['label']} ({worst['speedup']:.3f}x)"
                tail += f"; {slower} no faster than the unmodified model" if slower else ""
                lines.append(
                    f"{kind} ToMA vs {method} at equal or higher end-to-end speed, {metric}: "
                    f"better at {wins} of {wins + losses}{tail}"
                )
    return lines


def markdown(rows: list[dict[str, Any]], frontier_ids: set[int]) -> str:
    head = "| proxy | variant | per-step speedup | end-to-end speedup | PSNR (dB) | SSIM | feature sim. | frontier |\n"
    head += "|---|---|---:|---:|---:|---:|---:|:---:|\n"
    body = []
    order = sorted(rows, key=lambda r: (r["kind"], -(r["speedup"] or 0), -r["psnr"]))
    for r in order:
        step = "-" if r["step_speedup"] is None else f"{r['step_speedup']:.3f}"
        e2e = "-" if r["speedup"] is None else f"{r['speedup']:.3f}"
        star = "*" if id(r) in frontier_ids else ""
        body.append(
            f"| {r['kind']} | {r['label']} | {step} | {e2e} | {r['psnr']:.2f} | {r['ssim']:.3f} | "
            f"{r['feature_similarity']:.5f} | {star} |"
        )
    return head + "\n".join(body) + "\n"


#: One colour per method in every panel (the presets are drawn as stars on top).
COLOURS = {
    "toma": "tab:blue",
    "toma-knob": "tab:cyan",
    "random": "tab:gray",
    "grid": "tab:purple",
    "tomesd": "tab:orange",
    "tofu": "tab:green",
    "todo": "tab:red",
}


def plot(
    rows: list[dict[str, Any]], frontier: list[dict[str, Any]], metric: str, path: Path, title: str
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uncoloured = sorted({r["method"] for r in rows} - set(COLOURS) - {"preset"})
    if uncoloured:  # a row left off the plot would leave frontier points undrawn
        raise ValueError(f"no plot colour for the methods {uncoloured}; add them to COLOURS")
    kinds = sorted({r["kind"] for r in rows})
    fig, axes = plt.subplots(1, len(kinds), figsize=(6 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds, strict=True):
        mine = [r for r in rows if r["kind"] == kind and r["speedup"] is not None]
        for method, colour in COLOURS.items():
            pts = [r for r in mine if r["method"] == method]
            if pts:
                ax.scatter(
                    [r["speedup"] for r in pts],
                    [r[metric] for r in pts],
                    s=14,
                    color=colour,
                    label=method,
                    alpha=0.7,
                )
        edge = sorted((r for r in frontier if r["kind"] == kind), key=lambda r: r["speedup"])
        ax.plot(
            [r["speedup"] for r in edge],
            [r[metric] for r in edge],
            "-",
            color="black",
            lw=0.8,
            label="frontier",
        )
        for r in (r for r in mine if r["method"] == "preset"):
            ax.scatter(
                [r["speedup"]], [r[metric]], marker="*", s=160, color="gold", edgecolor="black", zorder=5
            )
            ax.annotate(
                r["label"], (r["speedup"], r[metric]), textcoords="offset points", xytext=(5, -10), fontsize=8
            )
        ax.set_title(f"{kind}: {title}")
        ax.set_xlabel("end-to-end speedup over unmodified (bench per-step speed x schedule)")
        ax.set_ylabel(f"{metric} vs unmodified, batch 1")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(
    rows_file: Path, bench_files: Sequence[Path], output: Path, mode: str = "graph", metric: str = "psnr"
) -> list[str]:
    rows = [json.loads(line) for line in rows_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = as_shipped(rows)
    benches = [json.loads(path.read_text(encoding="utf-8")) for path in bench_files]
    speeds: dict[tuple[str, str], float] = {}
    for bench in benches:  # a variant timed in several records keeps the first record's speed
        for key, value in bench_speeds(bench, mode).items():
            speeds.setdefault(key, value)
    rows = with_speed(rows, speeds)
    frontier = [
        r
        for kind in {r["kind"] for r in rows}
        for r in pareto([x for x in rows if x["kind"] == kind], metric)
    ]
    lines = checks(rows, metric)
    output.mkdir(parents=True, exist_ok=True)
    gpu = ", ".join(sorted({b.get("env", {}).get("gpu", "?") for b in benches}))
    names = [path.name for path in bench_files]
    (output / "frontier.json").write_text(
        json.dumps({"bench": names, "mode": mode, "metric": metric, "checks": lines, "rows": rows}, indent=2)
        + "\n",
        encoding="utf-8",
    )
    ids = {id(r) for r in frontier}
    sources = ", ".join(f"`{n}`" for n in names)
    text = f"Speed: {sources} ({mode}, {gpu}); frontier on {metric}.\n\n" + "\n".join(f"- {x}" for x in lines)
    (output / "frontier.md").write_text(text + "\n\n" + markdown(rows, ids), encoding="utf-8")
    with contextlib.suppress(ModuleNotFoundError):  # matplotlib is optional: the tables are written
        plot(rows, frontier, metric, output / "frontier.png", f"speed ({mode}, {gpu}) vs fidelity")
    return lines


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and int(index) < int(count)):
        raise SystemExit(f"--shard {text!r}: expected I/N with 0 <= I < N, e.g. 0/4")
    return int(index), int(count)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("configs", help="write the bench config files the frontier's speeds need")
    c.add_argument("-o", "--output", required=True)
    c.add_argument("--archs", nargs="+", default=list(BENCH_ARCHS))
    r = sub.add_parser("run", help="score every point on the proxies (appends JSON lines)")
    r.add_argument("--kinds", nargs="+", default=list(LATENT_KINDS))
    r.add_argument("--steps", type=int, default=20)
    r.add_argument("--seeds", type=int, default=8)
    r.add_argument("--methods", nargs="+", default=None, help="only these methods (default: all)")
    r.add_argument("--device", default=None)
    r.add_argument("--proxy-weights", default=None)
    r.add_argument(
        "--shard", default="0/1", help="I/N: only every N-th point from the I-th (N processes share a sweep)"
    )
    r.add_argument("-o", "--output", required=True, help="JSON-lines file (appended)")
    s = sub.add_parser("report", help="join rows with a bench record: frontier, checks, table, plot")
    s.add_argument("rows")
    s.add_argument(
        "--speed",
        nargs="+",
        required=True,
        help="tokenreduce bench JSON files (a variant in several: the first's)",
    )
    s.add_argument("--mode", default="graph")
    s.add_argument("--metric", default="psnr", choices=["psnr", "ssim", "feature_similarity"])
    s.add_argument("-o", "--output", required=True)
    args = p.parse_args(argv)
    if args.command == "configs":
        import yaml

        folder = Path(args.output)
        folder.mkdir(parents=True, exist_ok=True)
        for arch in args.archs:
            for name, config in bench_configs(arch).items():
                (folder / f"{name}.yaml").write_text(
                    yaml.safe_dump(config, sort_keys=False), encoding="utf-8"
                )
                print(folder / f"{name}.yaml")
        return 0
    if args.command == "run":
        weights = Path(args.proxy_weights) if args.proxy_weights else None
        for _ in run(
            args.kinds,
            Path(args.output),
            args.steps,
            args.seeds,
            args.device,
            weights,
            args.methods,
            _shard(args.shard),
        ):
            pass
        return 0
    for line in report(
        Path(args.rows), [Path(p) for p in args.speed], Path(args.output), args.mode, args.metric
    ):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
