"""Interleaved timing of denoiser steps: eager, and replayed CUDA graphs.

A variant is timed over a *cycle*: as many consecutive denoiser calls as its reuse policy's
period (ToMA on SDXL: destinations every 10 steps, weights every 5 -> 10 calls), driven by the
runtime's ``"manual"`` clock exactly as a pipeline's scheduler drives it, so that selections,
weight updates and reuses occur in the proportions of a real generation. Step time = cycle
time / cycle length.

All variants run on the same model instance, one applied at a time, interleaved round by round
(A, B, C, A, B, C, ...) so that clock and thermal drift hit every variant alike.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tokenreduce.api import TokenReduceHandle, apply
from tokenreduce.bench.variants import Variant
from tokenreduce.config import load_config, resolve
from tokenreduce.interfaces import Decision, ReusePolicy

#: A policy with no period up to this many steps is timed over this many (a 50-step generation).
MAX_CYCLE = 50

Call = Callable[[nn.Module], torch.Tensor]


# --------------------------------------------------------------------------- reuse cycles


def reuse_cycle(policy: ReusePolicy | None) -> list[Decision]:
    """The decisions of the policy's shortest period, from step 0 (``[SELECT]`` without a policy)."""
    if policy is None or not policy.needs_step:
        return [Decision.SELECT]
    decisions = [policy.decide(step) for step in range(2 * MAX_CYCLE)]
    for period in range(1, MAX_CYCLE + 1):
        if all(d == decisions[i % period] for i, d in enumerate(decisions)):
            return decisions[:period]
    return decisions[:MAX_CYCLE]


def cycle_of(variant: Variant) -> list[Decision]:
    if variant.config is None:
        return [Decision.SELECT]
    return reuse_cycle(resolve(load_config(variant.config)).reuse)


# --------------------------------------------------------------------------- running


@contextmanager
def applied(model: nn.Module, variant: Variant) -> Iterator[TokenReduceHandle | None]:
    """The variant applied to ``model`` with a manual clock; removed on exit (``None``: unmodified).

    Merged steps only: the config's merge schedule is replaced by ``always`` (the per-step time of
    each step kind is what the end-to-end speed of a schedule is computed from).
    """
    if variant.config is None:
        yield None
        return
    handle = apply(model, variant.config, schedule={"name": "always"})
    try:
        handle.runtime.clock.driver = "manual"
        yield handle
    finally:
        handle.remove()


def run_cycle(model: nn.Module, call: Call, handle: TokenReduceHandle | None, steps: int) -> torch.Tensor:
    """``steps`` denoiser calls from step 0, closing each step as a scheduler would."""
    clock = handle.runtime.clock if handle is not None else None
    if clock is not None:
        clock.reset()
    out = None
    for step in range(steps):
        if step and clock is not None:
            clock.end_step()
        out = call(model)
    assert out is not None
    return out


class Stopwatch:
    """Milliseconds of ``fn()``: CUDA events around it on a GPU, ``perf_counter`` on a CPU."""

    def __init__(self, device: str | torch.device) -> None:
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self, fn: Callable[[], Any]) -> float:
        if not self.cuda:
            start = time.perf_counter()
            fn()
            return (time.perf_counter() - start) * 1e3
        torch.cuda.synchronize()  # nothing queued before the start event
        start_event = torch.cuda.Event(enable_timing=True)
        end_event = torch.cuda.Event(enable_timing=True)
        start_event.record()
        fn()
        end_event.record()
        end_event.synchronize()
        return start_event.elapsed_time(end_event)


@dataclass
class Timings:
    """Per-step milliseconds of every variant (one sample per round) and what went wrong."""

    samples: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    # (round, variant) in execution order; negative rounds are warm-up
    log: list[tuple[int, str]] = field(default_factory=list)
    # whole generations: the milliseconds of each denoising step, per timed round
    step_ms: dict[str, list[list[float]]] = field(default_factory=dict)
    notes: dict[str, Any] = field(default_factory=dict)
    # whole generations, when kept: the output of each variant's last timed generation (float32, CPU)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)


def describe_error(exc: BaseException) -> str:
    """The root cause first (a failed capture re-raises from ``capture_end``), with where it happened."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(chain) < 4:
        chain.append(current)
        current = current.__cause__ or current.__context__
    root = chain[-1]
    text = f"{type(root).__name__}: {str(root).strip()}"
    frames = [f for f in traceback.extract_tb(root.__traceback__) if "/torch/" not in f.filename][-3:]
    if frames:
        text += "\n  at " + "; ".join(f"{Path(f.filename).name}:{f.lineno} ({f.name})" for f in frames)
    if root is not exc:
        text += (
            f"\n  then {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        )
    return text[:3000]


# --------------------------------------------------------------------------- eager


@torch.no_grad()
def time_eager(
    model: nn.Module,
    call: Call,
    variants: Sequence[Variant],
    rounds: int,
    warmup: int,
    device: str | torch.device,
    advance: Callable[[], None] | None = None,
) -> Timings:
    """``warmup`` + ``rounds`` rounds; in each, every variant is applied, primed, timed over one cycle, removed.

    The priming call (untimed) builds what a running generation already has: layouts and their
    device copies, the Flux token grid; the timed cycle then starts at step 0 like the second
    pipeline call would. apply/remove and priming are outside the timed region.
    """
    watch = Stopwatch(device)
    out = Timings(samples={v.name: [] for v in variants})
    cycles: dict[str, list[Decision]] = {}
    active = []
    for variant in variants:
        try:
            cycles[variant.name] = cycle_of(variant)
        except Exception as exc:
            out.errors[variant.name] = describe_error(exc)
        else:
            active.append(variant)
    for rnd in range(-warmup, rounds):
        for variant in list(active):
            steps = len(cycles[variant.name])
            try:
                with applied(model, variant) as handle:
                    run_cycle(model, call, handle, 1)
                    ms = watch(partial(run_cycle, model, call, handle, steps))
            except Exception as exc:  # one broken variant must not end a long benchmark
                out.errors[variant.name] = describe_error(exc)
                active.remove(variant)
                continue
            out.log.append((rnd, variant.name))
            if rnd >= 0:
                out.samples[variant.name].append(ms / steps)
            if advance is not None:
                advance()
    return out


@torch.no_grad()
def peak_memory(model: nn.Module, call: Call, variant: Variant) -> float | None:
    """Peak allocated GiB over one eager cycle (after priming); ``None`` off CUDA."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        return None
    with applied(model, variant) as handle:
        run_cycle(model, call, handle, 1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run_cycle(model, call, handle, len(cycle_of(variant)))
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**30


# --------------------------------------------------------------------------- CUDA graphs


@dataclass
class Captured:
    """One graph per distinct decision of a variant's cycle, replayed in the cycle's order."""

    variant: Variant
    cycle: list[Decision]
    graphs: dict[Decision, Any]
    # Outputs, plans and the runtime the graphs read or write: alive as long as the graphs, so
    # the shared pool never hands their memory to another capture.
    keep: list[Any]

    def replay_cycle(self) -> None:
        for decision in self.cycle:
            self.graphs[decision].replay()


def _set_decision(handle: TokenReduceHandle | None, decision: Decision) -> None:
    """Step 0, guidance pass 0, every cached plan marked ``decision`` (what a capture records)."""
    if handle is not None:
        handle.runtime.clock.reset()
        handle.runtime.mark_all(decision)


def _plans(handle: TokenReduceHandle | None) -> list[Any]:
    if handle is None:
        return []
    return [(s.plan, s.destinations) for g in handle.runtime.groups.values() for s in g.slots.values()]


@contextmanager
def _sync_errors() -> Iterator[None]:
    """Raise on any operation that synchronises the host with the GPU (``.item()``, ``bool(t)``, D2H copies)."""
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def capture(model: nn.Module, call: Call, variant: Variant, pool: Any, warmup_iters: int = 3) -> Captured:
    """Apply, warm up on a side stream, capture one graph per distinct decision, remove.

    The captured kernels need none of the Python patches, so the handle is removed right after
    capture. Each graph records its decision with the plans of the capture before it; replaying
    a cycle therefore times the right kernels but does not chain plans between the graphs.
    """
    cycle = cycle_of(variant)
    distinct = list(dict.fromkeys(cycle))
    device = next(model.parameters()).device
    with applied(model, variant) as handle:
        # Lazily built state (layouts on the device, generators, cuBLAS/cuDNN workspaces and
        # algorithm choices) must exist before capture: warm up on a side stream, as the docs show.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup_iters):
                for decision in distinct:
                    _set_decision(handle, decision)
                    call(model)
            # A host synchronisation would invalidate the capture (and, in torch, leave its memory
            # pool unusable): find it now, in one more call per decision, with a precise error.
            with _sync_errors():
                for decision in distinct:
                    _set_decision(handle, decision)
                    call(model)
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        graphs: dict[Decision, Any] = {}
        keep: list[Any] = [handle]
        for decision in distinct:
            _set_decision(handle, decision)
            graph = torch.cuda.CUDAGraph()
            register = getattr(graph, "register_generator_state", None)  # torch >= 2.5
            if handle is not None and register is not None:
                # Random selectors draw from the runtime's own generator: it must advance on replay.
                register(handle.runtime.generator(device))
            with torch.cuda.graph(graph, pool=pool):
                keep.append(call(model))
            graphs[decision] = graph
            keep.append(_plans(handle))
    return Captured(variant, cycle, graphs, keep)


@torch.no_grad()
def time_graphs(
    model: nn.Module,
    call: Call,
    variants: Sequence[Variant],
    rounds: int,
    warmup: int,
    capture_warmup: int = 3,
    advance: Callable[[], None] | None = None,
    on_captured: Callable[[], None] | None = None,
) -> Timings:
    """Capture every variant (one shared memory pool), then time interleaved replays of their cycles."""
    device = next(model.parameters()).device
    if device.type != "cuda":
        raise ValueError("graph mode needs a CUDA device")
    watch = Stopwatch(device)
    out = Timings(samples={v.name: [] for v in variants})
    pool = torch.cuda.graph_pool_handle()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    captured: list[Captured] = []
    for variant in variants:
        try:
            captured.append(capture(model, call, variant, pool, capture_warmup))
        except Exception as exc:  # e.g. a component that synchronises with the host
            out.errors[variant.name] = describe_error(exc)
            torch.cuda.synchronize()
            # A capture that failed part-way can leave its pool marked as recording: start a new one.
            pool = torch.cuda.graph_pool_handle()
    torch.cuda.synchronize()
    out.notes["graph_memory_gib"] = (torch.cuda.memory_allocated() - before) / 2**30
    if on_captured is not None:
        on_captured()
    try:
        for rnd in range(-warmup, rounds):
            for cap in captured:
                ms = watch(cap.replay_cycle)
                out.log.append((rnd, cap.variant.name))
                if rnd >= 0:
                    out.samples[cap.variant.name].append(ms / len(cap.cycle))
                if advance is not None:
                    advance()
    finally:
        del captured
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------- torch.compile

#: Dynamo cache entries per code object while compiled variants are timed: a variant compiles one
#: graph per distinct step kind of its cycle (select, weights, reuse), and some models compile a
#: few per block kind; the default limit (8) would silently fall back to eager.
COMPILE_CACHE_LIMIT = 64


@torch.no_grad()
def time_compiled(
    model: nn.Module,
    call: Call,
    variants: Sequence[Variant],
    rounds: int,
    warmup: int,
    device: str | torch.device,
    backend: str = "inductor",
    advance: Callable[[], None] | None = None,
) -> Timings:
    """Each variant compiled once and timed ``rounds`` cycles, one variant after another.

    A compiled model cannot switch variants without recompiling (the patched forwards are new
    code), so the variants are not interleaved: apply, prime eagerly (layouts exist before
    tracing, as ``handle.prepare`` would build them), ``torch.compile``, run ``max(warmup, 1)``
    cycles (the first compiles a graph per step kind), time, remove, reset Dynamo. The unmodified
    model is timed first and again last; its two medians bound the drift over the run.
    """
    import torch._dynamo

    watch = Stopwatch(device)
    out = Timings(samples={v.name: [] for v in variants})
    compile_s: dict[str, float] = {}
    graphs: dict[str, int] = {}
    order = list(variants)
    baseline = next((v for v in variants if v.config is None), None)
    if baseline is not None:
        order.append(baseline)  # timed again at the end: drift check
    drift: list[float] = []
    config = torch._dynamo.config
    limit = config.cache_size_limit
    config.cache_size_limit = max(limit, COMPILE_CACHE_LIMIT)
    try:
        for index, variant in enumerate(order):
            repeat = index >= len(variants)
            steps = 1
            samples: list[float] = []
            try:
                steps = len(cycle_of(variant))
                torch._dynamo.reset()
                torch._dynamo.utils.counters.clear()
                with applied(model, variant) as handle:
                    run_cycle(model, call, handle, 1)
                    compiled = torch.compile(model, backend=backend)
                    # torch.compile of a module returns a module (OptimizedModule); typed as a callable
                    assert isinstance(compiled, nn.Module)
                    start = time.perf_counter()
                    for _ in range(max(warmup, 1)):
                        run_cycle(compiled, call, handle, steps)
                    if torch.device(device).type == "cuda":
                        torch.cuda.synchronize()
                    if not repeat:
                        compile_s[variant.name] = round(time.perf_counter() - start, 2)
                        graphs[variant.name] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
                    for rnd in range(rounds):
                        ms = watch(partial(run_cycle, compiled, call, handle, steps))
                        samples.append(ms / steps)
                        out.log.append((rnd, variant.name))
                        if advance is not None and not repeat:
                            advance()
            except Exception as exc:  # one broken variant must not end a long benchmark
                out.errors[variant.name] = describe_error(exc)
                continue
            finally:
                torch._dynamo.reset()
            if repeat:
                drift = samples
            else:
                out.samples[variant.name] = samples
    finally:
        config.cache_size_limit = limit
    out.notes["compile"] = {
        "backend": backend,
        "warmup_s": compile_s,
        "graphs": graphs,
        "unmodified_again_ms": drift,
        "order": "one variant after another, unmodified first and again last",
    }
    return out
