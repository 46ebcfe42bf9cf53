"""The ``tokenreduce`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


# --------------------------------------------------------------------------- plugins / schema / validate


def cmd_plugins(args: argparse.Namespace) -> int:
    from tokenreduce.manager import get_registry

    registry = get_registry()
    if args.markdown:
        from tokenreduce.reference import markdown_reference

        print(markdown_reference(registry), end="")
        return 0
    table = Table(title="tokenreduce components")
    for column in ("name", "kind", "source"):
        table.add_column(column)
    for kind, name, entry in registry.entries():
        table.add_row(name, kind, entry.source)
    console.print(table)
    presets = Table(title="presets")
    for column in ("name", "source", "description"):
        presets.add_column(column)
    for name, preset in sorted(registry.presets.items()):
        presets.add_row(name, preset.source, preset.description)
    console.print(presets)
    for plugin, error in registry.failed.items():
        err_console.print(f"[red]failed to load[/red] {plugin}: {error}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from tokenreduce.config import json_schema

    text = json.dumps(json_schema(), indent=2)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
    else:
        print(text)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from tokenreduce.explain import check_on_architecture

    checked = check_on_architecture(
        args.config, arch=args.arch, height=args.height, width=args.width, frames=args.frames
    )
    console.print(
        f"[green]valid[/green]: {args.config} (on {checked.arch} at {args.height}x{args.width}: "
        f"{len(checked.sites)} merged sites)"
    )
    console.print_json(json.dumps(checked.config.model_dump(mode="json")))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from tokenreduce.explain import explain

    explain(
        args.config,
        arch=args.arch,
        height=args.height,
        width=args.width,
        frames=args.frames,
        steps=args.steps,
        console=console,
    )
    return 0


# --------------------------------------------------------------------------- demo / generate / bench


def cmd_demo(args: argparse.Namespace) -> int:
    from tokenreduce.demo import run_demo

    run_demo(
        output=Path(args.output),
        steps=args.steps,
        ratio=args.ratio,
        console=console,
        latent=not args.pixel,
        weights=Path(args.weights) if args.weights else None,
    )
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from tokenreduce.generate import generate

    generate(
        model=args.model,
        config=args.config,
        prompt=args.prompt,
        steps=args.steps,
        seed=args.seed,
        height=args.height,
        width=args.width,
        device=args.device,
        dtype=args.dtype,
        output=Path(args.output),
        baseline=args.baseline,
        console=console,
    )
    return 0


def cmd_train_proxies(args: argparse.Namespace) -> int:
    from tokenreduce.quality.proxy.models import LATENT_KINDS
    from tokenreduce.quality.proxy.train import DEFAULT_PARTS, train_proxies

    parts = tuple(args.parts or ())
    if args.latent:
        parts += tuple(p for p in ("ae", *LATENT_KINDS) if p not in parts)
    parts = parts or DEFAULT_PARTS
    command = f"tokenreduce train-proxies --parts {' '.join(parts)} --seed {args.seed}"
    for flag, value in (("--steps", args.steps), ("--batch", args.batch)):
        command += f" {flag} {value}" if value is not None else ""
    record = train_proxies(
        Path(args.output),
        parts=parts,
        command=command,
        steps=args.steps,
        feature_steps=args.feature_steps,
        batch=args.batch,
        seed=args.seed,
        device=args.device,
        console=console,
    )
    console.print_json(json.dumps({k: v for k, v in record.items() if k != "env"}))
    console.print(f"weights and record.json -> {args.output}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from tokenreduce.bench.cli import run_bench_command

    return run_bench_command(args, console)


def cmd_eval(args: argparse.Namespace) -> int:
    from tokenreduce.quality.cli import run_eval_command

    return run_eval_command(args, console)


# --------------------------------------------------------------------------- parser


def add_architecture_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--arch",
        help="a registered architecture (default: the first one the config's adapter registers)",
    )
    p.add_argument("--height", type=int, default=1024, help="image height in pixels (default 1024)")
    p.add_argument("--width", type=int, default=1024, help="image width in pixels (default 1024)")
    p.add_argument(
        "--frames", type=int, default=None, help="video frames in pixels (video models; default 81)"
    )


# Mirrors tokenreduce.quality.proxy.train.PARTS (not imported: the parser stays light).
PROXY_PARTS = ("features", "sdxl", "flux", "ae", "sdxl-latent", "flux-latent", "wan-latent")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenreduce", description="Token reduction for diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("plugins", help="list registered components and presets with their source")
    p.add_argument("--markdown", action="store_true", help="print a parameter reference in markdown instead")
    p.set_defaults(func=cmd_plugins)

    p = sub.add_parser("schema", help="print the JSON schema of config files")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser(
        "validate", help="check a config file or preset on its architecture (every check `explain` runs)"
    )
    p.add_argument("config", help="config file (.yaml/.toml/.json) or preset name")
    add_architecture_arguments(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("explain", help="show what a config merges where, with token counts per level")
    p.add_argument("config", help="config file or preset name")
    add_architecture_arguments(p)
    p.add_argument("--steps", type=int, default=20, help="denoising steps, to show which merge (default 20)")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser(
        "demo", help="ToMA on the embedded proxy models: timing, fidelity and a side-by-side PNG"
    )
    p.add_argument(
        "-o", "--output", default="tokenreduce-demo", help="output folder (default tokenreduce-demo)"
    )
    p.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    p.add_argument("--ratio", type=float, default=None, help="merge ratio (default: each preset's)")
    space = p.add_mutually_exclusive_group()
    space.add_argument(
        "--latent",
        dest="pixel",
        action="store_false",
        help="the latent proxies: an autoencoder and latent denoisers, decoded 128x128 images (default)",
    )
    space.add_argument(
        "--pixel",
        action="store_true",
        help="the pixel-space proxies instead (64x64 images, no decoder; merge errors show unfiltered)",
    )
    p.add_argument("--weights", default=None, help="proxy weights folder (default: the committed ones)")
    p.set_defaults(func=cmd_demo, pixel=False)

    p = sub.add_parser("generate", help="generate an image with a diffusers pipeline and a config")
    p.add_argument("--model", required=True, help="model id (hub cache) or local pipeline folder")
    p.add_argument(
        "--config",
        default=None,
        help="config file or preset (default: the model's own, toma-sdxl for SDXL, toma-flux for Flux)",
    )
    p.add_argument("--prompt", default="a photograph of an astronaut riding a horse")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda if available)")
    p.add_argument(
        "--dtype", choices=["fp32", "fp16", "bf16"], default=None, help="default: fp16/bf16 on GPU"
    )
    p.add_argument("-o", "--output", default="tokenreduce-out", help="output folder")
    p.add_argument("--baseline", action="store_true", help="also generate without token reduction")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "train-proxies",
        help="train the SDXL-shaped and Flux-shaped proxy models and their feature extractor, "
        "or the latent proxies and their autoencoder (GPU: minutes)",
    )
    p.add_argument("-o", "--output", required=True, help="folder for the weights and record.json")
    p.add_argument(
        "--parts",
        nargs="+",
        choices=list(PROXY_PARTS),
        default=None,
        help="what to train (default: features sdxl flux); latent proxies learn on the autoencoder "
        "`ae` in the output folder (train it first or in the same run)",
    )
    p.add_argument(
        "--latent",
        action="store_true",
        help="train the autoencoder and the latent proxies (ae sdxl-latent flux-latent wan-latent), "
        "after the --parts given, if any",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimiser steps per part (default: 1500 per pixel proxy, 3000 per latent part)",
    )
    p.add_argument("--feature-steps", type=int, default=1500, help="feature extractor steps (default 1500)")
    p.add_argument(
        "--batch",
        type=int,
        default=None,
        help="crops per step (default 128; the autoencoder and wan-latent: 32)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda if available")
    p.set_defaults(func=cmd_train_proxies)

    try:
        from tokenreduce.bench.cli import add_bench_parser
    except ModuleNotFoundError:  # pragma: no cover - bench is optional at import time
        pass
    else:
        add_bench_parser(sub, cmd_bench)
    try:
        from tokenreduce.quality.cli import add_eval_parser
    except ModuleNotFoundError:  # pragma: no cover - eval is optional at import time
        pass
    else:
        add_eval_parser(sub, cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from tokenreduce.api import UnsupportedModelError
    from tokenreduce.config import ConfigError
    from tokenreduce.registry import UnknownComponentError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, UnsupportedModelError, UnknownComponentError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
