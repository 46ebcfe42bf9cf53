"""``tokenreduce demo``: ToMA on the embedded proxy models, CPU, no download.

The proxies are small SDXL-shaped and Flux-shaped models trained on photographs (committed
weights, see docs/quality.md): on the latents of a small autoencoder by default, whose decoder the
merge errors pass through as in the real models, or with ``latent=False`` in pixel space.
Each generates a few class-conditional images from the same seeds with and without each model's
default ToMA preset; the demo prints the time per denoising step on this CPU (not a GPU speedup:
it says so), the difference (PSNR against the unmodified images) and writes a side-by-side PNG
(per model: unmodified, ToMA and their difference, amplified by one gain for both models; each
column labelled with its class).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from tokenreduce.api import apply

DEMO_CLASSES = ("astronaut", "cat", "rocket", "coffee")


def timed(pipe: Any, labels: list[int], seeds: list[int], steps: int) -> tuple[torch.Tensor, float]:
    """Images and the mean wall time of a denoising step (timed at the scheduler's steps; the mean,
    not the median, so that steps a schedule does not merge count as in a whole generation)."""
    marks: list[float] = []
    scheduler = pipe.scheduler
    patched = scheduler.__dict__.get("step")  # tokenreduce's clock hook, when applied
    step = scheduler.step

    def timed_step(*args: Any, **kwargs: Any) -> Any:
        marks.append(time.perf_counter())
        return step(*args, **kwargs)

    scheduler.step = timed_step
    try:
        start = time.perf_counter()
        images = pipe(labels, seeds, steps=steps)
    finally:
        if patched is None:
            del scheduler.step
        else:
            scheduler.step = patched
    times = np.diff([start, *marks]).tolist()
    return images, statistics.fmean(times)


def to_rgb(images: torch.Tensor) -> np.ndarray:
    """Images ``(N, 3, H, W)`` in [0, 1] -> one row ``(H, N*W, 3)`` of uint8."""
    return (torch.cat(list(images), dim=-1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def wrap(draw: ImageDraw.ImageDraw, text: str, width: float) -> list[str]:
    """``text`` broken at spaces into lines no wider than ``width`` pixels (a single word wider
    than that keeps a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def side_by_side(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], scale: int = 4) -> Image.Image:
    """One labelled row of panels per model, each panel upscaled ``scale`` times (nearest); titles
    wider than the panels wrap."""
    label_h, pad = 16, 8
    tiles = [
        [
            (
                label,
                Image.fromarray(p).resize((p.shape[1] * scale, p.shape[0] * scale), Image.Resampling.NEAREST),
            )
            for label, p in row
        ]
        for _, row in rows
    ]
    width = max(sum(t.width for _, t in row) + pad * (len(row) + 1) for row in tiles)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    titles = [wrap(measure, title, width - 2 * pad) for title, _ in rows]
    height = sum(
        max(t.height for _, t in row) + (len(lines) + 1) * label_h + pad
        for lines, row in zip(titles, tiles, strict=True)
    )
    canvas = Image.new("RGB", (width, height + pad), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for lines, row in zip(titles, tiles, strict=True):
        for line in lines:
            draw.text((pad, y), line, fill="black")
            y += label_h
        x = pad
        for label, tile in row:
            draw.text((x, y), label, fill="black")
            canvas.paste(tile, (x, y + label_h))
            x += tile.width + pad
        y += label_h + max(t.height for _, t in row) + pad
    return canvas


#: (proxy, preset, title): each model's default ToMA preset.
DEMO_MODELS = (
    ("sdxl", "toma-sdxl", "SDXL-shaped UNet"),
    ("flux", "toma-flux", "Flux-shaped transformer"),
)

#: Measured per-step speedups of each preset's merged step on a GPU (from committed bench records).
GPU_SPEEDS = Path(__file__).parent / "quality" / "assets" / "gpu-step-speedups.json"


def gpu_speedup(preset: str, config: Any, steps: int) -> float | None:
    """End-to-end speedup of ``config`` at 1024x1024 on the recorded GPU: its measured merged-step
    speedup at the config's ratio, mixed with unmodified steps as its schedule runs them over ``steps``
    (``None`` where the record has no such ratio)."""
    from tokenreduce.quality.speed import schedule_speedup

    record = json.loads(GPU_SPEEDS.read_text(encoding="utf-8"))
    step = record["speedups"].get(preset.removesuffix("-fast"), {}).get(f"{config.ratio:g}")
    return None if step is None else schedule_speedup(config, step, steps)


SPEED_NOTE = (
    "The CPU time ratio is measured here, for the proxies' small images over whole generations "
    "(steps that do not merge included); token reduction pays where attention over many tokens "
    "dominates. The GPU speedup is that of a whole generation of the real model with this preset "
    "at 1024x1024: the merged step's speedup measured on an NVIDIA H200 (docs/performance.md), "
    "mixed with the unmodified steps of the preset's schedule."
)


def run_demo(
    output: Path,
    steps: int = 20,
    ratio: float | None = None,
    console: Console | None = None,
    latent: bool = True,
    weights: Path | None = None,
) -> dict[str, Any]:
    """Each model's default ToMA preset (at ``ratio`` if given) against the unmodified proxy."""
    from tokenreduce.quality.metrics import psnr
    from tokenreduce.quality.proxy.models import FLUX_PROXY_ADAPTER, load_proxy, spec

    console = console or Console()
    output.mkdir(parents=True, exist_ok=True)
    title = f"ToMA presets, {steps} steps, CPU ({torch.get_num_threads()} threads)"
    table = Table(title=title + (f", ratio {ratio}" if ratio is not None else ""))
    for column in (
        "proxy",
        "preset",
        "ratio",
        "merged steps",
        "ms/step, unmodified",
        "ms/step, ToMA",
        "CPU time ratio",
        "GPU speedup (1024x1024)",
        "PSNR vs unmodified",
    ):
        table.add_column(column)
    results: dict[str, Any] = {
        "ratio": ratio,
        "steps": steps,
        "latent": latent,
        "models": {},
        "speed_note": SPEED_NOTE,
    }
    images: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}
    space = " (latent space)" if latent else ""
    models = [
        (f"{kind}-latent" if latent else kind, preset, f"{name}{space}") for kind, preset, name in DEMO_MODELS
    ]
    pipes = {kind: load_proxy(kind, weights) for kind, _, _ in models}  # all found before any work
    for kind, preset, name in models:
        pipe = pipes[kind]
        labels = [pipe.class_names.index(c) for c in DEMO_CLASSES]
        seeds = list(range(len(labels)))
        pipe(labels[:1], seeds[:1], steps=2)  # warm-up
        base, base_step = timed(pipe, labels, seeds, steps)
        flux = spec(kind).arch == "flux"
        overrides: dict[str, Any] = {"adapter": {"name": "flux", **FLUX_PROXY_ADAPTER}} if flux else {}
        if ratio is not None:
            overrides["ratio"] = ratio
        with apply(pipe, preset, **overrides) as handle:
            pipe(labels[:1], seeds[:1], steps=2)  # warm-up (plans, layouts)
            reduced, reduced_step = timed(pipe, labels, seeds, steps)
            config = handle.config
        merged = sum(handle.runtime.schedule.steps(steps, [1 - i / steps for i in range(steps)]))
        quality = float(psnr(reduced, base).mean())
        gpu = gpu_speedup(preset, config, steps)
        label = f"{preset} (r={config.ratio:g}, merges {merged}/{steps} steps" + (
            ")" if gpu is None else f"; {gpu:.2f}x per generation at 1024x1024 on a GPU)"
        )
        table.add_row(
            name,
            preset,
            f"{config.ratio:g}",
            f"{merged}/{steps}",
            f"{base_step * 1000:.1f}",
            f"{reduced_step * 1000:.1f}",
            f"{base_step / reduced_step:.2f}x",
            "-" if gpu is None else f"{gpu:.2f}x",
            f"{quality:.1f} dB",
        )
        results["models"][name] = {
            "preset": preset,
            "ratio": config.ratio,
            "schedule": config.schedule.model_dump(),
            "merged_steps": merged,
            "step_ms_unmodified": base_step * 1000,
            "step_ms_toma": reduced_step * 1000,
            "cpu_time_ratio": base_step / reduced_step,
            "gpu_speedup_1024": gpu,
            "psnr_db": quality,
            "classes": list(DEMO_CLASSES),
        }
        images[name] = (label, base, reduced)
    console.print(table)
    console.print(SPEED_NOTE)
    png = output / "side_by_side.png"
    gain = difference_gain([(b, r) for _, b, r in images.values()])
    panels = []
    for name, (label, base, reduced) in images.items():
        diff = (reduced - base).abs().amax(dim=1, keepdim=True).expand_as(base)
        for row_title, row in (
            ("unmodified", base),
            (f"ToMA {label}", reduced),
            (f"|difference| x{gain:.0f} (same gain for both models)", (diff * gain).clamp(0, 1)),
        ):
            panels.append(
                (
                    f"{name}: {row_title}",
                    [(c, to_rgb(img[None])) for c, img in zip(DEMO_CLASSES, row, strict=True)],
                )
            )
    side_by_side(panels, scale=1 if latent else 2).save(png)
    results["difference_gain"] = gain
    (output / "demo.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    console.print(f"side-by-side (per model: unmodified, ToMA, difference; one column per class): {png}")
    console.print(f"results: {output / 'demo.json'}")
    return results


def difference_gain(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """One amplification for every model's difference picture: the largest difference fills the range."""
    largest = max(float((b - a).abs().max()) for a, b in pairs)
    return 1.0 / max(largest, 1.0 / 255)
