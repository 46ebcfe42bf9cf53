"""``tokenreduce bench --components``: the GPU time of each part of a preset's merge at real shapes.

Each part (feature normalisation, selection, weights, merge, unmerge, the tile gathers, and the
ideal's slice and concat for comparison) is captured alone in a CUDA graph and replayed; the
median of the replays is reported in microseconds. Shapes are those of one merged layer of the
published models at 1024x1024.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokenreduce.config import load_config, resolve
from tokenreduce.engine import Runtime
from tokenreduce.interfaces import SelectContext

#: (label, preset, token grid, batch, channels, dtype) of one merged layer.
CASES = (
    ("flux", "toma-flux", (64, 64), 1, 3072, torch.bfloat16),
    ("sdxl 64x64", "toma-sdxl", (64, 64), 2, 640, torch.float16),
    ("sdxl 32x32", "toma-sdxl", (32, 32), 2, 1280, torch.float16),
)


def replay_time_us(fn: Callable[[], Any], replays: int = 50) -> dict[str, float]:
    """Median and quartiles of ``fn`` captured in a CUDA graph and replayed (launch overhead excluded)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0)
    return spread(times)


def spread(times: list[float]) -> dict[str, float]:
    """``{"median", "q1", "q3", "min", "max", "n"}`` of a list of times."""
    import numpy as np

    a = np.asarray(times, dtype=float)
    q1, median, q3 = (float(v) for v in np.percentile(a, [25, 50, 75]))
    return {
        "median": median,
        "q1": q1,
        "q3": q3,
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
    }


def component_times(
    preset: str, grid: tuple[int, int], batch: int, channels: int, dtype: torch.dtype
) -> dict[str, dict[str, float]]:
    runtime = Runtime(resolve(load_config(preset)))
    layout = runtime.layout(grid).to(torch.device("cuda"))
    x = torch.randn(batch, math.prod(grid), channels, device="cuda", dtype=dtype)
    ctx = SelectContext(layout=layout, generator=torch.Generator(device="cuda"))
    features = runtime.features(x, layout)
    destinations = runtime.selector.select(features, ctx)
    plan = runtime.merger.plan(x, features, destinations, layout)
    merged = plan.merge(x)
    keep = merged.shape[1]
    parts: dict[str, Callable[[], Any]] = {
        "features (normalise)": lambda: runtime.features(x, layout),
        "selection": lambda: runtime.selector.select(features, ctx),
        "weights (plan)": lambda: runtime.merger.plan(x, features, destinations, layout),
        "merge": lambda: plan.merge(x),
        "unmerge": lambda: plan.unmerge(merged),
        "gather into tiles": lambda: layout.to_regions(x),
        "ideal merge + unmerge (slice, pad)": lambda: torch.nn.functional.pad(
            x[:, :keep], (0, 0, 0, x.shape[1] - keep)
        ),
        "copy of the tokens (reference)": lambda: x.clone(),
    }
    return {name: replay_time_us(fn) for name, fn in parts.items()}


def run_components(output: Path, console: Any) -> dict[str, Any]:
    if not torch.cuda.is_available():
        raise ValueError("--components times CUDA kernels: it needs a GPU")
    import time

    from tokenreduce.bench.record import provenance
    from tokenreduce.generate import environment

    start = time.perf_counter()
    results: dict[str, Any] = {
        **provenance(),
        "env": environment(),
        "unit": "microseconds per CUDA-graph replay: median, quartiles, min, max over the replays",
        "cases": {},
    }
    for label, preset, grid, batch, channels, dtype in CASES:
        times = component_times(preset, grid, batch, channels, dtype)
        results["cases"][label] = {
            "preset": preset,
            "grid": list(grid),
            "batch": batch,
            "channels": channels,
            "dtype": str(dtype),
            "us": times,
        }
        for part, us in times.items():
            console.print(
                f"{label:12s} {part:40s} {us['median']:9.1f} us (IQR {us['q1']:.1f}-{us['q3']:.1f})"
            )
    results["duration_s"] = round(time.perf_counter() - start, 2)
    output.mkdir(parents=True, exist_ok=True)
    (output / "components.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    console.print(f"results: {output / 'components.json'}")
    return results
