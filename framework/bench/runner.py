"""``tokenreduce bench`` end to end: validate every variant, estimate, time each architecture and mode, write."""

from __future__ import annotations

import datetime
import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from tokenreduce import __version__, archs
from tokenreduce.archs import Architecture
from tokenreduce.bench import models, report, timing
from tokenreduce.bench.record import provenance
from tokenreduce.bench.variants import (
    DEFAULT_RATIOS,
    METHODS,
    Variant,
    VariantSet,
    check_against,
    default_variants,
)
from tokenreduce.generate import environment

MODES = ("eager", "graph", "compile")

# Reference H100 timings (build seconds, eager and graph milliseconds per denoiser call at the
# default batch and 1024x1024, as this harness measures them) come with each registered
# architecture (``Architecture.h100``). Merged variants are mostly faster, so estimates from them
# are upper bounds.
GRAPH_CAPTURE_S = 0.5  # per captured graph: synchronisation, cache flush, instantiation
APPLY_S = 0.05  # per eager execution: apply (validation included) and remove


@dataclass
class BenchSettings:
    archs: list[str] = field(default_factory=archs.bench_defaults)
    modes: list[str] | None = None  # default: eager and graph on CUDA, eager elsewhere
    ratios: list[float] = field(default_factory=lambda: list(DEFAULT_RATIOS))
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    configs: list[Path] = field(default_factory=list)
    rounds: int = 10
    warmup: int = 3
    capture_warmup: int = 3  # eager calls per decision before a CUDA graph capture
    compile_backend: str = "inductor"  # torch.compile backend of mode "compile"
    batch: int | None = None
    height: int | None = None
    width: int | None = None
    dtype: str | None = None
    device: str | None = None
    model: str | None = None  # real weights instead of random ones
    output: Path = Path("bench-results")
    seed: int = 0
    pipeline: bool = False
    steps: int = 30
    prompt: str = "a photograph of an astronaut riding a horse on the moon"


@dataclass
class ArchPlan:
    """Everything about one architecture decided before timing starts."""

    arch: str
    family: str
    batch: int
    height: int
    width: int
    dtype: str
    variants: VariantSet
    cycles: dict[str, int]
    distinct: dict[str, int]
    meta: torch.nn.Module | None = None


# --------------------------------------------------------------------------- planning


def resolve_device(settings: BenchSettings) -> str:
    return settings.device or ("cuda" if torch.cuda.is_available() else "cpu")


def resolve_modes(settings: BenchSettings, device: str) -> list[str]:
    cuda = torch.device(device).type == "cuda"
    modes = list(settings.modes or (["eager", "graph"] if cuda else ["eager"]))
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if "graph" in modes and not cuda:
        raise ValueError(f"mode 'graph' needs a CUDA device, got {device!r}")
    if settings.rounds < 1 or settings.warmup < 0:
        raise ValueError("--rounds must be >= 1 and --warmup >= 0")
    return modes


def dtype_name(settings: BenchSettings, spec: Architecture, device: str) -> str:
    if settings.dtype:
        return settings.dtype
    return spec.dtype if torch.device(device).type == "cuda" else "fp32"


def plan_arch(arch: str, settings: BenchSettings, device: str) -> ArchPlan:
    spec = models.spec(arch)
    variants = default_variants(spec.family, settings.ratios, settings.methods, settings.configs)
    meta = None
    if settings.model is None:
        meta = models.meta_model(arch)
        variants = check_against(meta, variants)
    cycles = {v.name: timing.cycle_of(v) for v in variants.variants}
    return ArchPlan(
        arch=arch,
        family=spec.family,
        batch=settings.batch or spec.batch,
        height=settings.height or spec.size,
        width=settings.width or spec.width or spec.size,
        dtype=dtype_name(settings, spec, device),
        variants=variants,
        cycles={name: len(c) for name, c in cycles.items()},
        distinct={name: len(set(c)) for name, c in cycles.items()},
        meta=meta,
    )


def estimate_seconds(plan: ArchPlan, modes: list[str], settings: BenchSettings) -> dict[str, float] | None:
    """Upper-bound seconds per mode on one H100 (``None`` for architectures without reference numbers)."""
    spec = models.spec(plan.arch)
    if spec.h100 is None:
        return None
    build_s, eager_call_ms, graph_call_ms = spec.h100
    # The step is GPU-bound at larger sizes: scale by work when it exceeds the reference.
    scale = max(1.0, plan.batch / spec.batch * plan.height * plan.width / spec.size**2)
    rounds = settings.rounds + settings.warmup
    primed = sum(c + 1 for c in plan.cycles.values())  # priming call + cycle
    eager_ms = eager_call_ms * scale
    out = {"build": build_s}
    if "eager" in modes:
        executions = (rounds + 1) * len(plan.cycles)  # + one cycle each for peak memory
        out["eager"] = (rounds + 1) * primed * eager_ms / 1e3 + executions * APPLY_S
    if "graph" in modes:
        graphs = sum(plan.distinct.values())
        capture = graphs * ((settings.capture_warmup + 1) * eager_ms / 1e3 + GRAPH_CAPTURE_S)
        replay = rounds * sum(plan.cycles.values()) * graph_call_ms * scale / 1e3
        out["graph"] = capture + replay
    return out


# --------------------------------------------------------------------------- running


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _run_record(
    plan: ArchPlan,
    mode: str,
    settings: BenchSettings,
    result: timing.Timings,
    memory: dict[str, float | None],
    tokens: int,
    device: str,
    unit: str = "step",
) -> dict[str, Any]:
    rows = []
    for variant in plan.variants.variants:
        row: dict[str, Any] = {
            "name": variant.name,
            "method": variant.method,
            "ratio": variant.ratio,
            "cycle_length": plan.cycles.get(variant.name),
            **report.stats(result.samples.get(variant.name, [])),
            "samples_ms": result.samples.get(variant.name, []),
            "peak_memory_gib": memory.get(variant.name),
            "error": result.errors.get(variant.name),
            "config": variant.config,
        }
        rows.append(row)
    report.add_speedups(rows)
    return {
        "arch": plan.arch,
        "mode": mode,
        "unit": unit,
        "device": device,
        "batch": plan.batch,
        "dtype": plan.dtype,
        "height": plan.height,
        "width": plan.width,
        "image_tokens": tokens,
        "rounds": settings.rounds,
        "warmup": settings.warmup,
        "weights": settings.model or "random",
        "variants": rows,
        "skipped": plan.variants.skipped,
        "notes": {
            **result.notes,
            **({"graph": report.GRAPH_NOTE} if mode == "graph" else {}),
            **({"compile_mode": report.COMPILE_NOTE} if mode == "compile" else {}),
        },
    }


def _print_plan(
    plans: list[ArchPlan], modes: list[str], settings: BenchSettings, device: str, console: Console
) -> None:
    table = Table(title="variants (validated)")
    for column in ("arch", "variant", "ratio", "calls per cycle"):
        table.add_column(column)
    for plan in plans:
        for v in plan.variants.variants:
            table.add_row(
                plan.arch, v.name, "-" if v.ratio is None else f"{v.ratio:g}", str(plan.cycles[v.name])
            )
    console.print(table)
    for plan in plans:
        for s in plan.variants.skipped:
            console.print(f"[yellow]skipped[/yellow] {plan.arch} {s['name']}: {s['reason'].splitlines()[0]}")
    estimates = {p.arch: estimate_seconds(p, modes, settings) for p in plans}
    known = {a: e for a, e in estimates.items() if e is not None}
    if known and torch.device(device).type == "cuda":
        total = sum(sum(e.values()) for e in known.values())
        parts = ", ".join(f"{a} {m} ~{s:.0f} s" for a, e in known.items() for m, s in e.items())
        console.print(f"estimated time on one H100 (upper bound): ~{total / 60:.1f} min ({parts})")
    else:
        console.print(f"no time estimate for {device} (reference numbers are for one H100)")


def run_bench(settings: BenchSettings, console: Console | None = None) -> dict[str, Any]:
    """Run the benchmark described by ``settings``; write the outputs and return the record."""
    console = console or Console()
    device = resolve_device(settings)
    if settings.pipeline:
        return run_pipeline_bench(settings, console, device)
    modes = resolve_modes(settings, device)
    if settings.model is not None and len(settings.archs) != 1:
        raise ValueError("--model gives the weights of one architecture: name exactly one --arch")
    # Every variant of every architecture is validated before anything is timed.
    plans = [plan_arch(arch, settings, device) for arch in settings.archs]
    _print_plan(plans, modes, settings, device, console)
    started = time.perf_counter()
    record: dict[str, Any] = {
        "tool": f"tokenreduce {__version__} bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": environment(),
        **provenance(),
        "runs": [],
        "notes": [
            report.EFFICIENCY_NOTE,
            report.STEP_NOTE,
            "eager: each round applies, primes (untimed) and times one cycle per variant",
        ],
    }
    if "graph" in modes:
        record["notes"].append(report.GRAPH_NOTE)
    for plan in plans:
        record["runs"] += _run_arch(plan, modes, settings, device, console)
    record["duration_s"] = round(time.perf_counter() - started, 2)
    return _write_and_show(record, settings, console)


def _write_and_show(record: dict[str, Any], settings: BenchSettings, console: Console) -> dict[str, Any]:
    paths = report.write(record, settings.output)
    for run in record["runs"]:
        console.print(report.table(run))
    console.print(f"results: {', '.join(str(p) for p in paths.values() if p is not None)}")
    if paths["plot"] is None:
        console.print(report.PLOT_SKIPPED, markup=False)
    return record


def _run_arch(
    plan: ArchPlan, modes: list[str], settings: BenchSettings, device: str, console: Console
) -> list[dict[str, Any]]:
    dtype = models.DTYPES[plan.dtype]
    with console.status(f"building {plan.arch} on {device} ({plan.dtype})"):
        if settings.model is not None:
            model = models.load_model(plan.arch, settings.model, device, dtype)
            plan.variants = check_against(model, plan.variants)
        else:
            model = models.build_model(plan.arch, device, dtype, settings.seed, meta=plan.meta)
            plan.meta = None
        call = models.make_inputs(
            plan.arch, model, plan.batch, plan.height, plan.width, dtype, device, settings.seed
        )
    variants = plan.variants.variants
    memory: dict[str, float | None] = {}
    runs = []
    for mode in modes:
        result = _time_mode(plan.arch, mode, model, call, variants, settings, device, console)
        if not memory:
            memory = _peak_memory(model, call, plan, result)
        runs.append(_run_record(plan, mode, settings, result, memory, call.tokens, device))
    del model, call
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return runs


def _time_mode(
    arch: str,
    mode: str,
    model: torch.nn.Module,
    call: models.DenoiserCall,
    variants: list[Variant],
    settings: BenchSettings,
    device: str,
    console: Console,
) -> timing.Timings:
    with _progress(console) as progress:
        task = progress.add_task(f"{arch} {mode}", total=(settings.rounds + settings.warmup) * len(variants))
        if mode == "eager":
            return timing.time_eager(
                model,
                call,
                variants,
                settings.rounds,
                settings.warmup,
                device,
                advance=lambda: progress.advance(task),
            )
        if mode == "compile":
            progress.update(task, total=settings.rounds * len(variants))
            return timing.time_compiled(
                model,
                call,
                variants,
                settings.rounds,
                settings.warmup,
                device,
                backend=settings.compile_backend,
                advance=lambda: progress.advance(task),
            )
        progress.update(task, description=f"{arch} {mode} (capturing {len(variants)} variants)")
        return timing.time_graphs(
            model,
            call,
            variants,
            settings.rounds,
            settings.warmup,
            settings.capture_warmup,
            advance=lambda: progress.advance(task),
            on_captured=lambda: progress.update(task, description=f"{arch} {mode} (replaying)"),
        )


def _peak_memory(
    model: torch.nn.Module, call: Any, plan: ArchPlan, result: timing.Timings
) -> dict[str, float | None]:
    memory: dict[str, float | None] = {}
    for variant in plan.variants.variants:
        if variant.name in result.errors:
            memory[variant.name] = None
            continue
        try:
            memory[variant.name] = timing.peak_memory(model, call, variant)
        except Exception:  # the timing error, if any, is already recorded
            memory[variant.name] = None
    return memory


# --------------------------------------------------------------------------- whole pipeline


def run_pipeline_bench(settings: BenchSettings, console: Console, device: str) -> dict[str, Any]:
    from tokenreduce.bench import pipeline as pipeline_timing

    if settings.model is None:
        raise ValueError("--pipeline needs --model (a diffusers pipeline folder or hub id)")
    if settings.rounds < 1 or settings.warmup < 0:
        raise ValueError("--rounds must be >= 1 and --warmup >= 0")
    family = pipeline_timing.family_of_pipeline_folder(settings.model)
    cuda = torch.device(device).type == "cuda"
    dtype = settings.dtype or (models.spec_of_family(family).dtype if cuda else "fp32")
    with console.status(f"loading {settings.model} ({dtype})"):
        pipe = pipeline_timing.load_pipeline(settings.model, device, models.DTYPES[dtype])
    record = time_pipeline_variants(pipe, settings, device, console, family, dtype)
    return _write_and_show(record, settings, console)


def time_pipeline_variants(
    pipe: Any, settings: BenchSettings, device: str, console: Console, family: str, dtype: str
) -> dict[str, Any]:
    """Validate the family's variants against ``pipe`` and time whole generations (no outputs written)."""
    from tokenreduce.bench import pipeline as pipeline_timing

    variants = check_against(
        pipeline_timing.denoiser_of(pipe),
        default_variants(family, settings.ratios, settings.methods, settings.configs),
    )
    kwargs: dict[str, Any] = {"prompt": settings.prompt, "num_inference_steps": settings.steps}
    if settings.height:
        kwargs["height"] = settings.height
    if settings.width:
        kwargs["width"] = settings.width
    plan = ArchPlan(
        arch=family,
        family=family,
        batch=1,
        height=settings.height or 0,
        width=settings.width or 0,
        dtype=dtype,
        variants=variants,
        cycles={v.name: settings.steps for v in variants.variants},
        distinct={},
    )
    total = (settings.rounds + settings.warmup) * len(variants.variants)
    with _progress(console) as progress:
        task = progress.add_task(f"{family} pipeline, {settings.steps} steps", total=total)
        result = pipeline_timing.time_pipeline(
            pipe,
            variants.variants,
            settings.rounds,
            settings.warmup,
            device,
            kwargs,
            settings.seed,
            advance=lambda: progress.advance(task),
        )
    run = _run_record(plan, "pipeline", settings, result, {}, 0, device, unit="generation")
    run["steps"] = settings.steps
    return {
        "tool": f"tokenreduce {__version__} bench",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": environment(),
        **provenance(),
        "model": settings.model,
        "runs": [run],
        "notes": [
            report.EFFICIENCY_NOTE,
            "pipeline: whole generations (text encoders, all steps, VAE decode)",
        ],
    }
