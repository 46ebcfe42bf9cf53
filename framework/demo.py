"""``tokenreduce demo``: ToMA on the embedded proxy models, CPU, no download.

The proxies are small SDXL-shaped and Flux-shaped models trained on photographs (committed
weights, see docs/quality.md): in pixel space by default, or with ``latent=True`` on the latents
of a small autoencoder, whose decoder the merge errors then pass through as in the real models. Each generates a few class-conditional images from the same seeds
with and without ToMA; the demo prints the time per denoising step, the difference (PSNR against
the unmodified images) and writes a side-by-side PNG (unmodified | ToMA | difference).
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
    """Images and the median wall time of one denoising step (timed at the scheduler's steps)."""
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
    return images, statistics.median(times)


def to_rgb(images: torch.Tensor) -> np.ndarray:
    """Images ``(N, 3, H, W)`` in [0, 1] -> one row ``(H, N*W, 3)`` of uint8."""
    return (torch.cat(list(images), dim=-1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def side_by_side(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], scale: int = 4) -> Image.Image:
    """One labelled row of panels per model, each panel upscaled ``scale`` times (nearest)."""
    label_h, pad = 16, 8
    tiles = [
        [
            (label, Image.fromarray(p).resize((p.shape[1] * scale, p.shape[0] * scale), Image.NEAREST))
            for label, p in row
        ]
        for _, row in rows
    ]
    width = max(sum(t.width for _, t in row) + pad * (len(row) + 1) for row in tiles)
    height = sum(max(t.height for _, t in row) + 2 * label_h + pad for row in tiles) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    y = pad
    for (title, _), row in zip(rows, tiles, strict=True):
        draw.text((pad, y), title, fill="black")
        y += label_h
        x = pad
        for label, tile in row:
            draw.text((x, y), label, fill="black")
            canvas.paste(tile, (x, y + label_h))
            x += tile.width + pad
        y += label_h + max(t.height for _, t in row) + pad
    return canvas


def run_demo(
    output: Path,
    steps: int = 20,
    ratio: float = 0.5,
    console: Console | None = None,
    latent: bool = False,
    weights: Path | None = None,
) -> dict[str, Any]:
    from tokenreduce.quality.metrics import psnr
    from tokenreduce.quality.proxy.models import FLUX_PROXY_ADAPTER, load_proxy, spec

    console = console or Console()
    output.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"ToMA, ratio {ratio}, {steps} steps, CPU ({torch.get_num_threads()} threads)")
    for column in (
        "proxy",
        "tokens (top level)",
        "step, unmodified",
        "step, ToMA",
        "speedup",
        "PSNR vs unmodified",
    ):
        table.add_column(column)
    panels: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    results: dict[str, Any] = {"ratio": ratio, "steps": steps, "latent": latent, "models": {}}
    space = " (latent space)" if latent else ""
    models = (
        ("sdxl-latent" if latent else "sdxl", "toma-sdxl", f"SDXL-shaped UNet{space}"),
        ("flux-latent" if latent else "flux", "toma-flux", f"Flux-shaped transformer{space}"),
    )
    pipes = {kind: load_proxy(kind, weights) for kind, _, _ in models}  # all found before any work
    for kind, preset, title in models:
        pipe = pipes[kind]
        labels = [pipe.class_names.index(name) for name in DEMO_CLASSES]
        seeds = list(range(len(labels)))
        pipe(labels[:1], seeds[:1], steps=2)  # warm-up
        base, base_step = timed(pipe, labels, seeds, steps)
        flux = spec(kind).arch == "flux"
        overrides = {"adapter": {"name": "flux", **FLUX_PROXY_ADAPTER}} if flux else {}
        with apply(pipe, preset, ratio=ratio, **overrides):
            pipe(labels[:1], seeds[:1], steps=2)  # warm-up (plans, layouts)
            reduced, reduced_step = timed(pipe, labels, seeds, steps)
        quality = float(psnr(reduced, base).mean())
        table.add_row(
            title,
            f"{spec(kind).size // 2}x{spec(kind).size // 2}",
            f"{base_step * 1000:.1f} ms",
            f"{reduced_step * 1000:.1f} ms",
            f"{base_step / reduced_step:.2f}x",
            f"{quality:.1f} dB",
        )
        results["models"][title] = {
            "preset": preset,
            "step_ms_unmodified": base_step * 1000,
            "step_ms_toma": reduced_step * 1000,
            "speedup": base_step / reduced_step,
            "psnr_db": quality,
            "classes": list(DEMO_CLASSES),
        }
        a, b = to_rgb(base), to_rgb(reduced)
        diff = np.abs(a.astype(np.float32) - b.astype(np.float32)).max(axis=-1)
        gain = 255.0 / max(float(diff.max()), 1.0)
        diff_rgb = np.repeat((diff * gain).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
        panels.append(
            (title, [("unmodified", a), (f"ToMA r={ratio}", b), (f"|difference| x{gain:.0f}", diff_rgb)])
        )
    console.print(table)
    png = output / "side_by_side.png"
    side_by_side(panels, scale=1 if latent else 2).save(png)
    (output / "demo.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    console.print(f"side-by-side (unmodified | ToMA | difference): {png}")
    console.print(f"results: {output / 'demo.json'}")
    return results
