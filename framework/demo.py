"""``tokenreduce demo``: ToMA on embedded SDXL-shaped and Flux-shaped models, CPU, no download.

Each model samples a few denoising steps from the same noise with and without ToMA; the demo
prints the median step time and the output difference, and writes a side-by-side PNG
(unmodified | ToMA | difference) of the final latents.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from rich.console import Console
from rich.table import Table

from framework.api import apply


@dataclass
class DemoModel:
    name: str
    preset: str
    model: torch.nn.Module
    latents: torch.Tensor  # initial noise, in the model's input layout
    conditioning: dict[str, Any]
    grid: tuple[int, int]  # latent height, width (for rendering)
    flow: bool  # flow matching (Flux) or epsilon prediction (SDXL)


def sdxl_demo_model(seed: int = 0) -> DemoModel:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 128),
        layers_per_block=1,
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 4, 8),
        cross_attention_dim=64,
        norm_num_groups=16,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=64 + 6 * 8,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(2, 4, 64, 64, generator=g)
    conditioning = {
        "encoder_hidden_states": torch.randn(2, 8, 64, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 64, generator=g),
            "time_ids": torch.tensor([[512.0, 512.0, 0.0, 0.0, 512.0, 512.0]]).repeat(2, 1),
        },
    }
    return DemoModel("SDXL-shaped UNet", "toma-sdxl", unet, latents, conditioning, (64, 64), flow=False)


def flux_demo_model(seed: int = 0) -> DemoModel:
    from diffusers import FluxTransformer2DModel

    from framework.testing.tiny_flux import image_ids

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=6,
        num_single_layers=12,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=64,
        pooled_projection_dim=32,
        axes_dims_rope=(8, 12, 12),
    ).eval()
    h = w = 32
    g = torch.Generator().manual_seed(seed + 1)
    latents = torch.randn(1, h * w, 16, generator=g)
    conditioning = {
        "encoder_hidden_states": torch.randn(1, 16, 64, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "img_ids": image_ids(h, w),
        "txt_ids": torch.zeros(16, 3),
    }
    return DemoModel(
        "Flux-shaped transformer", "toma-flux", transformer, latents, conditioning, (h, w), flow=True
    )


@torch.no_grad()
def sample(demo: DemoModel, steps: int) -> tuple[torch.Tensor, list[float]]:
    """Plain Euler sampling; returns the final latents and per-step wall times."""
    x = demo.latents.clone()
    times: list[float] = []
    ts = torch.linspace(1.0, 1.0 / steps, steps)
    for i, t in enumerate(ts):
        start = time.perf_counter()
        if demo.flow:
            v = demo.model(hidden_states=x, timestep=t.expand(x.shape[0]), **demo.conditioning).sample
            dt = t - (ts[i + 1] if i + 1 < steps else 0.0)
            x = x - dt * v
        else:
            timestep = (t * 999).round()
            eps = demo.model(x, timestep, **demo.conditioning).sample
            x = x - eps * (1.0 / steps)
        times.append(time.perf_counter() - start)
    return x, times


def to_image(latents: torch.Tensor, grid: tuple[int, int], lo: torch.Tensor, hi: torch.Tensor) -> np.ndarray:
    """First three latent channels of sample 0 as an RGB array, with a shared scale."""
    h, w = grid
    # Flux latents are (B, N, C) tokens, SDXL latents (B, C, H, W).
    image = latents[0, :, :3].T.reshape(3, h, w) if latents.dim() == 3 else latents[0, :3]
    image = ((image - lo[:, None, None]) / (hi - lo)[:, None, None]).clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)


def channel_range(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = latents[0, :, :3].T if latents.dim() == 3 else latents[0, :3].reshape(3, -1)
    flat = flat.reshape(3, -1)
    return flat.quantile(0.01, dim=1), flat.quantile(0.99, dim=1)


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
    output: Path, steps: int = 6, ratio: float = 0.5, console: Console | None = None
) -> dict[str, Any]:
    console = console or Console()
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    table = Table(title=f"ToMA, ratio {ratio}, {steps} steps, CPU ({torch.get_num_threads()} threads)")
    for column in (
        "model",
        "tokens (top level)",
        "step, unmodified",
        "step, ToMA",
        "speedup",
        "rel. difference",
    ):
        table.add_column(column)
    panels: list[tuple[str, list[tuple[str, np.ndarray]]]] = []
    results: dict[str, Any] = {"ratio": ratio, "steps": steps, "models": {}}
    for demo in (sdxl_demo_model(), flux_demo_model()):
        sample(demo, 1)  # warm-up
        base, base_times = sample(demo, steps)
        handle = apply(demo.model, demo.preset, ratio=ratio)
        try:
            sample(demo, 1)  # warm-up (plans, layouts)
            reduced, reduced_times = sample(demo, steps)
        finally:
            handle.remove()
        base_step = statistics.median(base_times)
        reduced_step = statistics.median(reduced_times)
        rel = float((reduced - base).norm() / base.norm())
        tokens = demo.grid[0] * demo.grid[1] // (4 if not demo.flow else 1)
        table.add_row(
            demo.name,
            str(tokens),
            f"{base_step * 1000:.1f} ms",
            f"{reduced_step * 1000:.1f} ms",
            f"{base_step / reduced_step:.2f}x",
            f"{rel:.3f}",
        )
        results["models"][demo.name] = {
            "preset": demo.preset,
            "step_ms_unmodified": base_step * 1000,
            "step_ms_toma": reduced_step * 1000,
            "speedup": base_step / reduced_step,
            "relative_difference": rel,
        }
        lo, hi = channel_range(base)
        a, b = to_image(base, demo.grid, lo, hi), to_image(reduced, demo.grid, lo, hi)
        diff = np.abs(a.astype(np.float32) - b.astype(np.float32)).max(axis=-1)
        gain = 255.0 / max(float(diff.max()), 1.0)
        diff_rgb = np.repeat((diff * gain).clip(0, 255).astype(np.uint8)[..., None], 3, axis=-1)
        panels.append(
            (demo.name, [("unmodified", a), (f"ToMA r={ratio}", b), (f"|difference| x{gain:.0f}", diff_rgb)])
        )
    console.print(table)
    png = output / "side_by_side.png"
    side_by_side(panels).save(png)
    (output / "demo.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    console.print(f"side-by-side (unmodified | ToMA | difference): {png}")
    console.print(f"results: {output / 'demo.json'}")
    return results
