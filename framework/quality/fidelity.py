"""``tokenreduce eval --proxy``: the fidelity benchmark on the trained proxy models.

Every variant (method x ratio, and ToMA's knobs one at a time) generates the same images as the
unmodified proxy, from the same seeds and classes, in the same batches, once per batch size:
first one image per call (what a user generating one image gets; classifier-free guidance in one
batch), then batched (ToMA's batch-summed selection sees more images). Reported per variant:
PSNR, SSIM and feature similarity against the unmodified images, and the Frechet distance of
the features to crops of the held-out photo bands (the unmodified model's own distance is the
floor). Outputs: JSON, a markdown table, an image grid and, given ``tokenreduce bench`` results,
a speed-versus-fidelity plot whose speed is the end-to-end generation speedup implied by each
config's merge schedule (:mod:`tokenreduce.quality.speed`).
"""

from __future__ import annotations

import copy
import datetime
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from tokenreduce.api import apply
from tokenreduce.config import load_config
from tokenreduce.quality import metrics
from tokenreduce.quality.proxy.models import FLUX_PROXY_ADAPTER, KINDS, ProxyPipeline, spec

METHODS = ("toma", "tomesd", "tofu", "todo")
RATIOS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Variant:
    """One configuration to evaluate on one proxy."""

    kind: str
    method: str  # toma, toma-block, tomesd, tofu, todo: matched against `tokenreduce bench` names
    group: str  # "methods" (method x ratio) or the ToMA knob being varied
    label: str
    config: dict[str, Any] = field(hash=False)

    @property
    def ratio(self) -> float:
        return float(self.config["ratio"])

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.label}"


def merged(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``update`` merged in; a component named differently replaces the base's whole
    entry (its parameters belong to the other component)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        old = out.get(key)
        if (
            isinstance(value, dict)
            and isinstance(old, dict)
            and value.get("name", old.get("name")) == old.get("name")
        ):
            out[key] = merged(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_for(kind: str, preset: str, **update: Any) -> dict[str, Any]:
    """A preset as a mapping with nested ``update``s; Flux presets get the proxies' skipped blocks."""
    data = load_config(preset).model_dump(mode="json")
    if spec(kind).arch == "flux":
        data = merged(data, {"adapter": FLUX_PROXY_ADAPTER})
    return merged(data, update)


def method_variants(kind: str, ratios: Sequence[float] = RATIOS) -> list[Variant]:
    """Every method at every ratio (ToDo only at its one ratio, 0.75 = 2x2 pooling)."""
    out = []
    arch = spec(kind).arch
    for method in METHODS:
        preset = f"{method}-{arch}"
        if method == "todo":
            if arch == "sdxl":
                out.append(Variant(kind, method, "methods", "todo@0.75", config_for(kind, preset)))
            continue
        for r in ratios:
            out.append(Variant(kind, method, "methods", f"{method}@{r}", config_for(kind, preset, ratio=r)))
    if arch == "sdxl":
        out.append(
            Variant(kind, "toma-block", "methods", "toma-block@0.5", config_for(kind, "toma-sdxl-block"))
        )
        # Like for like: ToMA where the ToMeSD and ToFu presets merge (self-attention, first level).
        same_sites = {"sites": ["attn1"], "levels": [0]}
        for r in ratios:
            config = config_for(kind, "toma-sdxl", ratio=r, adapter=same_sites)
            out.append(Variant(kind, "toma-attn1", "same sites", f"toma-attn1@{r}", config))
    return out


def knob_variants(kind: str, ratio: float = 0.5) -> list[Variant]:
    """ToMA's defaults varied one knob at a time (the default itself is in the method rows)."""
    arch = spec(kind).arch
    preset = f"toma-{arch}"
    # The preset's own values, read as data (a component's parameters are not typed on the config).
    base = load_config(preset).model_dump()

    def v(group: str, label: str, **update: Any) -> Variant:
        return Variant(kind, "toma", group, label, config_for(kind, preset, ratio=ratio, **update))

    # Tiles no larger than the smallest token grid merged (SDXL: the second attention level).
    smallest = spec(kind).size // (4 if arch == "sdxl" else 2)
    out = [
        v("tile", f"tile={s}", partitioner={"size": [s, s]})
        for s in (2, 4, 8, 16)
        if [s, s] != base["partitioner"]["size"] and s <= smallest
    ]
    out += [v("temperature", f"temperature={t:g}", merger={"temperature": t}) for t in (1e-4, 1e-2, 1e-1)]
    out += [
        v("reuse", f"reuse={d}/{w}", reuse={"destinations_every": d, "weights_every": w})
        for d, w in ((1, 1), (5, 5), (10, 5), (10, 10), (20, 10))
        if (d, w) != (base["reuse"]["destinations_every"], base["reuse"]["weights_every"])
    ]
    if arch == "sdxl":
        out += [v("sites", f"sites={s}", adapter={"sites": [s]}) for s in ("attn1", "block")]
        out += [
            v("levels", "levels=[0]", adapter={"levels": [0]}),
            v("levels", "levels=[1]", adapter={"levels": [1]}),
        ]
    else:
        out += [
            v("skip", f"skip={d}+{s}", adapter={"skip_double": d, "skip_single": s})
            for d, s in ((0, 0), (2, 2), (2, 4), (4, 0))
        ]
    return out


def config_variants(
    kinds: Sequence[str], configs: Sequence[str], ratios: Sequence[float] | None = None
) -> list[Variant]:
    """Given configs (presets or files), each on every proxy whose architecture its adapter fits
    (``ValueError`` for one that fits none), at its own ratio or at each of ``ratios``."""
    out = []
    for source in configs:
        adapter = load_config(source).adapter.name
        fits = [kind for kind in kinds if spec(kind).arch == adapter]
        if not fits:
            raise ValueError(
                f"config {source!r} (adapter {adapter!r}) fits none of the proxies {', '.join(kinds)}"
            )
        label = Path(source).stem if Path(source).suffix else source
        for kind in fits:
            if ratios is None:
                out.append(Variant(kind, label, "configs", label, config_for(kind, source)))
            else:
                out += [
                    Variant(kind, label, "configs", f"{label}@{r}", config_for(kind, source, ratio=r))
                    for r in ratios
                ]
    return out


def sweep(kinds: Sequence[str], ratios: Sequence[float] = RATIOS, knobs: bool = True) -> list[Variant]:
    out = []
    for kind in kinds:
        out += method_variants(kind, ratios)
        if knobs:
            out += knob_variants(kind)
    return out


# --------------------------------------------------------------------------- generation and scoring


@dataclass(frozen=True)
class Protocol:
    seeds_per_class: int = 32
    steps: int = 30
    guidance: float = 3.0
    # Images per pipeline call, each scored separately, batch 1 first (ToMA's batch-summed
    # selection depends on the batch).
    batches: tuple[int, ...] = (1, 64)
    reference_crops: int = 2048

    def __post_init__(self) -> None:
        if (
            not self.batches
            or any(b < 1 for b in self.batches)
            or len(set(self.batches)) != len(self.batches)
        ):
            raise ValueError(f"batch sizes must be distinct positive integers, got {self.batches}")

    def items(self, num_classes: int) -> tuple[list[int], list[int]]:
        labels = [c for _ in range(self.seeds_per_class) for c in range(num_classes)]
        seeds = [s for s in range(self.seeds_per_class) for _ in range(num_classes)]
        return labels, seeds


def generate(pipe: ProxyPipeline, protocol: Protocol, batch: int) -> tuple[torch.Tensor, float]:
    """All images of the protocol (``batch`` per call) and the seconds it took."""
    labels, seeds = protocol.items(len(pipe.class_names))
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    chunks = [
        pipe(labels[i : i + batch], seeds[i : i + batch], protocol.steps, protocol.guidance)
        for i in range(0, len(labels), batch)
    ]
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(chunks), time.perf_counter() - start


def _mean_and_sem(values: torch.Tensor) -> tuple[float | None, float | None]:
    """Mean over images and its standard error; None where images are identical (PSNR inf)."""
    values = values.double()
    if torch.isinf(values).any():
        return None, None
    return float(values.mean()), float(values.std() / math.sqrt(len(values))) if len(values) > 1 else 0.0


def score(
    features: torch.nn.Module,
    images: torch.Tensor,
    unmodified: torch.Tensor,
    unmodified_embeddings: torch.Tensor,
    distance: metrics.FrechetDistance,
) -> dict[str, float | None]:
    """Same-seed metrics against the unmodified images, and the distance to the held-out crops."""
    similarity = torch.nn.functional.cosine_similarity(
        metrics.embed(features, images), unmodified_embeddings, dim=-1
    )
    out: dict[str, float | None] = {}
    for name, values in (
        ("psnr", metrics.psnr(images, unmodified)),
        ("ssim", metrics.ssim(images, unmodified)),
        ("feature_similarity", similarity),
    ):
        out[name], out[f"{name}_sem"] = _mean_and_sem(values)
    out["fd_heldout"] = distance(images)
    return out


def heldout_crops(count: int, seed: int = 1234) -> torch.Tensor:
    from tokenreduce.quality.proxy.data import photo_bank, sample_crops
    from tokenreduce.quality.proxy.models import IMAGE_SIZE

    bank = photo_bank()
    crops, _ = sample_crops(bank.heldout, count, IMAGE_SIZE, torch.Generator().manual_seed(seed), flip=False)
    return (crops + 1) / 2


def evaluate(
    pipes: dict[str, ProxyPipeline],
    features: torch.nn.Module,
    variants: Sequence[Variant],
    protocol: Protocol,
    console: Console | None = None,
) -> dict[str, Any]:
    """Generate and score every variant; returns the results record (also the sample images)."""
    from tokenreduce.generate import environment

    # Held-out features are computed once; each unmodified set is embedded once per proxy.
    distance = metrics.FrechetDistance(features, heldout_crops(protocol.reference_crops))
    rows: list[dict[str, Any]] = []
    samples: dict[str, torch.Tensor] = {}
    for batch, kind in ((b, k) for b in protocol.batches for k in pipes):
        pipe = pipes[kind]
        first = batch == protocol.batches[0]  # the image grid shows the first batch size's images
        unmodified, seconds = generate(pipe, protocol, batch)
        if first:
            samples[f"{kind}/unmodified"] = unmodified
        row = {
            "kind": kind,
            "batch": batch,
            "method": "unmodified",
            "group": "methods",
            "label": "unmodified",
        }
        row["ratio"] = 0.0
        # Same-seed metrics of the unmodified model against itself are exact: no PSNR (infinite).
        same = {"psnr": None, "psnr_sem": None, "ssim": 1.0, "ssim_sem": 0.0}
        same |= {"feature_similarity": 1.0, "feature_similarity_sem": 0.0}
        rows.append(row | same | {"fd_heldout": distance(unmodified), "seconds": round(seconds, 3)})
        unmodified_embeddings = metrics.embed(features, unmodified)
        for variant in (v for v in variants if v.kind == kind):
            handle = apply(pipe, variant.config)
            try:
                images, seconds = generate(pipe, protocol, batch)
            finally:
                handle.remove()
            if first:
                samples[variant.name] = images
            row = {
                "kind": kind,
                "batch": batch,
                "method": variant.method,
                "group": variant.group,
                "label": variant.label,
                "ratio": variant.ratio,
            }
            scores = score(features, images, unmodified, unmodified_embeddings, distance)
            rows.append(row | scores | {"seconds": round(seconds, 3)})
            if console:
                r = rows[-1]
                psnr = "identical" if r["psnr"] is None else f"{r['psnr']:.2f} dB"
                console.print(
                    f"{variant.name} (batch {batch}): PSNR {psnr}, SSIM {r['ssim']:.3f}, "
                    f"feature sim {r['feature_similarity']:.4f}, FD {r['fd_heldout']:.3f}"
                )
    record = {
        "tool": "tokenreduce eval --proxy",
        "date": datetime.date.today().isoformat(),
        "env": environment(),
        "protocol": protocol.__dict__,
        "proxies": {kind: pipe.record for kind, pipe in pipes.items()},
        "configs": {v.name: v.config for v in variants},
        "runs": rows,
    }
    return {"record": record, "samples": samples}


# --------------------------------------------------------------------------- reports


def markdown_table(record: dict[str, Any]) -> str:
    lines = [
        f"Proxy fidelity ({record['date']}, {record['env'].get('gpu', 'cpu')}): "
        f"{record['protocol']['seeds_per_class']} seeds x classes, {record['protocol']['steps']} steps, "
        f"guidance {record['protocol']['guidance']}; each batch size (images per call) scored on its "
        "own, one image per call first. "
        "PSNR/SSIM/feature similarity against the unmodified proxy's same-seed images (higher is closer); "
        "FD: Frechet distance of the features to held-out photo crops (lower is better; the unmodified "
        "row is the reference). ± is the standard error of the mean over images.",
        "",
        "| batch | proxy | group | variant | ratio | PSNR (dB) | SSIM | feature sim. | FD held-out | gen. s |",
        "|---:|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]

    def pm(r: dict[str, Any], key: str, digits: int) -> str:
        if r[key] is None:
            return "identical"
        return (
            f"{r[key]:.{digits}f} ± {r[key + '_sem']:.{digits}f}"
            if r.get(key + "_sem")
            else f"{r[key]:.{digits}f}"
        )

    for r in record["runs"]:
        lines.append(
            f"| {r['batch']} | {r['kind']} | {r['group']} | {r['label']} | {r['ratio']:g} | {pm(r, 'psnr', 2)} | "
            f"{pm(r, 'ssim', 3)} | {pm(r, 'feature_similarity', 4)} | {r['fd_heldout']:.2f} | {r['seconds']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def image_grid(samples: dict[str, torch.Tensor], kinds: Sequence[str], columns: int = 8, ratio: float = 0.5):
    """Per proxy: the unmodified images and each method at ``ratio`` (ToDo at its 0.75)."""
    from tokenreduce.demo import side_by_side

    rows = []
    for kind in kinds:
        names = [f"{kind}/unmodified"] + [
            n
            for n in samples
            if n.startswith(f"{kind}/") and (n.endswith(f"@{ratio}") or n.endswith("todo@0.75"))
        ]
        for name in names:
            if name not in samples:
                continue
            images = samples[name][:columns]
            panels = [("", (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for img in images]
            rows.append((name, panels))
    return side_by_side(rows, scale=2)


def speed_table(bench: dict[str, Any], mode: str) -> dict[tuple[str, str, float], float]:
    """(arch, method, ratio) -> speedup, from a ``tokenreduce bench`` JSON."""
    out = {}
    for run in bench.get("runs", []):
        if run.get("mode") != mode:
            continue
        for v in run["variants"]:
            if v.get("speedup") is None or v.get("ratio") is None:
                continue
            method = "toma-block" if v["method"].endswith("-block") else v["method"]
            out[(run["arch"], method, float(v["ratio"]))] = float(v["speedup"])
    return out


#: One colour per method in every panel and plot.
METHOD_COLOURS = {
    "unmodified": "black",
    "toma": "tab:blue",
    "toma-block": "tab:cyan",
    "toma-attn1": "tab:purple",
    "tomesd": "tab:orange",
    "tofu": "tab:green",
    "todo": "tab:red",
}


def speed_fidelity_plot(record: dict[str, Any], bench: dict[str, Any], mode: str, path: Path) -> int:
    """End-to-end speedup vs feature similarity at the first batch size; returns the points plotted.

    Speed: the bench's per-step speedup of a merged step, mixed with unmerged steps as each
    config's merge schedule runs them over the protocol's steps (:func:`schedule_speedup`).
    """
    import matplotlib

    from tokenreduce.quality.speed import schedule_speedup

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speeds = speed_table(bench, mode)
    kinds = sorted({r["kind"] for r in record["runs"]})
    batch = record["protocol"]["batches"][0]
    steps = record["protocol"]["steps"]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4.2), squeeze=False)
    plotted = 0
    for ax, kind in zip(axes[0], kinds, strict=True):
        by_method: dict[str, list[tuple[float, float, float]]] = {}
        for r in record["runs"]:
            if r["kind"] != kind or r["group"] != "methods" or r["batch"] != batch:
                continue
            if r["method"] == "unmodified":
                by_method.setdefault("unmodified", []).append((1.0, r["feature_similarity"], 0.0))
                continue
            speed = speeds.get((spec(kind).arch, r["method"], r["ratio"]))
            if speed is not None:
                speed = schedule_speedup(record["configs"][f"{kind}/{r['label']}"], speed, steps)
                by_method.setdefault(r["method"], []).append((speed, r["feature_similarity"], r["ratio"]))
        for method, points in sorted(by_method.items()):
            points.sort(key=lambda p: p[2])
            colour = METHOD_COLOURS.get(method, "tab:gray")
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", color=colour, label=method)
            for x, y, ratio in points:
                if ratio:
                    ax.annotate(f"{ratio:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
            plotted += len(points)
        ax.set_title(
            f"{kind}: speed ({mode}, {bench.get('env', {}).get('gpu', '?')}) vs proxy fidelity, batch {batch}"
        )
        ax.set_xlabel(f"end-to-end speedup over unmodified, {steps} steps (bench step times x schedule)")
        ax.set_ylabel("feature similarity to unmodified (proxy)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return plotted


def write_reports(
    result: dict[str, Any], output: Path, bench: dict[str, Any] | None, mode: str, console: Console
) -> None:
    output.mkdir(parents=True, exist_ok=True)
    record = result["record"]
    (output / "fidelity.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    (output / "fidelity.md").write_text(markdown_table(record), encoding="utf-8")
    kinds = list(record["proxies"])
    image_grid(result["samples"], kinds).save(output / "fidelity-grid.png")
    table = Table(title="proxy fidelity (vs the unmodified proxy, same seeds)")
    for column in ("proxy", "variant", "PSNR dB", "SSIM", "feat. sim", "FD held-out"):
        table.add_column(column)
    table.add_column("batch", justify="right")
    for r in record["runs"]:
        if r["group"] == "methods":
            table.add_row(
                r["kind"], r["label"], "-" if r["psnr"] is None else f"{r['psnr']:.2f}", f"{r['ssim']:.3f}",
                f"{r['feature_similarity']:.4f}", f"{r['fd_heldout']:.3f}", str(r["batch"]),
            )  # fmt: skip
    console.print(table)
    written = ["fidelity.json", "fidelity.md", "fidelity-grid.png"]
    if bench is not None:
        if speed_fidelity_plot(record, bench, mode, output / "speed-fidelity.png"):
            written.append("speed-fidelity.png")
        else:
            console.print(f"no (method, ratio) of the bench file matched (mode {mode!r}): no plot")
    console.print(f"written to {output}: {', '.join(written)}")


def run_proxy_eval(args: Any, console: Console) -> int:
    from tokenreduce.quality.proxy.features import load_features
    from tokenreduce.quality.proxy.models import LATENT_IMAGE_KINDS, load_proxy

    kinds = list(args.kinds or (LATENT_IMAGE_KINDS if getattr(args, "latent", False) else KINDS))
    weights = Path(args.proxy_weights) if args.proxy_weights else None
    bench = json.loads(Path(args.speed).read_text(encoding="utf-8")) if args.speed else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    defaults = Protocol()
    protocol = Protocol(
        seeds_per_class=args.num_seeds or defaults.seeds_per_class,
        steps=args.steps or defaults.steps,
        guidance=defaults.guidance if args.guidance_scale is None else args.guidance_scale,
        batches=tuple(args.batches or defaults.batches),
        reference_crops=args.reference_crops,
    )
    if args.seeds:
        raise ValueError("--proxy uses seeds 0..N-1 per class: give --num-seeds N, not --seeds")
    if args.batch_size:
        raise ValueError("--proxy scores several batch sizes: give --batches B [B ...], not --batch-size")
    if getattr(args, "configs", None):
        variants = config_variants(kinds, args.configs, args.ratios)
    else:
        variants = sweep(kinds, tuple(args.ratios or RATIOS), knobs=not args.no_knobs)
    # Everything is loaded and validated before the first image is generated.
    pipes = {kind: load_proxy(kind, weights, device) for kind in kinds}
    features = load_features(weights, device)
    from tokenreduce.api import prepare

    for variant in variants:
        prepare(pipes[variant.kind], variant.config)
    console.print(f"{len(variants)} variants on {', '.join(kinds)} ({device})")
    result = evaluate(pipes, features, variants, protocol, console)
    write_reports(result, Path(args.output or "eval-proxy"), bench, args.speed_mode, console)
    return 0
