"""A paired comparison of two configurations on the proxies: same images, same seeds, per image.

``python -m tokenreduce.quality.paired --base '{"features": "float32"}' --change '{"features": "model"}'
--dtype bf16 -o OUT.json``

For each proxy (default: the latent image proxies) and each schedule (the preset's, and merging at
every step, which shows differences the preset's schedule hides), the unmodified proxy, its default
ToMA preset with ``--base`` merged in (A) and with ``--change`` merged in (B) generate the demo's classes from the
same seeds, one image per call. Per image: PSNR, SSIM and feature similarity of A and of B against
the unmodified image, and their differences (B - A). Reported: the means, the mean paired differences
and their standard errors, the median differences, on how many images each side is ahead with the Wilcoxon signed-rank p,
PSNR between A and B (how far the change moves the images), and the per-image scores.

``--first-seed`` moves the seed range (test a choice on seeds it was not made on); a run split
into parts over consecutive ranges (e.g. one process each) is put back together with
``--join PART.json ... -o OUT.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from tokenreduce.quality import metrics
from tokenreduce.quality.proxy.models import LATENT_IMAGE_KINDS, spec

METRICS = ("psnr", "ssim", "feature_similarity")
#: The names of each metric's mean paired difference in a row, and their unit suffix.
DIFFERENCE_NAMES = {
    "psnr": ("paired_difference", "_db"),
    "ssim": ("ssim_paired_difference", ""),
    "feature_similarity": ("feature_similarity_paired_difference", ""),
}
#: What makes two rows the same comparison (rows that may be joined).
COMPARISON = ("kind", "schedule", "base", "change", "dtype", "steps")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCHEDULES: dict[str, dict[str, Any] | None] = {"preset": None, "always": {"name": "always"}}


def _images(pipe: Any, labels: list[int], seeds: list[int], steps: int) -> torch.Tensor:
    return torch.cat([pipe([label], [seed], steps=steps) for label, seed in zip(labels, seeds, strict=True)])


def compare(
    kinds: Sequence[str],
    change: dict[str, Any],
    base_change: dict[str, Any] | None = None,
    dtype: str = "fp32",
    steps: int = 20,
    num_seeds: int = 8,
    device: str = "cpu",
    schedules: Sequence[str] = tuple(SCHEDULES),
    log: Any = print,
    first_seed: int = 0,
) -> list[dict[str, Any]]:
    from tokenreduce.api import apply
    from tokenreduce.demo import DEMO_CLASSES
    from tokenreduce.quality.fidelity import config_for
    from tokenreduce.quality.proxy.features import load_features
    from tokenreduce.quality.proxy.models import load_proxy

    features = load_features(None, device)
    rows = []
    for kind in kinds:
        pipe = load_proxy(kind, None, device, DTYPES[dtype])
        # Each seed keeps its class whatever the range, so runs over split or shifted ranges pair up.
        seeds = list(range(first_seed, first_seed + num_seeds))
        labels = [pipe.class_names.index(DEMO_CLASSES[seed % len(DEMO_CLASSES)]) for seed in seeds]
        base = _images(pipe, labels, seeds, steps)
        base_embeddings = metrics.embed(features, metrics.frames(base).float())
        preset = f"toma-{spec(kind).arch}"
        for label, schedule in ((name, SCHEDULES[name]) for name in schedules):
            scheduled = {} if schedule is None else {"schedule": schedule}
            a = config_for(kind, preset, **scheduled, **(base_change or {}))
            b = config_for(kind, preset, **scheduled, **change)
            scores = {}
            out = {}
            for name, config in (("a", a), ("b", b)):
                with apply(pipe, config):
                    out[name] = _images(pipe, labels, seeds, steps)
                scores[name] = metrics.same_seed(features, out[name].float(), base.float(), base_embeddings)
            # Per image, in seed order, so a later comparison (or a join of split runs) can pair with these.
            per_image = {
                f"{metric}_{name}_per_image": [round(float(x), 6) for x in scores[name][metric]]
                for name in ("a", "b")
                for metric in METRICS
            }
            row = {
                "kind": kind,
                "preset": preset,
                "schedule": label,
                "base": base_change or {},
                "change": change,
                "dtype": dtype,
                "steps": steps,
                "seeds": num_seeds,
                "first_seed": first_seed,
                **summary(per_image),
                "psnr_a_vs_b": float(metrics.psnr_per_item(out["b"], out["a"]).mean()),
                **per_image,
            }
            rows.append(row)
            log(
                f"{kind} ({dtype}), {label}: A {row['psnr_a']:.2f} dB, B {row['psnr_b']:.2f} dB, "
                f"B - A {row['paired_difference_db']:+.2f} +- {row['paired_difference_sem_db']:.2f} dB, "
                f"A vs B {row['psnr_a_vs_b']:.1f} dB; feature similarity A {row['feature_similarity_a']:.5f}, "
                f"B {row['feature_similarity_b']:.5f}, B - A {row['feature_similarity_paired_difference']:+.5f} "
                f"+- {row['feature_similarity_paired_difference_sem']:.5f}"
            )
    return rows


def summary(per_image: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Per metric: the means of A and B, the mean paired difference (B - A) and its standard error,
    the median difference (a mean carried by a few images shows here), on how many images each is
    ahead, and the two-sided Wilcoxon signed-rank p of the differences (null for fewer than two
    non-zero differences)."""
    from scipy.stats import wilcoxon  # lazy: only the quality tools need scipy

    out: dict[str, Any] = {}
    for metric in METRICS:
        a = torch.tensor(per_image[f"{metric}_a_per_image"], dtype=torch.float64)
        b = torch.tensor(per_image[f"{metric}_b_per_image"], dtype=torch.float64)
        name, unit = DIFFERENCE_NAMES[metric]
        mean, sem = metrics.mean_and_sem(b - a)
        differences = (b - a)[b != a]
        p = float(wilcoxon(differences.numpy()).pvalue) if len(differences) > 1 else None
        out |= {
            f"{metric}_a": float(a.mean()),
            f"{metric}_b": float(b.mean()),
            f"{name}{unit}": mean,
            f"{name}_sem{unit}": sem,
            f"{metric}_median_difference{unit}": float((b - a).quantile(0.5)),
            f"{metric}_a_higher": int((a > b).sum()),
            f"{metric}_b_higher": int((b > a).sum()),
            f"{metric}_wilcoxon_p": p,
        }
    return out


def join(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One record from the records of one comparison run over consecutive seed ranges (a run split
    into parts, e.g. to spread it over processes): the rows with the per-image scores put together
    and the summary recomputed, as the whole run would have written them."""
    if not records:
        raise ValueError("nothing to join: give the records of the parts")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for record in records:
        for row in record["rows"]:
            groups.setdefault(json.dumps([row[k] for k in COMPARISON], sort_keys=True), []).append(row)
    if len({len(parts) for parts in groups.values()}) > 1:
        raise ValueError("the parts do not all hold the same comparisons; join the parts of one run only")

    def first(row: Mapping[str, Any]) -> int:
        return row.get("first_seed", 0)  # records from before --first-seed start at 0

    rows = []
    for parts in groups.values():
        parts = sorted(parts, key=first)
        for before, after in pairwise(parts):
            end = first(before) + before["seeds"]
            if first(after) != end:
                raise ValueError(
                    f"{after['kind']}, {after['schedule']}: the parts' seeds are not one range (a part "
                    f"ends before seed {end}, the next starts at {first(after)}); join parts "
                    "that follow each other, each once"
                )
        seeds = sum(row["seeds"] for row in parts)
        per_image = {
            key: [x for row in parts for x in row[key]] for key in parts[0] if key.endswith("_per_image")
        }
        rows.append(
            {
                **{k: parts[0][k] for k in COMPARISON},
                "preset": parts[0]["preset"],
                "seeds": seeds,
                "first_seed": first(parts[0]),
                **summary(per_image),
                "psnr_a_vs_b": sum(row["psnr_a_vs_b"] * row["seeds"] for row in parts) / seeds,
                **per_image,
            }
        )
    return {"rows": rows, "parts": [_without_output(record.get("command", "")) for record in records]}


def _without_output(command: str) -> str:
    """A part's command without its ``-o`` file (where the part was written is no part of the result)."""
    words = shlex.split(command)
    for flag in ("-o", "--output"):
        if flag in words:
            i = words.index(flag)
            del words[i : i + 2]
    return shlex.join(words)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument(
        "--base", default="{}", help="JSON merged into each preset to make A (default: the preset)"
    )
    p.add_argument("--change", help="JSON merged into each preset to make B (required unless --join)")
    p.add_argument(
        "--join",
        nargs="+",
        metavar="RECORD",
        help="instead of running: join the records of one run made in parts over consecutive seed ranges",
    )
    p.add_argument("--kinds", nargs="+", default=list(LATENT_IMAGE_KINDS))
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="the proxies' dtype (default fp32)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, default=8, help="how many seeds (one image each)")
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="the first seed (default 0): a range apart from the one a choice was made on tests it fairly",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--schedules",
        nargs="+",
        choices=list(SCHEDULES),
        default=list(SCHEDULES),
        help="merge schedules compared",
    )
    p.add_argument("-o", "--output", default=None, help="JSON file for the rows")
    args = p.parse_args(argv)
    command = "python -m tokenreduce.quality.paired " + shlex.join(sys.argv[1:] if argv is None else argv)
    if args.join:
        parts = [json.loads(Path(name).read_text(encoding="utf-8")) for name in args.join]
        if len({part["device"] for part in parts}) > 1:
            p.error("--join: the parts ran on different devices; join the parts of one run only")
        try:
            joined = join(parts)
        except ValueError as error:
            p.error(f"--join: {error}")
        first = parts[0]
        record = {"command": command, "date": first["date"], "device": first["device"], "env": first["env"]}
        _write(args.output, record | joined)
        return 0
    if args.change is None:
        p.error("--change is required (or --join to join records)")
    rows = compare(
        args.kinds,
        json.loads(args.change),
        json.loads(args.base),
        args.dtype,
        args.steps,
        args.seeds,
        args.device,
        args.schedules,
        first_seed=args.first_seed,
    )
    if args.output:
        import datetime

        from tokenreduce.generate import environment

        record = {
            "command": command,
            "date": datetime.date.today().isoformat(),
            "device": args.device,
            "env": environment(),
            "rows": rows,
        }
        _write(args.output, record)
    return 0


def _write(output: str | None, record: Mapping[str, Any]) -> None:
    if output:
        Path(output).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    else:
        print(json.dumps(record, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
