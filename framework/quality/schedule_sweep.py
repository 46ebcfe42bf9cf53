"""Merge schedule x ratio on the proxies, at batch 1: the evidence for the ToMA presets' schedules.

``python -m tokenreduce.quality.schedule_sweep [--steps 20] [--seeds 4] [--kinds sdxl flux]``

The demo's classes and seeds (image ``i``: class ``DEMO_CLASSES[i]``, seed ``i``), one image per
pipeline call with classifier-free guidance in one batch, each ToMA preset at each ratio under
each schedule. Per run: PSNR, SSIM and feature similarity against the unmodified proxy's images,
and the share of steps that merge. Prints a markdown table and writes JSON (``-o``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenreduce.api import apply
from tokenreduce.config import load_config
from tokenreduce.demo import DEMO_CLASSES
from tokenreduce.quality import metrics

#: (label, schedule); ``None``: the preset's own schedule. Every field is given: an override with
#: the preset's component name is merged into the preset's entry, so an omitted offset would be inherited.
SCHEDULES: tuple[tuple[str, dict[str, Any] | None], ...] = (
    ("preset", None),
    ("always", {"name": "always"}),
    ("every 2, offset 0", {"name": "every", "k": 2, "offset": 0}),
    ("every 3, offset 0", {"name": "every", "k": 3, "offset": 0}),
    ("every 3, offset 2", {"name": "every", "k": 3, "offset": 2}),
    ("every 4, offset 0", {"name": "every", "k": 4, "offset": 0}),
    ("every 4, offset 2", {"name": "every", "k": 4, "offset": 2}),
    ("skip first 25%", {"name": "window", "start": 0.25, "stop": 1.0}),
    ("skip first 50%", {"name": "window", "start": 0.5, "stop": 1.0}),
)


def generate(pipe: Any, labels: Sequence[int], seeds: Sequence[int], steps: int) -> torch.Tensor:
    """One image per call (batch 1), in order."""
    return torch.cat([pipe([label], [seed], steps=steps) for label, seed in zip(labels, seeds, strict=True)])


def sweep(
    kinds: Sequence[str],
    presets: dict[str, str],
    ratios: Sequence[float],
    steps: int,
    num_seeds: int,
    schedules: Sequence[tuple[str, dict[str, Any] | None]] = SCHEDULES,
    log: Any = print,
) -> list[dict[str, Any]]:
    from tokenreduce.quality.fidelity import config_for
    from tokenreduce.quality.proxy.features import load_features
    from tokenreduce.quality.proxy.models import load_proxy

    features = load_features()
    rows = []
    for kind in kinds:
        pipe = load_proxy(kind)
        names = [DEMO_CLASSES[i % len(DEMO_CLASSES)] for i in range(num_seeds)]
        labels = [pipe.class_names.index(n) for n in names]
        seeds = list(range(num_seeds))
        base = generate(pipe, labels, seeds, steps)
        base_embeddings = metrics.embed(features, base)
        for ratio in ratios:
            for label, schedule in schedules:
                update: dict[str, Any] = {"ratio": ratio}
                if schedule is not None:
                    update["schedule"] = schedule
                config = config_for(kind, presets[kind], **update)
                resolved = load_config(config)
                start = time.perf_counter()
                with apply(pipe, config) as handle:
                    images = generate(pipe, labels, seeds, steps)
                    merged = sum(handle.runtime.schedule.steps(steps, _linear(steps)))
                similarity = torch.nn.functional.cosine_similarity(
                    metrics.embed(features, images), base_embeddings, dim=-1
                )
                row = {
                    "kind": kind,
                    "preset": presets[kind],
                    "ratio": ratio,
                    "schedule": label,
                    "schedule_config": resolved.schedule.model_dump(),
                    "merged_steps": merged,
                    "steps": steps,
                    "psnr": float(metrics.psnr(images, base).mean()),
                    "ssim": float(metrics.ssim(images, base).mean()),
                    "feature_similarity": float(similarity.mean()),
                    "seconds": round(time.perf_counter() - start, 2),
                }
                rows.append(row)
                log(markdown_row(row))
    return rows


def _linear(steps: int) -> list[float]:
    return [1 - i / steps for i in range(steps)]


def markdown_row(r: dict[str, Any]) -> str:
    return (
        f"| {r['kind']} | {r['ratio']:g} | {r['schedule']} | {r['merged_steps']}/{r['steps']} | "
        f"{r['psnr']:.1f} | {r['ssim']:.3f} | {r['feature_similarity']:.4f} |"
    )


HEADER = (
    "| proxy | ratio | schedule | merged steps | PSNR (dB) | SSIM | feature sim. |\n"
    "|---|---:|---|---:|---:|---:|---:|"
)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", nargs="+", default=["sdxl", "flux"])
    p.add_argument("--sdxl-preset", default="toma-sdxl")
    p.add_argument("--flux-preset", default="toma-flux")
    p.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.25])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=4, help="images: seeds 0..N-1 (default 4)")
    p.add_argument("--schedules", nargs="+", default=None, help="labels of SCHEDULES to run (default: all)")
    p.add_argument("-o", "--output", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    chosen = [s for s in SCHEDULES if args.schedules is None or s[0] in args.schedules]
    print(HEADER, flush=True)
    rows = sweep(
        args.kinds,
        {"sdxl": args.sdxl_preset, "flux": args.flux_preset},
        args.ratios,
        args.steps,
        args.seeds,
        chosen,
        log=lambda line: print(line, flush=True),
    )
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
