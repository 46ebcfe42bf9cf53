"""Benchmark records: statistics, speedups and efficiencies, and the JSON / markdown / PNG outputs."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from tokenreduce.bench.variants import METHODS, REFERENCES

EFFICIENCY_NOTE = (
    "speedup = unmodified median / variant median (same run); efficiency = (speedup - 1) / "
    "(ideal speedup - 1) with the ideal merge at the same ratio and the ToMA preset's placement (a speed "
    "ceiling: it keeps the first tokens, so its images are no quality reference), null for "
    "the reference variants and where that ideal is missing or not faster than the unmodified model "
    "(no headroom); the ideal runs through the framework's runtime, so it includes the per-block cost the "
    "runtime adds to any merger"
)
STEP_NOTE = (
    "eager and graph modes time merged steps only (a config's merge schedule is set to `always` there); "
    "the end-to-end speedup of a schedule that merges some steps mixes these with unmodified steps "
    "(tokenreduce.quality.speed)"
)
COMPILE_NOTE = (
    "compile mode: torch.compile of each patched model, compiled once (a graph per step kind), warmed up, "
    "then timed; variants run one after another, the unmodified model first and again last "
    "(notes.compile.unmodified_again_ms: drift over the run)"
)
GRAPH_NOTE = (
    "graph mode: one CUDA graph per distinct reuse decision of a variant's cycle, replayed in the "
    "cycle's order; plans are not chained between a variant's graphs (timing only, outputs meaningless)"
)


def stats(samples: Sequence[float]) -> dict[str, float | int | None]:
    """Median, quartiles, IQR, min and max of per-step milliseconds."""
    if not samples:
        return {
            "n": 0,
            "median_ms": None,
            "q1_ms": None,
            "q3_ms": None,
            "iqr_ms": None,
            "min_ms": None,
            "max_ms": None,
        }
    a = np.asarray(samples, dtype=float)
    q1, median, q3 = (float(v) for v in np.percentile(a, [25, 50, 75]))
    return {
        "n": int(a.size),
        "median_ms": median,
        "q1_ms": q1,
        "q3_ms": q3,
        "iqr_ms": q3 - q1,
        "min_ms": float(a.min()),
        "max_ms": float(a.max()),
    }


def _ratio_key(ratio: float | None) -> float | None:
    return None if ratio is None else round(float(ratio), 6)


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """Fill ``speedup`` and ``efficiency`` of every row of one run (in place)."""
    base = next((r.get("median_ms") for r in rows if r["method"] == "unmodified"), None)
    for row in rows:
        median = row.get("median_ms")
        row["speedup"] = base / median if base and median else None
    ideal = {_ratio_key(r["ratio"]): r["speedup"] for r in rows if r["method"] == "ideal" and r["speedup"]}
    for row in rows:
        row["efficiency"] = None
        if row["method"] in REFERENCES or row["speedup"] is None:
            continue
        ceiling = ideal.get(_ratio_key(row["ratio"]))
        if ceiling is not None and ceiling > 1.0:
            row["efficiency"] = (row["speedup"] - 1.0) / (ceiling - 1.0)


# --------------------------------------------------------------------------- outputs


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _revision_text(revision: str | dict[str, Any] | None) -> str:
    """ " at revision abc1234" from a commit id or :func:`~tokenreduce.bench.record.git_revision`'s mapping."""
    if isinstance(revision, dict):
        dirty = " with uncommitted changes" if revision.get("dirty") else ""
        return f" at revision {str(revision.get('commit', '?'))[:7]}{dirty}"
    return f" at revision {revision[:7]}" if revision else ""


def markdown(record: dict[str, Any]) -> str:
    env = record.get("env", {})
    lines = ["# tokenreduce bench", ""]
    if record.get("command"):
        lines += [f"`{' '.join(record['command'])}`{_revision_text(record.get('revision'))}", ""]
    lines += [
        f"{record.get('date', '')}; {env.get('gpu', 'CPU')}; torch {env.get('torch', '?')}, "
        f"diffusers {env.get('diffusers', '?')}, CUDA {env.get('cuda', '-')}",
        "",
    ]
    for run in record["runs"]:
        unit = "generation" if run["mode"] == "pipeline" else "step"
        lines += [
            f"## {run['arch']}, {run['mode']}: batch {run['batch']}, {run['dtype']}, {run['height']}x{run['width']}, "
            f"{run['rounds']} rounds (median ms per {unit})",
            "",
            "| variant | ratio | mode | median ms | IQR ms | speedup | efficiency | peak GiB |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for v in run["variants"]:
            if v.get("error"):
                lines.append(f"| {v['name']} | {_fmt(v['ratio'], 'g')} | {run['mode']} | failed | | | | |")
                continue
            lines.append(
                f"| {v['name']} | {_fmt(v['ratio'], 'g')} | {run['mode']} | {_fmt(v['median_ms'], '.2f')} | "
                f"{_fmt(v['iqr_ms'], '.2f')} | {_fmt(v['speedup'], '.3f')} | {_fmt(v['efficiency'], '.2f')} | "
                f"{_fmt(v['peak_memory_gib'], '.2f')} |"
            )
        failed = [v for v in run["variants"] if v.get("error")]
        if failed or run["skipped"]:
            lines.append("")
        for v in failed:
            lines.append(f"- {v['name']} failed: {v['error'].splitlines()[0]}")
        for s in run["skipped"]:
            lines.append(f"- {s['name']} skipped: {s['reason'].splitlines()[0]}")
        lines.append("")
    lines += [f"- {note}" for note in record.get("notes", [])]
    return "\n".join(lines) + "\n"


def plot(record: dict[str, Any], path: Path) -> None:
    """Speedup vs ratio per method, the ideal dashed; one panel per architecture and mode."""
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    runs = record["runs"]
    archs = list(dict.fromkeys(r["arch"] for r in runs)) or ["-"]
    modes = list(dict.fromkeys(r["mode"] for r in runs)) or ["-"]
    fig = Figure(figsize=(4.5 * len(modes), 3.6 * len(archs)), layout="constrained")
    axes = fig.subplots(len(archs), len(modes), squeeze=False)
    for i, arch in enumerate(archs):
        for j, mode in enumerate(modes):
            ax = axes[i][j]
            run = next((r for r in runs if r["arch"] == arch and r["mode"] == mode), None)
            ax.set_title(f"{arch}, {mode}" + (f" (batch {run['batch']}, {run['dtype']})" if run else ""))
            ax.set_xlabel("merge ratio")
            ax.set_ylabel("speedup vs unmodified")
            ax.axhline(1.0, color="0.6", linewidth=1)
            if run is None:
                continue
            _plot_run(ax, run)
    fig.savefig(path, dpi=120)


def _plot_run(ax: Any, run: dict[str, Any]) -> None:
    by_method: dict[str, list[tuple[float, float]]] = {}
    for v in run["variants"]:
        if v.get("speedup") is None or v["ratio"] is None or v["method"] == "unmodified":
            continue
        if v["method"] == "identity":
            ax.axhline(v["speedup"], color="0.3", linestyle=":", linewidth=1, label="identity (overhead)")
            continue
        by_method.setdefault(v["method"], []).append((v["ratio"], v["speedup"]))
    for method, points in sorted(by_method.items()):
        points.sort()
        xs, ys = zip(*points, strict=True)
        if method == "ideal":
            ax.plot(xs, ys, "k--", marker="x", label="ideal (ceiling)")
        else:
            ax.plot(xs, ys, marker="o", color=_color(method), label=method)
    if by_method:
        ax.legend(fontsize="small")


def _color(method: str) -> str:
    """The same colour for a method in every panel (extra configs get the remaining ones)."""
    palette = [f"C{i}" for i in range(10)]
    known = [m for m in METHODS if m not in REFERENCES]
    if method in known:
        return palette[known.index(method)]
    return palette[len(known) + sum(map(ord, method)) % (len(palette) - len(known))]


def table(run: dict[str, Any]) -> Any:
    """A rich table of one run, for the console."""
    from rich.table import Table

    unit = "generation" if run["mode"] == "pipeline" else "step"
    out = Table(
        title=f"{run['arch']}, {run['mode']}: batch {run['batch']}, {run['dtype']}, "
        f"{run['height']}x{run['width']}, ms per {unit}"
    )
    for column in ("variant", "ratio", "median ms", "IQR ms", "speedup", "efficiency", "peak GiB"):
        out.add_column(column, justify="left" if column == "variant" else "right")
    for v in run["variants"]:
        if v.get("error"):
            out.add_row(v["name"], _fmt(v["ratio"], "g"), "[red]failed[/red]", "", "", "", "")
            continue
        out.add_row(
            v["name"],
            _fmt(v["ratio"], "g"),
            _fmt(v["median_ms"], ".2f"),
            _fmt(v["iqr_ms"], ".2f"),
            _fmt(v["speedup"], ".3f"),
            _fmt(v["efficiency"], ".2f"),
            _fmt(v["peak_memory_gib"], ".2f"),
        )
    return out


PLOT_SKIPPED = "plot skipped: matplotlib is not installed (pip install 'tokenreduce[plots]')"


class Written(TypedDict):
    """The files :func:`write` wrote; ``plot`` is ``None`` without matplotlib."""

    json: Path
    markdown: Path
    plot: Path | None


def write(record: dict[str, Any], output: Path) -> Written:
    """``bench.json``, ``bench.md`` and ``bench.png`` in ``output``; the plot is ``None`` without
    matplotlib (an optional extra)."""
    output.mkdir(parents=True, exist_ok=True)
    paths: Written = {
        "json": output / "bench.json",
        "markdown": output / "bench.md",
        "plot": output / "bench.png",
    }
    paths["json"].write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    paths["markdown"].write_text(markdown(record), encoding="utf-8")
    try:
        plot(record, output / "bench.png")
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("matplotlib"):
            raise
        paths["plot"] = None
    return paths
