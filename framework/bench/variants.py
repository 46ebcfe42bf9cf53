"""The configurations a benchmark compares, every one validated before any timing starts.

Per architecture family: the unmodified model; ``identity`` (the ToMA preset's placement with a
merger that reduces nothing: the framework's own overhead); and per ratio ``ideal`` (the ToMA
placement with the zero-overhead ``ideal`` merger: a speed ceiling, whose images are no quality
reference), ``toma`` and the baselines' presets registered for the family. Anything that cannot be built is recorded with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from tokenreduce.api import prepare
from tokenreduce.config import ConfigError, load_config
from tokenreduce.manager import get_registry

METHODS = ("unmodified", "identity", "ideal", "toma", "tomesd", "todo", "tofu")
BASELINES = ("tomesd", "tofu", "todo")
#: Methods whose merge ratio is fixed by their construction (ToDo: 1 - 1/factor^2).
OWN_RATIO = ("todo",)
#: Methods with no efficiency of their own (the reference points).
REFERENCES = ("unmodified", "identity", "ideal")
DEFAULT_RATIOS = (0.25, 0.5, 0.75)
IDENTITY_RATIO = 0.5
#: The ceiling: the ToMA placement keeping the first tokens of every merged block (one slice, one
#: pad), no selection and no weights; one plan per block kind and call, shared like ToMA's.
IDEAL_COMPONENTS: dict[str, dict[str, Any]] = {
    "merger": {"name": "ideal"},
    "partitioner": {"name": "global"},
    "reuse": {"name": "step_sharing", "destinations_every": 1, "weights_every": 1, "sharing": "kind"},
}


@dataclass(frozen=True)
class Variant:
    """One timed configuration; ``config`` is ``None`` for the unmodified model."""

    name: str
    method: str
    ratio: float | None
    config: dict[str, Any] | None = None


@dataclass
class VariantSet:
    variants: list[Variant] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {name, method, ratio, reason}

    def skip(self, name: str, method: str, ratio: float | None, reason: str) -> None:
        self.skipped.append({"name": name, "method": method, "ratio": ratio, "reason": reason})

    def names(self) -> list[str]:
        return [v.name for v in self.variants]


def variant_name(method: str, ratio: float | None) -> str:
    return method if ratio is None else f"{method}@{ratio:g}"


def toma_preset(family: str) -> str:
    return f"toma-{family}"


def _validated(source: Any, **overrides: Any) -> dict[str, Any]:
    return load_config(source, **overrides).model_dump()


def _derived(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``base`` with some top-level fields replaced, validated again."""
    return _validated({**base, **changes})


def ideal_of(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """The ideal merge at ``base``'s placement: its adapter without size-weighted attention (the
    ideal's kept tokens stand for no group, and the ceiling carries no cost it does not need)."""
    adapter = dict(base["adapter"])
    if adapter.get("size_weighting"):
        adapter["size_weighting"] = False
    return _derived(base, adapter=adapter, **IDEAL_COMPONENTS, **changes)


def default_variants(
    family: str,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    methods: Sequence[str] = METHODS,
    configs: Sequence[str | Path] = (),
) -> VariantSet:
    """The variants of one architecture family ("sdxl" or "flux"), configs validated."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    presets = get_registry().presets
    out = VariantSet([Variant("unmodified", "unmodified", None)])  # every speedup is relative to it
    toma = toma_preset(family)

    def add(method: str, ratio: float | None, preset: str, build: Any, name: str | None = None) -> None:
        name = name or variant_name(method, ratio)
        if method not in methods:
            return
        if preset not in presets:
            out.skip(name, method, ratio, f"preset {preset!r} is not registered")
            return
        try:
            out.variants.append(Variant(name, method, ratio, build()))
        except (ConfigError, ValueError) as exc:
            out.skip(name, method, ratio, str(exc))

    add(
        "identity",
        IDENTITY_RATIO,
        toma,
        lambda: _derived(_validated(toma), ratio=IDENTITY_RATIO, merger={"name": "identity"}),
        name="identity",
    )
    for ratio in ratios:
        add("ideal", ratio, toma, lambda r=ratio: ideal_of(_validated(toma), ratio=r))
        add("toma", ratio, toma, lambda r=ratio: _validated(toma, ratio=r))
        for method in BASELINES:
            if method not in OWN_RATIO:
                preset = f"{method}-{family}"
                add(method, ratio, preset, lambda p=preset, r=ratio: _validated(p, ratio=r))
    for method in OWN_RATIO:
        preset = f"{method}-{family}"
        try:
            own = load_config(preset).ratio if preset in presets else None
        except ConfigError:
            own = None  # add() records the error
        add(method, own, preset, lambda p=preset: _validated(p))
    taken = set(out.names())
    for path in configs:
        # Extra configs are not optional: a bad file stops the benchmark before it starts.
        config = _validated(Path(path))
        name = base = Path(path).stem
        suffix = 2
        while name in taken:
            name, suffix = f"{base}-{suffix}", suffix + 1
        taken.add(name)
        out.variants.append(Variant(name, Path(path).stem, config["ratio"], config))
    return out


def check_against(model: nn.Module, variants: VariantSet) -> VariantSet:
    """Drop (and record) the variants that cannot be applied to ``model`` (sites, grids, adapter).

    Runs the same validation as :func:`tokenreduce.apply` without modifying the model, so a meta
    device model is enough.
    """
    kept = VariantSet(skipped=list(variants.skipped))
    for variant in variants.variants:
        if variant.config is None:
            kept.variants.append(variant)
            continue
        try:
            prepare(model, variant.config)
        except (ConfigError, ValueError, TypeError) as exc:
            kept.skip(variant.name, variant.method, variant.ratio, f"{type(exc).__name__}: {exc}")
        else:
            kept.variants.append(variant)
    return kept
