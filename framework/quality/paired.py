"""A paired comparison of two configurations on the proxies: same images, same seeds, per image.

``python -m tokenreduce.quality.paired --base '{"features": "float32"}' --change '{"features": "model"}'
--dtype bf16 -o OUT.json``

For each proxy (default: the latent image proxies) and each schedule (the preset's, and merging at
every step, which shows differences the preset's schedule hides), the unmodified proxy, its default
ToMA preset with ``--base`` merged in (A) and with ``--change`` merged in (B) generate the demo's classes from the
same seeds, one image per call. Per image: PSNR, SSIM and feature similarity of A and of B against
the unmodified image, and their differences (B - A). Reported: the means, the mean paired differences
and their standard errors, PSNR between A and B (how far the change moves the images), and the
per-image scores.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenreduce.quality import metrics
from tokenreduce.quality.proxy.models import LATENT_IMAGE_KINDS, spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES: dict[str, dict[str, Any] | None] = {"preset": None, "always": {"name": "always"}}


def _images(pipe: Any, labels: list[int], seeds: list[int], steps: int) -> torch.Tensor:
    return torch.cat([pipe([label], [seed], steps=steps) for label, seed in zip(labels, seeds, strict=True)])


def compare(
    kinds: Sequence[str],
    change: dict[str, Any],
    base_change: dict[str, Any] | None = None,
    dtype: str = "fp32",
    steps: int = 20,
    num_seeds: int = 8,
    device: str = "cpu",
    schedules: Sequence[str] = tuple(SCHEDULES),
    log: Any = print,
    first_seed: int = 0,
) -> list[dict[str, Any]]:
    from tokenreduce.api import apply
    from tokenreduce.demo import DEMO_CLASSES
    from tokenreduce.quality.fidelity import config_for
    from tokenreduce.quality.proxy.features import load_features
    from tokenreduce.quality.proxy.models import load_proxy

    features = load_features(None, device)
    rows = []
    for kind in kinds:
        pipe = load_proxy(kind, None, device, DTYPES[dtype])
        # Each seed keeps its class whatever the range, so runs over split or shifted ranges pair up.
        seeds = list(range(first_seed, first_seed + num_seeds))
        labels = [pipe.class_names.index(DEMO_CLASSES[seed % len(DEMO_CLASSES)]) for seed in seeds]
        base = _images(pipe, labels, seeds, steps)
        base_embeddings = metrics.embed(features, metrics.frames(base).float())
        preset = f"toma-{spec(kind).arch}"
        for label, schedule in ((name, SCHEDULES[name]) for name in schedules):
            scheduled = {} if schedule is None else {"schedule": schedule}
            a = config_for(kind, preset, **scheduled, **(base_change or {}))
            b = config_for(kind, preset, **scheduled, **change)
            scores = {}
            out = {}
            for name, config in (("a", a), ("b", b)):
                with apply(pipe, config):
                    out[name] = _images(pipe, labels, seeds, steps)
                scores[name] = metrics.same_seed(features, out[name].float(), base.float(), base_embeddings)
            row = {
                "kind": kind,
                "preset": preset,
                "schedule": label,
                "base": base_change or {},
                "change": change,
                "dtype": dtype,
                "steps": steps,
                "seeds": num_seeds,
                "first_seed": first_seed,
                "psnr_a": float(scores["a"]["psnr"].mean()),
                "psnr_b": float(scores["b"]["psnr"].mean()),
                **_paired("paired_difference", scores["a"]["psnr"], scores["b"]["psnr"], "_db"),
                "psnr_a_vs_b": float(metrics.psnr_per_item(out["b"], out["a"]).mean()),
                "ssim_a": float(scores["a"]["ssim"].mean()),
                "ssim_b": float(scores["b"]["ssim"].mean()),
                **_paired("ssim_paired_difference", scores["a"]["ssim"], scores["b"]["ssim"]),
                "feature_similarity_a": float(scores["a"]["feature_similarity"].mean()),
                "feature_similarity_b": float(scores["b"]["feature_similarity"].mean()),
                **_paired(
                    "feature_similarity_paired_difference",
                    scores["a"]["feature_similarity"],
                    scores["b"]["feature_similarity"],
                ),
                # Per image, in seed order, so a later comparison can pair with these.
                **{
                    f"{metric}_{name}_per_image": [round(float(x), 6) for x in scores[name][metric]]
                    for name in ("a", "b")
                    for metric in ("psnr", "ssim", "feature_similarity")
                },
            }
            rows.append(row)
            log(
                f"{kind} ({dtype}), {label}: A {row['psnr_a']:.2f} dB, B {row['psnr_b']:.2f} dB, "
                f"B - A {row['paired_difference_db']:+.2f} +- {row['paired_difference_sem_db']:.2f} dB, "
                f"A vs B {row['psnr_a_vs_b']:.1f} dB; feature similarity A {row['feature_similarity_a']:.5f}, "
                f"B {row['feature_similarity_b']:.5f}, B - A {row['feature_similarity_paired_difference']:+.5f} "
                f"+- {row['feature_similarity_paired_difference_sem']:.5f}"
            )
    return rows


def _paired(name: str, a: torch.Tensor, b: torch.Tensor, unit: str = "") -> dict[str, float]:
    """Mean of ``b - a`` over the images and its standard error."""
    mean, sem = metrics.mean_and_sem(b - a)
    return {f"{name}{unit}": mean, f"{name}_sem{unit}": sem}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--base", default="{}", help="JSON merged into each preset to make A (default: the preset)"
    )
    p.add_argument("--change", required=True, help="JSON merged into each preset to make B")
    p.add_argument("--kinds", nargs="+", default=list(LATENT_IMAGE_KINDS))
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the proxies' dtype (default fp32)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=8, help="how many seeds (one image each)")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the first seed (default 0): a range apart from the one a choice was made on tests it fairly",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--schedules",
        nargs="+",
        choices=list(SCHEDULES),
        default=list(SCHEDULES),
        help="merge schedules compared",
    )
    p.add_argument("-o", "--output", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    rows = compare(
        args.kinds,
        json.loads(args.change),
        json.loads(args.base),
        args.dtype,
        args.steps,
        args.seeds,
        args.device,
        args.schedules,
        first_seed=args.first_seed,
    )
    if args.output:
        import datetime
        import shlex
        import sys

        from tokenreduce.generate import environment

        record = {
            "command": "python -m tokenreduce.quality.paired "
            + shlex.join(sys.argv[1:] if argv is None else argv),
            "date": datetime.date.today().isoformat(),
            "device": args.device,
            "env": environment(),
            "rows": rows,
        }
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
