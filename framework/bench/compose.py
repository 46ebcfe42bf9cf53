"""ToMA composed with a fixed-schedule diffusers cache and with ``torch.compile``, per generation.

``tokenreduce bench --generation --compose cache compile`` times, on the same model, every
combination of the family's default preset (or of each ``--configs`` file) with the named parts:
unmodified, cache alone, ToMA alone, compile alone, ToMA + cache, ToMA + compile, ... Order of
set-up (the recommended one): ``tokenreduce.apply`` first, then the cache hooks (they wrap the
patched attention modules), then ``torch.compile`` of the denoiser; torn down in reverse.

- ``cache``: Pyramid Attention Broadcast through the denoiser's ``enable_cache`` (diffusers'
  ``CacheMixin``): spatial attention recomputed every 2nd call between timesteps 100 and 800,
  diffusers' documented example. Denoisers without ``enable_cache`` skip the cache variants.
- ``compile``: ``torch.compile`` of the denoiser after everything else is installed. A compiled
  model cannot switch variants without recompiling, so each compiled combination runs on its own
  copy of the denoiser, compiled once (its first, untimed generation), and every combination is
  timed interleaved round by round.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, runtime_checkable

import torch
from rich.console import Console

from tokenreduce.api import apply
from tokenreduce.bench import generation, models
from tokenreduce.bench.timing import COMPILE_CACHE_LIMIT, Timings, describe_error
from tokenreduce.bench.variants import Variant, VariantSet, _validated, check_against, toma_preset

PARTS = ("cache", "compile")
#: Pyramid Attention Broadcast settings (diffusers' documented example).
PAB = {"spatial_attention_block_skip_range": 2, "spatial_attention_timestep_skip_range": (100, 800)}
ORDER_NOTE = (
    "compose: set up in the order tokenreduce.apply, then the diffusers cache hooks, then torch.compile of "
    "the denoiser (torn down in reverse); cache = Pyramid Attention Broadcast (spatial attention every 2nd "
    "call for timesteps in (100, 800)); every combination timed interleaved round by round, each compiled "
    "one on its own copy of the denoiser, compiled in an untimed first generation; "
    "speedup_over_part = the same combination without ToMA over this one"
)
DIFFERENCE_NOTE = (
    "compiled_difference: a compiled combination's last timed output against the same combination "
    "uncompiled, as the root mean square of the difference over that of the uncompiled output "
    "(compiled kernels round differently: compare with the row 'compile' against 'unmodified')"
)


@runtime_checkable
class Cacheable(Protocol):
    """A denoiser with diffusers' ``CacheMixin`` methods."""

    def enable_cache(self, config: Any) -> None: ...

    def disable_cache(self) -> None: ...


@dataclass(frozen=True)
class Combination:
    """ToMA (a variant with a config) or not, with or without the cache and compile."""

    toma: Variant | None
    cache: bool = False
    compile: bool = False
    compile_mode: str | None = None  # torch.compile's mode (None: its default)

    @property
    def name(self) -> str:
        parts = ([self.toma.name] if self.toma else []) + [p for p in PARTS if getattr(self, p)]
        return "+".join(parts) or "unmodified"

    @property
    def variant(self) -> Variant:
        """The record's row (method ``unmodified`` only for the plain model: speedups are against it)."""
        if self.toma is None:
            method = "+".join(p for p in PARTS if getattr(self, p)) or "unmodified"
            return Variant(self.name, method, None, None)
        extra = "".join(f"+{p}" for p in PARTS if getattr(self, p))
        return Variant(self.name, f"{self.toma.method}{extra}", self.toma.ratio, self.toma.config)

    def without_toma(self) -> Combination:
        return Combination(None, self.cache, self.compile, self.compile_mode)


def combinations(
    family: str,
    parts: Sequence[str],
    model: torch.nn.Module,
    compile_mode: str | None = None,
    configs: Sequence[Any] = (),
) -> tuple[list[Combination], VariantSet]:
    """Every subset of ``{ToMA} + parts``; skipped ones recorded (no preset, no cache support).

    ToMA is the family's default preset, or each of ``configs`` (config files or mappings) instead.

    The preset runs with its own merge schedule next to the cache: at a step that starts or stops
    merging (or selects new destinations) tokenreduce resets the cache's state, so the cache never
    serves an attention output of other tokens.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"unknown --compose part(s) {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    skipped = VariantSet()
    if configs:
        chosen = [Variant(str(getattr(c, "stem", "config")), "config", None, _validated(c)) for c in configs]
    else:
        preset = toma_preset(family)
        chosen = [Variant(preset, "toma", None, _validated(preset))]
    toma = check_against(model, VariantSet(chosen))
    skipped.skipped += toma.skipped
    tomas: list[Variant | None] = [None]
    for v in toma.variants:
        assert v.config is not None  # built above from the preset's config
        tomas.append(Variant(v.name, v.method, v.config["ratio"], v.config))
    cacheable = hasattr(model, "enable_cache")
    out = []
    for t, cache, compiled in itertools.product(tomas, [False, True], [False, True]):
        if (cache and "cache" not in parts) or (compiled and "compile" not in parts):
            continue
        combo = Combination(t, cache, compiled, compile_mode if compiled else None)
        if cache and not cacheable:
            skipped.skip(
                combo.name, combo.variant.method, None, f"{type(model).__name__} has no enable_cache"
            )
            continue
        out.append(combo)
    return out, skipped


@contextmanager
def installed(gen: generation.Generation, combo: Combination) -> Iterator[None]:
    """``combo`` set up on ``gen``'s pipeline-shaped object: apply, cache hooks, compile; undone in reverse."""
    pipe, model = gen.pipe, gen.pipe.denoiser
    handle = apply(pipe, combo.toma.config) if combo.toma is not None else None
    cached: Cacheable | None = None
    try:
        if combo.cache:
            from diffusers import PyramidAttentionBroadcastConfig

            assert isinstance(model, Cacheable)  # combinations() skips the cache otherwise
            config = PyramidAttentionBroadcastConfig(
                **PAB, current_timestep_callback=lambda: pipe.current_timestep
            )
            model.enable_cache(config)
            cached = model
        if combo.compile:
            if handle is not None:  # layouts built before compiling, not inside the graph
                handle.prepare(gen.height, gen.width, **gen.size)
            pipe.forward = torch.compile(model, mode=combo.compile_mode)
        yield
    finally:
        if combo.compile:
            pipe.forward = model
            torch._dynamo.reset()  # the next variant compiles its own graphs
        if cached is not None:
            cached.disable_cache()
        if handle is not None:
            handle.remove()


@contextmanager
def own_copy(gen: generation.Generation, combo: Combination) -> Iterator[generation.Generation]:
    """``combo`` installed on a deep copy of ``gen``'s denoiser and scheduler (same inputs, same VAE).

    A compiled model cannot switch variants without recompiling; on copies of their own, compiled
    combinations stay compiled side by side and can be timed interleaved like the eager ones.
    """
    pipe = generation.BenchPipeline(
        gen.family, copy.deepcopy(gen.pipe.denoiser), copy.deepcopy(gen.pipe.scheduler)
    )
    own = dataclasses.replace(gen, pipe=pipe)
    with installed(own, combo):
        yield own


@torch.no_grad()
def time_combinations(
    gen: generation.Generation,
    combos: Sequence[Combination],
    rounds: int,
    warmup: int,
    advance: Callable[[], None] | None = None,
) -> Timings:
    """Every combination timed round by round, interleaved, so drift over the run (clocks, a busy
    host) reaches all alike. Eager combinations are set up on ``gen`` for each generation; each
    compiled one once, on its own copy of the denoiser (one more copy of the weights per compiled
    combination), and warmed up at least once (its compilation) before the timed rounds."""
    first = -max(warmup, 1)  # a compiled combination's first generation compiles: never timed
    config = torch._dynamo.config
    limit = config.cache_size_limit
    with ExitStack() as stack:
        stack.callback(setattr, config, "cache_size_limit", limit)
        config.cache_size_limit = max(limit, COMPILE_CACHE_LIMIT)  # both variants' graphs stay cached
        runs: dict[str, generation.Run] = {}
        errors: dict[str, str] = {}
        for combo in combos:
            try:
                if combo.compile:
                    own = stack.enter_context(own_copy(gen, combo))
                    runs[combo.name] = generation.Run(own, nullcontext, first)
                else:
                    runs[combo.name] = generation.Run(gen, partial(installed, gen, combo), -warmup)
            except Exception as exc:  # one broken combination must not end the run
                errors[combo.name] = describe_error(exc)
        out = generation.time_interleaved(runs, rounds, advance, keep_outputs=True)
    out.samples = {c.name: out.samples.get(c.name, []) for c in combos}
    out.errors.update(errors)
    return out


def add_part_speedups(rows: list[dict[str, Any]], combos: Sequence[Combination]) -> None:
    """``speedup_over_part``: the same combination without ToMA over this one (ToMA's gain on top)."""
    median = {r["name"]: r.get("median_ms") for r in rows}
    for row, combo in zip(rows, combos, strict=True):
        base = median.get(combo.without_toma().name) if combo.toma is not None else None
        row["speedup_over_part"] = base / row["median_ms"] if base and row.get("median_ms") else None


def bench_compose(
    arch: str,
    parts: Sequence[str],
    steps: int,
    device: str,
    dtype: str,
    rounds: int,
    warmup: int,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    console: Console | None = None,
    compile_mode: str | None = None,
    configs: Sequence[Any] = (),
) -> dict[str, Any]:
    """The run record of ``arch``: every combination of ToMA (the default preset, or each of
    ``configs``) with ``parts``, per generation."""
    console = console or Console()
    family = models.spec(arch).family
    meta = models.meta_model(arch)
    combos, skipped = combinations(family, parts, meta, compile_mode, configs)
    with console.status(f"building {arch} for {steps}-step generations on {device} ({dtype})"):
        gen = generation.build_generation(arch, steps, device, dtype, seed, height, width, meta=meta)
    result = time_combinations(gen, combos, rounds, warmup)
    variants = VariantSet([c.variant for c in combos], skipped.skipped)
    run = generation.run_record(gen, variants, result, rounds, warmup, mode="compose")
    add_part_speedups(run["variants"], combos)
    add_compiled_differences(run["variants"], combos, result.outputs)
    run["notes"]["compose"] = ORDER_NOTE
    run["notes"]["compiled_difference"] = DIFFERENCE_NOTE
    if "compile" in parts:
        run["notes"]["compile_mode"] = f"torch.compile mode: {compile_mode or 'default'}"
    return run


def relative_difference(output: torch.Tensor, reference: torch.Tensor) -> float:
    """RMS of ``output - reference`` over the RMS of ``reference``."""
    return float((output - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float32).tiny))


def add_compiled_differences(
    rows: list[dict[str, Any]], combos: Sequence[Combination], outputs: dict[str, torch.Tensor]
) -> None:
    """``compiled_difference``: how far each compiled combination's output is from its eager twin's.

    Compiling must not change what a combination computes beyond rounding; a CUDA-graph mode that
    replayed stale plans, or a graph that froze a step's decision, would show here as a difference
    far above the one between ``compile`` and ``unmodified``.
    """
    for row, combo in zip(rows, combos, strict=True):
        twin = dataclasses.replace(combo, compile=False, compile_mode=None)
        ours, theirs = outputs.get(combo.name), outputs.get(twin.name)
        if combo.compile and ours is not None and theirs is not None:
            row["compiled_difference"] = relative_difference(ours, theirs)
        else:
            row["compiled_difference"] = None
