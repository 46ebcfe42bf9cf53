"""``tokenreduce bench --ops``: kernels each merged block adds over the unmodified block, at real scale.

On a fast GPU every small kernel costs a few microseconds whatever it computes, so the number of
kernels a method adds per merged block is a speed budget that can be checked on a CPU. The real
architectures are built on the meta device (no memory, no compute); a ``TorchDispatchMode`` counts
every aten op that launches a kernel (views and bare allocations launch none) while one denoiser
call runs, attributed to the block (Flux) or transformer stack / block (SDXL) it runs in. The
difference to the same block of the unmodified model is what the method adds there.

Step kinds: ``select`` (the block computes a plan with new destinations), ``weights`` (cached
destinations, new weights), ``reuse`` (the block applies a plan computed earlier). One call per
decision is made with the manual clock, after one uncounted call (one-time set-up): select, then
weights, then reuse.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from tokenreduce import archs
from tokenreduce.bench import models
from tokenreduce.interfaces import Decision

#: Ops that launch no kernel although they are not views (allocation or metadata only).
NO_KERNEL = frozenset(
    {
        "empty",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "_unsafe_view",
        "resize_",
        "detach",
        "lift_fresh",
        "alias",
        "set_",
        "promote_types",  # returns a dtype
    }
)
#: Module classes whose forward is one unit of attribution (the transformer blocks of the registered
#: architectures; SDXL's transformer stack too).
UNIT_CLASSES = (
    "FluxTransformerBlock",
    "FluxSingleTransformerBlock",
    "BasicTransformerBlock",
    "Transformer2DModel",
    "JointTransformerBlock",
    "Flux2TransformerBlock",
    "Flux2SingleTransformerBlock",
    "QwenImageTransformerBlock",
    "WanTransformerBlock",
)
#: The unit holding a whole denoiser call (what a method adds outside the blocks shows only here).
CALL = "call"
STEP_KINDS = {Decision.SELECT: "select", Decision.WEIGHTS: "weights", Decision.REUSE: "reuse"}
#: Per family, its architecture of record (see :func:`of_record`) with fewer repeated blocks (same
#: widths, grids and placements, at least two merged blocks per kind): per-block counts are the
#: same, the count is several times faster (the budget test uses these).
SHORT: dict[str, dict[str, Any]] = {
    "flux": {"num_layers": 7, "num_single_layers": 7},
    "sdxl": {"transformer_layers_per_block": [1, 2, 2]},
    "sd3": {"num_layers": 7},
    "flux2": {"num_layers": 4, "num_single_layers": 7},
    "qwenimage": {"num_layers": 7},
    "wan": {"num_layers": 3},
}


def families() -> list[str]:
    """Every preset family with a registered architecture and a ToMA preset (the ideal needs its
    placement)."""
    from tokenreduce.bench.variants import toma_preset
    from tokenreduce.manager import get_registry

    presets = get_registry().presets
    found = {a.family for a in archs.registered().values()}
    return sorted(f for f in found if toma_preset(f) in presets)


def of_record(family: str) -> str:
    """The architecture counted for ``family`` by default: the first one its adapter registers (the
    published configuration, at its pipeline's default size, batch and dtype)."""
    return models.spec_of_family(family).name


def is_kernel(func: Any) -> bool:
    return not func.is_view and func._schema.name.split("::")[-1] not in NO_KERNEL


class KernelCounter(TorchDispatchMode):
    """Counts kernel-launching aten ops per active unit (every enclosing unit is credited)."""

    def __init__(self) -> None:
        super().__init__()
        self.active: list[str] = []
        self.counts: dict[str, Counter] = defaultdict(Counter)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if self.active and is_kernel(func):
            name = func._schema.name.split("::")[-1]
            for unit in self.active:
                self.counts[unit][name] += 1
        return func(*args, **(kwargs or {}))


def attach_units(model: nn.Module, counter: KernelCounter) -> list[Any]:
    """Forward hooks that push and pop each unit's name on the counter (handles returned)."""
    handles = []
    for name, module in model.named_modules():
        if type(module).__name__ not in UNIT_CLASSES:
            continue

        def enter(_m: nn.Module, _a: Any, unit: str = name) -> None:
            counter.active.append(unit)

        def leave(_m: nn.Module, _a: Any, _o: Any) -> None:
            counter.active.pop()

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))
    return handles


def unit_of(path: str, site: str) -> str:
    """The unit whose count a site's cost shows in."""
    for suffix in (".attn1", ".attn2", ".ffn", ".ff", ".attn"):
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    if site == "stack":  # the Transformer2DModel holding the block
        path = path.rsplit(".transformer_blocks.", 1)[0]
    return path


def unit_sites(sites: Any) -> dict[str, str]:
    """Unit -> the site name its count is reported under; several sites in one unit (e.g. attention
    and feed-forward of one block) share its count, reported once as ``"a+b"``."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for s in sites:
        unit = unit_of(s.path, s.site)
        if s.site not in grouped[unit]:
            grouped[unit].append(s.site)
    return {unit: "+".join(names) for unit, names in grouped.items()}


def meta_inputs(arch: str, model: nn.Module, dtype: torch.dtype) -> models.DenoiserCall:
    """The benchmark's inputs, made on the CPU (small) and moved to the meta device."""
    s = models.spec(arch)
    call = models.make_inputs(arch, model, s.batch, s.size, s.width or s.size, dtype, "cpu")

    def meta(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.to("meta")
        if isinstance(value, dict):
            return {k: meta(v) for k, v in value.items()}
        return value

    return models.DenoiserCall(tuple(meta(a) for a in call.args), meta(call.kwargs), call.tokens)


@dataclass
class CallCount:
    """Kernels per unit in one denoiser call, and which units computed a plan."""

    per_unit: dict[str, Counter]
    computed: set[str] = field(default_factory=set)


def count_call(model: nn.Module, call: models.DenoiserCall, runtime: Any = None) -> CallCount:
    counter = KernelCounter()
    computed: set[str] = set()
    if runtime is not None:
        original = runtime.plan

        def plan(group: Any, *args: Any, **kwargs: Any) -> Any:
            slot = group.slots.get(runtime.clock.pass_index)
            before = None if slot is None else slot.plan
            out = original(group, *args, **kwargs)
            if out is not before and counter.active:
                computed.update(counter.active)
            return out

        runtime.plan = plan
    handles = attach_units(model, counter)
    counter.active.append(CALL)
    try:
        with torch.no_grad(), counter:
            call(model)
    finally:
        counter.active.pop()
        for h in handles:
            h.remove()
        if runtime is not None:
            del runtime.plan
    return CallCount(dict(counter.counts), computed)


def added(merged: Counter, base: Counter) -> Counter:
    diff = Counter(merged)
    diff.subtract(base)
    return Counter({k: v for k, v in diff.items() if v})


def count_variant(
    model: nn.Module, call: models.DenoiserCall, config: dict[str, Any], base: CallCount
) -> dict[str, dict[str, Any]]:
    """``{site: {step kind: {"added", "min", "units", "ops"}}}`` of one configuration; site ``"call"``
    is the whole denoiser call (blocks included) per decision."""
    from tokenreduce.api import apply

    handle = apply(model, config)
    try:
        runtime = handle.runtime
        runtime.clock.driver = "manual"
        units = sorted(unit_sites(handle.sites).items()) + [(CALL, CALL)]
        observed: dict[tuple[str, str], list[tuple[int, Counter]]] = defaultdict(list)
        # One call first: one-time set-up (layouts moved to the device, caches) is not per-step cost.
        count_call(model, call, runtime)
        for decision in (Decision.SELECT, Decision.WEIGHTS, Decision.REUSE):
            runtime.clock.reset()  # pass 0 of a step: the plans cached by the previous call apply
            runtime.mark_all(decision)
            # Policies without a step index select on every call: their calls are all "select".
            counted = count_call(model, call, runtime)
            effective = decision if runtime.reuse.needs_step else Decision.SELECT
            for unit, site in units:
                if unit == CALL:  # the whole call, named after the call's decision
                    kind = STEP_KINDS[effective]
                else:
                    kind = STEP_KINDS[effective] if unit in counted.computed else "reuse"
                diff = added(counted.per_unit.get(unit, Counter()), base.per_unit.get(unit, Counter()))
                observed[(site, kind)].append((sum(diff.values()), diff))
    finally:
        handle.remove()
    out: dict[str, dict[str, Any]] = defaultdict(dict)
    for (site, kind), seen in sorted(observed.items()):
        worst = max(seen, key=lambda t: t[0])
        out[site][kind] = {
            "added": worst[0],
            "min": min(n for n, _ in seen),
            "units": len(seen),
            "ops": dict(sorted(worst[1].items())),
        }
    return dict(out)


def variant_configs(family: str, meta: nn.Module) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every registered preset that applies to ``family``'s model, plus ``ideal`` (the ToMA preset's
    placement and ratio with the zero-overhead merger). Returns (configs, skipped with reasons)."""
    from tokenreduce.api import prepare
    from tokenreduce.bench.variants import ideal_of, toma_preset
    from tokenreduce.config import ConfigError, load_config
    from tokenreduce.manager import get_registry

    configs: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    for name in sorted(get_registry().presets):
        try:
            # Merged steps are what is counted: a preset's schedule would leave some unmerged.
            config = load_config(name, schedule={"name": "always"}).model_dump()
            prepare(meta, config)
        except (ConfigError, ValueError, TypeError) as exc:
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        configs[name] = config
    toma = load_config(toma_preset(family), schedule={"name": "always"}).model_dump()
    configs["ideal"] = load_config(ideal_of(toma)).model_dump()
    return configs, skipped


def count_family(
    family: str, only: list[str] | None = None, short: bool = False, arch: str | None = None
) -> dict[str, Any]:
    """Op counts of every preset and the ideal on ``arch`` (default: ``family``'s architecture of
    record) in its dtype of record (``short``: with fewer repeated blocks, see :data:`SHORT`)."""
    arch = arch or of_record(family)
    dtype_name = models.spec(arch).dtype
    dtype = models.DTYPES[dtype_name]
    meta = archs.build(arch, overrides=SHORT[family]) if short else models.meta_model(arch)
    model = nn.Module.to(meta, dtype=dtype)
    model.requires_grad_(False)
    call = meta_inputs(arch, model, dtype)
    configs, skipped = variant_configs(family, model)
    if only is not None:
        configs = {k: v for k, v in configs.items() if k in only}
    base = count_call(model, call)
    s = models.spec(arch)
    return {
        "arch": arch,
        "dtype": dtype_name,
        "batch": s.batch,
        "size": s.size,
        "width": s.width or s.size,
        "frames": s.frames,
        "image_tokens": call.tokens,
        "short": short,
        "text_tokens": s.text_tokens,
        "variants": {name: count_variant(model, call, config, base) for name, config in configs.items()},
        "skipped": skipped,
    }


def rows(record: dict[str, Any]) -> list[tuple[str, str, str, str, int, int]]:
    """(arch, variant, site, step kind, added kernels (max over units), min over units)."""
    out = []
    for family in record["families"].values():
        for variant, sites in family["variants"].items():
            for site, kinds in sites.items():
                for kind in ("select", "weights", "reuse"):
                    if kind in kinds:
                        k = kinds[kind]
                        out.append((family["arch"], variant, site, kind, k["added"], k["min"]))
    return out


def run_ops(
    arch_names: list[str] | None, output: Path, console: Any, only: list[str] | None = None
) -> dict[str, Any]:
    """Count each architecture (default: every family's architecture of record), print the table,
    write ``ops.json`` and ``ops.md`` under ``output``."""
    import json
    import time

    from tokenreduce.bench.record import provenance
    from tokenreduce.generate import environment

    counted = families()
    if arch_names is None:
        arch_names = [of_record(f) for f in counted]
    unfit = sorted(a for a in arch_names if models.spec(a).family not in counted)
    if unfit:
        raise ValueError(
            f"--ops counts the architectures of families with a ToMA preset ({', '.join(counted)}), "
            f"not {', '.join(unfit)}"
        )
    record: dict[str, Any] = {
        **provenance(),
        "env": environment(),
        "unit": "kernels (non-view aten ops) a merged block adds over the unmodified block, per call",
        "families": {},
        "durations_s": {},
    }
    for arch in arch_names:
        start = time.perf_counter()
        record["families"][arch] = count_family(models.spec(arch).family, only, arch=arch)
        record["durations_s"][arch] = round(time.perf_counter() - start, 2)
    output.mkdir(parents=True, exist_ok=True)
    (output / "ops.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    table = markdown(record)
    (output / "ops.md").write_text(table, encoding="utf-8")
    console.print(table, markup=False, highlight=False)
    console.print(f"results: {output / 'ops.json'}")
    return record


def markdown(record: dict[str, Any]) -> str:
    lines = [
        "| arch | variant | site | step | added kernels | min over blocks |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {a} | {v} | {s} | {k} | {n} | {m} |" for a, v, s, k, n, m in rows(record)]
    return "\n".join(lines) + "\n"
