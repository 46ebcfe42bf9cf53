"""Whole-generation timing on random-weight models: every denoising step and the VAE decode.

``tokenreduce bench --generation --steps N`` builds the denoiser of each ``--arch`` from its
published config (random weights, as the per-step benchmark does), the family's real diffusers
scheduler and a random-weight VAE from the published VAE config, and times a full generation:
``set_timesteps``, ``N`` steps with classifier-free guidance as the family's pipeline does it,
``scheduler.step``, then the VAE decode. Every variant is applied with ``tokenreduce.apply`` to a
pipeline-shaped object (denoiser + scheduler), so the step clock, the reuse policy and the merge
schedule run exactly as inside a diffusers pipeline. Text encoding is excluded: it runs once per
generation and is the same for every variant.

What a family's generation looks like (scheduler, guidance, latents, VAE) is model knowledge: the
adapter plugins register a :class:`GenerationRecipe` per adapter family with :func:`register`.
"""

from __future__ import annotations

import datetime
import itertools
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypedDict

import torch
from rich.console import Console
from torch import nn

from tokenreduce import __version__
from tokenreduce.api import TokenReduceHandle, apply
from tokenreduce.bench import models, report
from tokenreduce.bench.record import provenance
from tokenreduce.bench.timing import Stopwatch, Timings, describe_error
from tokenreduce.bench.variants import (
    Variant,
    VariantSet,
    _validated,
    check_against,
    ideal_of,
    toma_preset,
)
from tokenreduce.config import ConfigError, load_config
from tokenreduce.generate import environment
from tokenreduce.manager import get_registry

TEXT_NOTE = (
    "generation: set_timesteps, every denoising step with the family's classifier-free guidance and "
    "scheduler.step, then the VAE decode; text encoding is excluded (it runs once per generation and is "
    "the same for every variant): the conditioning is random tensors of the text encoders' shapes"
)
INTERLEAVE_NOTE = (
    "variants run interleaved round by round on one model instance (apply, one generation, remove); "
    "the configs are applied to a pipeline-shaped object, so its scheduler drives the step clock, the "
    "reuse policy and the merge schedule as in a diffusers pipeline"
)


# --------------------------------------------------------------------------- recipes


class GenerationRecipe:
    """How one adapter family's pipeline runs a generation (subclassed by the adapter plugins).

    ``call`` is the bench's :class:`~tokenreduce.bench.models.DenoiserCall` for the architecture:
    random conditioning of the pipeline's shapes, and a latent whose shape the recipe reads.
    """

    #: Denoiser calls per step: 1 (guidance in one batch, or embedded), 2 (conditional and
    #: unconditional passes apart).
    guidance_passes: int = 1

    def scheduler(self, arch: str, height: int, width: int) -> Any:
        """The family's diffusers scheduler with the published scheduler config."""
        raise NotImplementedError

    def set_timesteps(self, scheduler: Any, steps: int, latents: torch.Tensor, device: Any) -> torch.Tensor:
        """Call ``scheduler.set_timesteps`` as the pipeline does; the latents scaled as it scales them then."""
        scheduler.set_timesteps(steps, device=device)
        return latents

    def initial_latents(self, call: models.DenoiserCall, generator: torch.Generator) -> torch.Tensor:
        """Noise of one generation's latent (batch 1), in the form the scheduler steps."""
        raise NotImplementedError

    def predict(
        self,
        forward: Callable[..., Any],
        call: models.DenoiserCall,
        latents: torch.Tensor,
        t: torch.Tensor,
        scheduler: Any,
        context: Callable[[str], Any],
    ) -> torch.Tensor:
        """The guided model output of one step (``context(name)`` wraps each pass as the pipeline's
        ``cache_context`` does)."""
        raise NotImplementedError

    def vae(self, arch: str) -> nn.Module | None:
        """The VAE of ``arch`` built on the meta device from its published config; ``None`` if unknown."""
        return None

    def decode(self, vae: nn.Module, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        raise NotImplementedError


RECIPES: dict[str, GenerationRecipe] = {}


def register(family: str, recipe: GenerationRecipe) -> None:
    """Add the generation recipe of an adapter family (called from a plugin's ``tokenreduce_register``)."""
    RECIPES[family] = recipe


def recipe_of(family: str) -> GenerationRecipe:
    get_registry()  # loads the plugins, which register their recipes
    if family not in RECIPES:
        known = ", ".join(sorted(RECIPES)) or "(none)"
        raise ValueError(f"no generation recipe for the {family!r} family; families with one: {known}")
    return RECIPES[family]


# --------------------------------------------------------------------------- the pipeline-shaped object


class BenchPipeline:
    """Denoiser + scheduler, the shape ``tokenreduce.apply`` looks for in a pipeline.

    ``forward`` is what the loop calls (the denoiser, or the compiled denoiser); ``current_timestep``
    is what diffusers' cache hooks read, as a pipeline's ``current_timestep`` property.
    """

    def __init__(self, family: str, denoiser: nn.Module, scheduler: Any) -> None:
        attr = "unet" if _is_unet(denoiser) else "transformer"
        setattr(self, attr, denoiser)
        self.denoiser, self.scheduler, self.family = denoiser, scheduler, family
        self.forward: Callable[..., Any] = denoiser
        self.current_timestep: Any = None

    # A pipeline call's boundaries, which ``tokenreduce.apply`` hooks as it hooks a pipeline's.
    def progress_bar(self, total: int | None = None) -> Any:
        """Entered around the denoising loop, as diffusers pipelines do (no bar is shown)."""
        return nullcontext()

    def maybe_free_model_hooks(self) -> None:
        """Called at the end of a generation, as diffusers pipelines do."""


def _is_unet(model: nn.Module) -> bool:
    return type(model).__name__.startswith("UNet")


@dataclass
class Generation:
    """One architecture, ready to generate: model, VAE, scheduler, inputs."""

    arch: str
    family: str
    pipe: BenchPipeline
    recipe: GenerationRecipe
    call: models.DenoiserCall
    vae: nn.Module | None
    vae_note: str
    steps: int
    height: int
    width: int
    dtype: str
    seed: int = 0
    size: dict[str, int] = field(default_factory=dict)  # further sizes ``handle.prepare`` takes (frames)
    latents: torch.Tensor = field(init=False)
    # The end of every denoising step of the last generation, after the start of the first (read them
    # with ``step_ms`` once the generation is synchronised).
    marks: list[Any] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        generator = torch.Generator(device=_device_of(self.pipe.denoiser)).manual_seed(self.seed)
        self.latents = self.recipe.initial_latents(self.call, generator)

    def context(self, name: str) -> Any:
        cache_context = getattr(self.pipe.denoiser, "cache_context", None)
        return cache_context(name) if cache_context is not None else nullcontext()

    @torch.no_grad()
    def __call__(self) -> torch.Tensor:
        """One generation from the same noise; the decoded image or video (the latent without a VAE)."""
        pipe, recipe = self.pipe, self.recipe
        latents = recipe.set_timesteps(pipe.scheduler, self.steps, self.latents.clone(), self.latents.device)
        self.marks = [self._mark()]
        with pipe.progress_bar(total=self.steps):
            for t in pipe.scheduler.timesteps:
                pipe.current_timestep = t
                pred = recipe.predict(pipe.forward, self.call, latents, t, pipe.scheduler, self.context)
                latents = pipe.scheduler.step(pred, t, latents, return_dict=False)[0]
                self.marks.append(self._mark())
        pipe.current_timestep = None
        out = latents if self.vae is None else recipe.decode(self.vae, latents, self.height, self.width)
        pipe.maybe_free_model_hooks()
        return out

    def _mark(self) -> Any:
        if self.latents.device.type != "cuda":
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def step_ms(self) -> list[float]:
        """Milliseconds of each denoising step of the last generation (call after synchronising)."""
        pairs = itertools.pairwise(self.marks)
        if self.latents.device.type != "cuda":
            return [(b - a) * 1e3 for a, b in pairs]
        return [a.elapsed_time(b) for a, b in pairs]


def _batch_of(call: models.DenoiserCall) -> int:
    return int(next(v for v in call.kwargs.values() if isinstance(v, torch.Tensor)).shape[0])


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def build_generation(
    arch: str,
    steps: int,
    device: str,
    dtype: str,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    meta: nn.Module | None = None,
) -> Generation:
    """The denoiser and VAE of ``arch`` with random weights on ``device``, its scheduler and inputs."""
    spec = models.spec(arch)
    recipe = recipe_of(spec.family)
    height = height or spec.size
    width = width or getattr(spec, "width", None) or spec.size
    torch_dtype = models.DTYPES[dtype]
    model = models.build_model(arch, device, torch_dtype, seed, meta=meta)
    batch = spec.batch
    call = models.make_inputs(arch, model, batch, height, width, torch_dtype, device, seed)
    vae = recipe.vae(arch)
    if vae is None:
        note = f"no published VAE config for {arch}: the VAE decode is not timed"
    else:
        vae = _materialise(vae, device, _vae_dtype(vae, torch_dtype), seed + 1)
        source = "a small one of the published shape" if arch.startswith("tiny-") else "the published config"
        note = f"{type(vae).__name__} from {source}, random weights, decode timed"
    pipe = BenchPipeline(spec.family, model, recipe.scheduler(arch, height, width))
    frames = getattr(spec, "frames", None)
    size = {"frames": frames} if frames else {}
    return Generation(
        arch, spec.family, pipe, recipe, call, vae, note, steps, height, width, dtype, seed, size
    )


def _vae_dtype(vae: nn.Module, dtype: torch.dtype) -> torch.dtype:
    # The pipelines decode in fp32 where the VAE's config asks for it in fp16 (SDXL's force_upcast).
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        return torch.float32
    return dtype


def _materialise(module: nn.Module, device: str, dtype: torch.dtype, seed: int) -> nn.Module:
    buffers = [name for name, _ in module.named_buffers()]
    if buffers:  # to_empty would leave them uninitialised
        raise ValueError(
            f"{type(module).__name__} has buffers {buffers[:3]}: cannot build it with random weights"
        )
    module = nn.Module.to(module, dtype=dtype).to_empty(device=device)
    models.init_weights_(module, seed)
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------- variants


def generation_variants(family: str, ratio_of_preset: bool = True, configs: Sequence[Any] = ()) -> VariantSet:
    """Unmodified; each registered preset of the family's default (``toma-<family>``) and its
    ``-fast`` preset, with their schedules; the ideal merge at the default preset's ratio (the
    default's schedule and placement: the speed ceiling of that schedule)."""
    presets = get_registry().presets
    out = VariantSet([Variant("unmodified", "unmodified", None)])
    default = toma_preset(family)
    for name in (default, f"{default}-fast"):
        if name not in presets:
            if name == default:
                out.skip(name, "toma", None, f"preset {name!r} is not registered")
            continue
        try:
            config = _validated(name)
        except (ConfigError, ValueError) as exc:
            out.skip(name, "toma", None, str(exc))
            continue
        out.variants.append(Variant(name, "toma", config["ratio"], config))
        if name == default:
            ideal = ideal_of(config)
            out.variants.append(Variant(f"ideal@{config['ratio']:g}", "ideal", config["ratio"], ideal))
    for source in configs:
        config = _validated(source)
        out.variants.append(Variant(str(getattr(source, "stem", source)), "config", config["ratio"], config))
    return out


# --------------------------------------------------------------------------- timing


@contextmanager
def applied(pipe: BenchPipeline, variant: Variant) -> Iterator[TokenReduceHandle | None]:
    """The variant applied to the pipeline-shaped object (its scheduler drives the clock); removed on exit."""
    if variant.config is None:
        yield None
        return
    handle = apply(pipe, variant.config)
    try:
        yield handle
    finally:
        handle.remove()


@torch.no_grad()
def time_generations(
    gen: Generation,
    variants: Sequence[Variant],
    rounds: int,
    warmup: int,
    advance: Callable[[], None] | None = None,
) -> Timings:
    """Milliseconds per generation of every variant, interleaved round by round, same noise each time."""
    runs = {v.name: Run(gen, partial(applied, gen.pipe, v), -warmup) for v in variants}
    return time_interleaved(runs, rounds, advance)


@dataclass
class Run:
    """One timed entry: its generation, the set-up around each of its generations (untimed), and its
    first round (negative rounds are untimed warm-up)."""

    gen: Generation
    setup: Callable[[], AbstractContextManager[Any]]
    first_round: int


def _generate_into(gen: Generation, outputs: list[torch.Tensor]) -> None:
    outputs.append(gen())


def time_interleaved(
    runs: dict[str, Run], rounds: int, advance: Callable[[], None] | None = None, keep_outputs: bool = False
) -> Timings:
    """Each entry of ``runs`` timed round by round, interleaved, so drift over the run reaches all alike;
    one that fails is recorded and dropped, the others go on. ``keep_outputs``: keep each entry's last
    timed output (copied to the host after the stopwatch stops)."""
    watch = Stopwatch(_device_of(next(iter(runs.values())).gen.pipe.denoiser)) if runs else None
    out = Timings(samples={name: [] for name in runs})
    active = dict(runs)
    for rnd in range(min((r.first_round for r in runs.values()), default=0), rounds):
        for name, run in list(active.items()):
            if rnd < run.first_round:
                continue
            assert watch is not None  # runs is not empty here
            try:
                produced: list[torch.Tensor] = []
                with run.setup():
                    ms = watch(partial(_generate_into, run.gen, produced))
            except Exception as exc:  # one broken variant must not end a long benchmark
                out.errors[name] = describe_error(exc)
                del active[name]
                continue
            out.log.append((rnd, name))
            if rnd >= 0:
                out.samples[name].append(ms)
                out.step_ms.setdefault(name, []).append(run.gen.step_ms())
                if keep_outputs:
                    out.outputs[name] = produced[0].detach().float().cpu()
            if advance is not None:
                advance()
    return out


def run_record(
    gen: Generation,
    variants: VariantSet,
    result: Timings,
    rounds: int,
    warmup: int,
    mode: str = "generation",
    extra_notes: dict[str, Any] | None = None,
) -> dict[str, Any]:
    rows = []
    for variant in variants.variants:
        samples = result.samples.get(variant.name, [])
        rows.append(
            {
                "name": variant.name,
                "method": variant.method,
                "ratio": variant.ratio,
                "cycle_length": gen.steps,
                **report.stats(samples),
                "samples_ms": samples,
                **step_split(samples, result.step_ms.get(variant.name, [])),
                "peak_memory_gib": None,
                "error": result.errors.get(variant.name),
                "config": variant.config,
            }
        )
    report.add_speedups(rows)
    return {
        "arch": gen.arch,
        "mode": mode,
        "unit": "generation",
        "device": str(_device_of(gen.pipe.denoiser)),
        "batch": 1,  # images per generation
        "denoiser_batch": gen.call.args[0].shape[0] if gen.call.args else _batch_of(gen.call),
        "dtype": gen.dtype,
        "height": gen.height,
        "width": gen.width,
        "image_tokens": gen.call.tokens,
        "steps": gen.steps,
        "guidance_passes": gen.recipe.guidance_passes,
        "scheduler": type(gen.pipe.scheduler).__name__,
        "vae": gen.vae_note,
        "text_encoding": "excluded (once per generation, the same for every variant)",
        "rounds": rounds,
        "warmup": warmup,
        "weights": "random",
        "variants": rows,
        "skipped": variants.skipped,
        "notes": {**result.notes, **(extra_notes or {})},
    }


def step_split(totals: Sequence[float], steps: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Where a generation's time goes, median over the rounds: ``step_ms`` per denoising step,
    ``steps_ms`` all steps, ``rest_ms`` the rest (the VAE decode, ``set_timesteps``)."""
    if not steps or len(steps) != len(totals):
        return {}
    return {
        "step_ms": [statistics.median(column) for column in zip(*steps, strict=True)],
        "steps_ms": statistics.median(sum(s) for s in steps),
        "rest_ms": statistics.median(t - sum(s) for t, s in zip(totals, steps, strict=True)),
    }


def generation_record(runs: list[dict[str, Any]], notes: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "tool": f"tokenreduce {__version__} bench --generation",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "env": environment(),
        **provenance(),
        "runs": runs,
        "notes": [report.EFFICIENCY_NOTE, TEXT_NOTE, INTERLEAVE_NOTE, *notes],
    }


def bench_generation(
    arch: str,
    steps: int,
    device: str,
    dtype: str,
    rounds: int,
    warmup: int,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    configs: Sequence[Any] = (),
    methods: Sequence[str] = ("toma", "ideal"),
    console: Console | None = None,
) -> dict[str, Any]:
    """The run record of one architecture: every variant's generation time, interleaved."""
    console = console or Console()
    family = models.spec(arch).family
    meta = models.meta_model(arch)
    variants = only_methods(check_against(meta, generation_variants(family, configs=configs)), methods)
    with console.status(f"building {arch} for {steps}-step generations on {device} ({dtype})"):
        gen = build_generation(arch, steps, device, dtype, seed, height, width, meta=meta)
    console.print(f"{arch}: {gen.vae_note}")
    result = time_generations(gen, variants.variants, rounds, warmup)
    return run_record(gen, variants, result, rounds, warmup)


def only_methods(variants: VariantSet, methods: Sequence[str]) -> VariantSet:
    """The unmodified model, extra configs, and the variants of ``methods`` ("toma", "ideal")."""
    keep = {"unmodified", "config", *methods}
    return VariantSet([v for v in variants.variants if v.method in keep], variants.skipped)


# --------------------------------------------------------------------------- predicted vs measured


def _without_schedule(config: dict[str, Any] | None) -> dict[str, Any] | None:
    """``config`` validated (a record made before a parameter was added gets its default, so it
    still matches) with its schedule dropped; as recorded if it no longer validates."""
    if config is None:
        return None
    with suppress(ValueError):  # pydantic's ValidationError and ConfigError are ValueErrors
        config = load_config(config).model_dump(mode="json")
    return {k: v for k, v in config.items() if k != "schedule"}


def merged_step_speedups(
    per_step: dict[str, Any], arch: str, mode: str = "eager"
) -> list[tuple[dict[str, Any] | None, float]]:
    """(config without its schedule, merged-step speedup) of every timed row of ``arch`` in a per-step
    ``tokenreduce bench`` record (it times merged steps only)."""
    out = []
    for run in per_step.get("runs", []):
        if run.get("arch") != arch or run.get("mode") != mode:
            continue
        for row in run["variants"]:
            if row.get("config") is not None and row.get("speedup"):
                out.append((_without_schedule(row["config"]), float(row["speedup"])))
    return out


def add_predictions(
    run: dict[str, Any], per_step: dict[str, Any], modes: Sequence[str] = ("eager", "graph")
) -> str | None:
    """Fill ``predicted_speedup`` of each row whose config (schedule aside) the per-step record timed:
    the end-to-end speedup its merge schedule and reuse policy imply over ``steps`` steps, from the
    first of ``modes`` the record has for this architecture (eager matches the generations' own mode;
    graph mode is the fallback, recorded as ``predicted_mode``). Returns a note when no prediction
    can be made."""
    try:
        from tokenreduce.quality.speed import schedule_speedup
    except ImportError:
        return "no prediction: this version has no end-to-end speed model (tokenreduce.quality.speed)"
    mode, measured = next(
        ((m, rows) for m in modes if (rows := merged_step_speedups(per_step, run["arch"], m))), (None, [])
    )
    if mode is None:
        run.pop("predicted_mode", None)  # nothing of an earlier prediction stays
        for row in run["variants"]:
            row["predicted_speedup"] = None
        return f"no prediction: the per-step record has no {' or '.join(modes)} run of {run['arch']}"
    run["predicted_mode"] = mode
    base = next((r for r in run["variants"] if r.get("config") is None and r.get("steps_ms")), None)
    for row in run["variants"]:
        row["predicted_speedup"] = None
        key = _without_schedule(row.get("config"))
        match = next((s for config, s in measured if config == key), None) if key else None
        if match is not None:
            steps = schedule_speedup(row["config"], match, run["steps"])
            row["predicted_speedup"] = (
                steps if base is None else with_rest(steps, base["steps_ms"], base["rest_ms"])
            )
    return None


def with_rest(steps_speedup: float, steps_ms: float, rest_ms: float) -> float:
    """The generation's speedup when its steps speed up ``steps_speedup`` times and the rest (the
    decode) takes as long as before."""
    return (steps_ms + rest_ms) / (steps_ms / steps_speedup + rest_ms)


def compose_run(run: dict[str, Any]) -> bool:
    """Whether ``run`` compared compiled combinations with their uncompiled twins."""
    return any("compiled_difference" in v for v in run["variants"])


def markdown(record: dict[str, Any]) -> str:
    """Per-generation table: median and quartiles, the steps' and the rest's share, measured speedup,
    predicted where known."""
    lines = ["", "## per generation: measured and predicted speedup", ""]
    for run in record["runs"]:
        compiled = compose_run(run)
        lines += [
            f"### {run['arch']}, {run['mode']}: {run['steps']} steps, {run['height']}x{run['width']}, "
            f"{run['dtype']}, {run['scheduler']}; {run['vae']}"
            + (f"; predicted from {run['predicted_mode']}-mode steps" if run.get("predicted_mode") else ""),
            "",
            "| variant | median ms | q1 ms | q3 ms | steps ms | rest ms | speedup | predicted | over the part alone |"
            + (" differs from uncompiled |" if compiled else ""),
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
            + (" ---: |" if compiled else ""),
        ]
        for v in run["variants"]:
            cells = [
                report._fmt(v.get(k), ".1f") for k in ("median_ms", "q1_ms", "q3_ms", "steps_ms", "rest_ms")
            ]
            cells += [
                report._fmt(v.get(k), ".3f") for k in ("speedup", "predicted_speedup", "speedup_over_part")
            ]
            if compiled:
                cells.append(report._fmt(v.get("compiled_difference"), ".1e"))
            lines.append(
                f"| {v['name']} | " + " | ".join("failed" if v.get("error") else c for c in cells) + " |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def table(run: dict[str, Any]) -> Any:
    from rich.table import Table

    out = Table(title=f"{run['arch']}, {run['mode']}: {run['steps']} steps, ms per generation")
    compiled = compose_run(run)
    columns = ["variant", "median ms", "q1-q3 ms", "speedup", "predicted", "over part"]
    columns += ["vs uncompiled"] if compiled else []
    for column in columns:
        out.add_column(column, justify="left" if column == "variant" else "right")
    for v in run["variants"]:
        if v.get("error"):
            blank = [""] * (len(columns) - 3)
            out.add_row(v["name"], "[red]failed[/red]", v["error"].splitlines()[0][:60], *blank)
            continue
        quartiles = f"{report._fmt(v['q1_ms'], '.1f')}-{report._fmt(v['q3_ms'], '.1f')}"
        cells = [
            v["name"],
            report._fmt(v["median_ms"], ".1f"),
            quartiles,
            report._fmt(v["speedup"], ".3f"),
            report._fmt(v.get("predicted_speedup"), ".3f"),
            report._fmt(v.get("speedup_over_part"), ".3f"),
        ]
        cells += [report._fmt(v.get("compiled_difference"), ".1e")] if compiled else []
        out.add_row(*cells)
    return out


# --------------------------------------------------------------------------- the command


@dataclass
class GenerationSettings:
    archs: list[str]
    steps: int = 30
    rounds: int = 5
    warmup: int = 1
    device: str | None = None
    dtype: str | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    configs: list[Any] = field(default_factory=list)
    compose: list[str] = field(default_factory=list)  # parts composed with ToMA (compose.PARTS)
    compile_mode: str | None = None  # torch.compile's mode for the compose "compile" part
    methods: list[str] = field(default_factory=lambda: ["toma", "ideal"])
    predict_from: Any = None  # a per-step bench.json
    output: Any = "bench-results"


class _Shared(TypedDict):
    """The keyword arguments every generation bench of a run shares."""

    seed: int
    height: int | None
    width: int | None
    console: Console


def run_generation_bench(settings: GenerationSettings, console: Console | None = None) -> dict[str, Any]:
    """Time whole generations of every architecture (and the compositions asked for); write the record."""
    import json
    from pathlib import Path

    from tokenreduce.bench import compose

    console = console or Console()
    if settings.steps < 1 or settings.rounds < 1 or settings.warmup < 0:
        raise ValueError("--steps and --rounds must be >= 1 and --warmup >= 0")
    unknown = sorted(set(settings.compose) - set(compose.PARTS))
    if unknown:
        raise ValueError(
            f"unknown --compose part(s) {', '.join(unknown)}; choose from {', '.join(compose.PARTS)}"
        )
    for arch in settings.archs:
        recipe_of(models.spec(arch).family)  # every architecture has a recipe before anything runs
    per_step = None
    if settings.predict_from is not None:
        per_step = json.loads(Path(settings.predict_from).read_text(encoding="utf-8"))
    device = settings.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    runs, notes = [], []
    for arch in settings.archs:
        dtype = settings.dtype or (models.spec(arch).dtype if cuda else "fp32")
        common: _Shared = {
            "seed": settings.seed,
            "height": settings.height,
            "width": settings.width,
            "console": console,
        }
        timing_args = (settings.steps, device, dtype, settings.rounds, settings.warmup)
        if settings.compose:
            run = compose.bench_compose(
                arch,
                settings.compose,
                *timing_args,
                **common,
                compile_mode=settings.compile_mode,
                configs=settings.configs,
            )
        else:
            run = bench_generation(
                arch, *timing_args, configs=settings.configs, methods=settings.methods, **common
            )
            if per_step is not None:
                note = add_predictions(run, per_step)
                if note:
                    notes.append(f"{arch}: {note}")
        runs.append(run)
        console.print(table(run))
    record = generation_record(runs, notes)
    if per_step is not None:
        record["predicted_from"] = str(settings.predict_from)
        record["notes"].append(
            "predicted = the end-to-end speedup the merge schedule and reuse policy imply over the steps, "
            "from the merged-step speedup of the same config in the per-step record (its eager run; its "
            "graph run where it has no eager one: see each run's predicted_mode), with the rest of the "
            "unmodified generation (rest_ms: the VAE decode, set_timesteps) taking as long as before"
        )
    paths = report.write(record, Path(settings.output))
    with paths["markdown"].open("a", encoding="utf-8") as f:
        f.write(markdown(record))
    console.print(f"results: {paths['json']}, {paths['markdown']}, {paths['plot']}")
    return record
