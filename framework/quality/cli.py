"""The ``tokenreduce eval`` sub-command: the paper's protocol on real weights, or the proxy benchmark."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from rich.console import Console

from tokenreduce.generate import DTYPES
from tokenreduce.quality.protocol import (
    DEFAULT_CLIP,
    DEFAULT_DINO,
    DEFAULT_OUTPUT,
    FID_FEATURES,
)
from tokenreduce.quality.proxy.models import KINDS, LATENT_IMAGE_KINDS


def add_eval_parser(subparsers: Any, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "eval",
        help="image quality of token reduction: the paper's protocol on real weights, or the proxy benchmark",
        description=(
            "--model: generate every prompt and seed with the unmodified model and with each config, then "
            "measure CLIP-T (image vs prompt), DINO (similarity to the unmodified model's image) and FID "
            "(against --reference). Images are kept under OUTPUT/images and a rerun makes only the missing "
            "ones; `accelerate launch -m tokenreduce.cli eval --model ...` spreads the images over GPUs. "
            "--proxy: the proxy fidelity benchmark."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--model", metavar="ID_OR_PATH", help="real weights: a hub id or a local diffusers pipeline folder"
    )
    source.add_argument("--proxy", action="store_true", help="the proxy fidelity benchmark instead")
    p.add_argument(
        "-o", "--output", default=None, help=f"output folder (default with --model: {DEFAULT_OUTPUT})"
    )

    c = p.add_argument_group("generation (both)")
    c.add_argument(
        "--ratios",
        nargs="+",
        type=float,
        default=None,
        metavar="R",
        help="run every config at each of these ratios instead of its own (runs named CONFIG@R); "
        "--proxy: the method ratios (default 0.25 0.5 0.75)",
    )
    seeds = c.add_mutually_exclusive_group()
    seeds.add_argument(
        "--num-seeds",
        type=int,
        default=None,
        metavar="N",
        help="images per prompt (--model, default 1) or per class (--proxy, default 32), seeds 0..N-1",
    )
    seeds.add_argument(
        "--seeds", type=int, nargs="+", default=None, metavar="SEED", help="these seeds instead"
    )
    c.add_argument(
        "--steps", type=int, default=None, help="denoising steps (default: the pipeline's; --proxy: 30)"
    )
    c.add_argument("--guidance-scale", type=float, default=None, help="default: the pipeline's (--proxy: 3)")
    c.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="--model: images per pipeline call (default 1)",
    )

    g = p.add_argument_group("real weights (--model)")
    g.add_argument(
        "--prompts",
        metavar="FILE",
        help="text file, one prompt (or class name) a line; blank lines and lines starting with # are skipped",
    )
    g.add_argument(
        "--prompt-template",
        default="{}",
        metavar="TEXT",
        help='each line is put where {} is, e.g. "a photo of a {}" for class names (default: "{}")',
    )
    g.add_argument(
        "--configs",
        nargs="+",
        default=None,
        metavar="CONFIG",
        help=(
            "config files or presets, one run each (default: toma); the unmodified model always runs, as "
            "baseline; with --proxy: only these (on every --kinds proxy they fit, at --ratios if given) "
            "instead of the methods and knobs"
        ),
    )
    g.add_argument("--height", type=int, default=None, help="pixels (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="pixels (default: the pipeline's)")
    g.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="default: fp16 for UNet pipelines, bf16 for transformer pipelines (fp32 on a CPU)",
    )
    g.add_argument(
        "--reference",
        metavar="DIR",
        default=None,
        help="folder of reference images for FID (without: no FID)",
    )
    g.add_argument(
        "--clip-model",
        default=DEFAULT_CLIP,
        metavar="ID_OR_PATH",
        help=f"CLIP-T model (default {DEFAULT_CLIP})",
    )
    g.add_argument(
        "--dino-model",
        default=DEFAULT_DINO,
        metavar="ID_OR_PATH",
        help=f"DINO model (default {DEFAULT_DINO})",
    )
    g.add_argument(
        "--fid-features",
        choices=list(FID_FEATURES),
        default="inception",
        help="inception: torchmetrics' Inception-v3 (needs torch-fidelity); dino: the DINO model's CLS "
        "features (default inception)",
    )
    g.add_argument(
        "--inception-weights",
        metavar="FILE",
        default=None,
        help="local Inception-v3 weights for FID (default: torch-fidelity downloads them)",
    )
    g.add_argument("--limit", type=int, default=None, metavar="N", help="only the first N prompts")

    x = p.add_argument_group("proxy benchmark (--proxy)")
    x.add_argument(
        "--kinds",
        nargs="+",
        choices=[*KINDS, *LATENT_IMAGE_KINDS],
        default=None,
        help="proxies (default: sdxl flux, the pixel-space ones; with --latent: sdxl-latent flux-latent)",
    )
    x.add_argument(
        "--latent",
        action="store_true",
        help="the latent proxies (autoencoder + latent denoisers) instead of the pixel-space ones",
    )
    x.add_argument(
        "--proxy-weights", metavar="DIR", default=None, help="weights folder (default: the committed proxies)"
    )
    x.add_argument(
        "--batches",
        nargs="+",
        type=int,
        default=None,
        metavar="B",
        help="images per pipeline call, each scored on its own, in this order (default: 1 64)",
    )
    x.add_argument("--no-knobs", action="store_true", help="only the methods, not ToMA's knobs one at a time")
    x.add_argument(
        "--reference-crops", type=int, default=2048, help="held-out crops for the Frechet distance"
    )
    x.add_argument(
        "--speed",
        metavar="FILE",
        default=None,
        help="`tokenreduce bench` JSON for the speed-vs-fidelity plot",
    )
    x.add_argument("--speed-mode", choices=["graph", "eager"], default="graph", help="bench mode to plot")
    x.add_argument("--device", default=None, help="default: cuda if available")
    p.set_defaults(func=func)
    return p


def run_eval_command(args: argparse.Namespace, console: Console) -> int:
    if args.proxy:
        from tokenreduce.quality.fidelity import run_proxy_eval

        return run_proxy_eval(args, console)
    from tokenreduce.quality.protocol import run_model_eval

    return run_model_eval(args, console)
