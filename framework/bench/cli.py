"""The ``tokenreduce bench`` sub-command."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from tokenreduce.archs import bench_defaults
from tokenreduce.bench.models import DTYPES, arch_names
from tokenreduce.bench.runner import MODES, BenchSettings, run_bench
from tokenreduce.bench.variants import DEFAULT_RATIOS, METHODS


def add_bench_parser(subparsers: Any, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "bench",
        help="denoiser-step latency of ToMA, the baselines, the ideal merge and the unmodified model, interleaved",
        description=(
            "Times one denoiser step of every variant on the same model, interleaved round by round, in eager "
            "mode and replayed from CUDA graphs; writes bench.json, bench.md and bench.png. Random weights by "
            "default (speed does not depend on them). Exit code 1 if a variant failed (outputs are still written)."
        ),
    )
    defaults = bench_defaults()
    p.add_argument(
        "--arch",
        nargs="+",
        choices=arch_names(),
        default=None,
        help=f"architectures registered by the adapter plugins (default: {' '.join(defaults)}; with --ops: "
        "every family's architecture of record)",
    )
    p.add_argument(
        "--components",
        action="store_true",
        help="instead: GPU time of each part of ToMA's merge (selection, weights, merge, unmerge) at real shapes",
    )
    p.add_argument(
        "--ops",
        action="store_true",
        help=(
            "instead: count the kernels each merged block adds per step kind for every preset and the ideal, "
            "on the real architectures on the meta device (CPU only, no timing); writes ops.json and ops.md"
        ),
    )
    p.add_argument(
        "--modes",
        nargs="+",
        choices=list(MODES),
        default=None,
        help="default: eager graph on CUDA, eager on a CPU; compile: torch.compile of each variant, timed one "
        "variant after another (compilation untimed)",
    )
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of --modes compile (default inductor)",
    )
    p.add_argument(
        "--ratios", nargs="+", type=float, default=list(DEFAULT_RATIOS), help="default: 0.25 0.5 0.75"
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        help="subset of the default variants (the unmodified model is always timed); with --generation: "
        "toma (the default and -fast presets) and ideal",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=[],
        metavar="FILE",
        help="extra config files, each a variant; with --compose: the ToMA variants composed, instead of "
        "the family's default preset",
    )
    p.add_argument("--rounds", type=int, default=10, help="timed rounds (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="default: the architecture's (2 where guidance runs in one call)",
    )
    p.add_argument("--height", type=int, default=None, help="pixels (default 1024)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 1024)")
    p.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="default: the architecture's on CUDA, fp32 on a CPU",
    )
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.add_argument(
        "--model", default=None, metavar="ID_OR_PATH", help="real weights (model id or local folder)"
    )
    p.add_argument("-o", "--output", default="bench-results", help="output folder (default bench-results)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument(
        "--pipeline",
        action="store_true",
        help="time whole generations (text encoders, all steps, VAE) of the --model pipeline instead",
    )
    p.add_argument(
        "--generation",
        action="store_true",
        help=(
            "time whole generations of each --arch instead (random weights: every denoising step with the "
            "family's scheduler and guidance, then the VAE decode; text encoding excluded): unmodified, the "
            "default preset, its -fast preset, the ideal at the same ratio"
        ),
    )
    p.add_argument(
        "--compose",
        nargs="+",
        choices=["cache", "compile"],
        default=[],
        help="with --generation: the default preset combined with a diffusers cache (Pyramid Attention "
        "Broadcast) and/or torch.compile, next to each alone",
    )
    p.add_argument(
        "--compile-mode",
        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
        default="default",
        help="with --compose compile: torch.compile's mode (reduce-overhead and max-autotune replay CUDA "
        "graphs; default: %(default)s)",
    )
    p.add_argument(
        "--predict-from",
        default=None,
        metavar="BENCH_JSON",
        help="with --generation: a per-step bench.json; prints the end-to-end speedup it predicts next to "
        "the measured one",
    )
    p.add_argument(
        "--steps", type=int, default=30, help="denoising steps per generation with --pipeline or --generation"
    )
    p.add_argument("--prompt", default=BenchSettings.prompt, help="prompt with --pipeline")
    p.set_defaults(func=func)
    return p


def settings_from_args(args: argparse.Namespace) -> BenchSettings:
    return BenchSettings(
        archs=list(args.arch or bench_defaults()),
        modes=None if args.modes is None else list(args.modes),
        ratios=list(args.ratios),
        methods=list(args.methods),
        configs=[Path(c) for c in args.configs],
        rounds=args.rounds,
        warmup=args.warmup,
        batch=args.batch,
        height=args.height,
        width=args.width,
        dtype=args.dtype,
        device=args.device,
        model=args.model,
        output=Path(args.output),
        seed=args.seed,
        pipeline=args.pipeline,
        steps=args.steps,
        prompt=args.prompt,
        compile_backend=args.compile_backend,
    )


def check_generation_options(args: argparse.Namespace) -> None:
    """Options of whole-generation timing refused where they would be ignored."""
    given = [
        flag for flag, value in (("--compose", args.compose), ("--predict-from", args.predict_from)) if value
    ]
    if given and not args.generation:
        raise ValueError(f"without --generation, {' and '.join(given)} would be ignored: add --generation")
    if args.compile_mode != "default" and "compile" not in args.compose:
        raise ValueError(f"--compile-mode {args.compile_mode} needs --compose compile")


def run_bench_command(args: argparse.Namespace, console: Console) -> int:
    check_generation_options(args)
    if args.ops:
        from tokenreduce.bench.ops import run_ops

        run_ops(args.arch, Path(args.output), console)
        return 0
    if args.components:
        from tokenreduce.bench.components import run_components

        run_components(Path(args.output), console)
        return 0
    if args.generation:
        from tokenreduce.bench.generation import GenerationSettings, run_generation_bench

        record = run_generation_bench(
            GenerationSettings(
                archs=list(args.arch or bench_defaults()),
                steps=args.steps,
                rounds=args.rounds,
                warmup=args.warmup,
                device=args.device,
                dtype=args.dtype,
                seed=args.seed,
                height=args.height,
                width=args.width,
                configs=[Path(c) for c in args.configs],
                compose=list(args.compose),
                compile_mode=None if args.compile_mode == "default" else args.compile_mode,
                methods=list(args.methods),
                predict_from=args.predict_from,
                output=Path(args.output),
            ),
            console,
        )
    else:
        record = run_bench(settings_from_args(args), console)
    failed = [
        f"{run['arch']} {run['mode']} {v['name']}"
        for run in record["runs"]
        for v in run["variants"]
        if v["error"]
    ]
    for name in failed:
        console.print(f"[red]failed[/red]: {name}")
    return 1 if failed else 0
