"""The results: the record of an evaluation (``OUTPUT/results.json``), its markdown table
(``OUTPUT/results.md``) and its table on the console."""

from __future__ import annotations

import datetime
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from tokenreduce.quality.protocol.generation import seconds_per_image, write_atomic
from tokenreduce.quality.protocol.plan import Run
from tokenreduce.quality.protocol.settings import EvalSettings


def run_results(
    runs: Sequence[Run],
    dumps: dict[str, Any],
    metrics: dict[str, dict[str, Any]],
    timings: dict[tuple[str, int, int], dict[str, Any]],
    prompts: int,
    seeds: Sequence[int],
) -> list[dict[str, Any]]:
    """One entry per run: its config, measures, time per image and speed-up over the baseline."""
    results = []
    for run, dump in zip(runs, dumps.values(), strict=True):
        records = [
            timings[k] for k in ((run.name, p, s) for p in range(prompts) for s in seeds) if k in timings
        ]
        results.append(
            {
                "name": run.name,
                "config": dump,
                "ratio": None if dump is None else dump.get("ratio"),
                "images": prompts * len(seeds),
                **metrics[run.name],
                "seconds_per_image": seconds_per_image(records),
                "timed_images": len(records),
            }
        )
    base_seconds = results[0]["seconds_per_image"]
    for result in results:
        s = result["seconds_per_image"]
        result["speedup"] = round(base_seconds / s, 4) if base_seconds and s else None
    return results


def results_record(
    settings: EvalSettings,
    resolved: dict[str, Any],
    prompt_count: int,
    reference_images: int,
    process_count: int,
    processes: list[Any],
    runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """The record: inputs (the settings with the values ``resolved`` from the pipeline), software,
    processes and every run's results."""
    import accelerate
    import torchmetrics
    import transformers

    from tokenreduce.generate import environment

    inputs = (
        settings.record() | resolved | {"prompt_count": prompt_count, "reference_images": reference_images}
    )
    return {
        "protocol": "tokenreduce eval --model",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": inputs,
        "environment": environment()
        | {
            "accelerate": accelerate.__version__,
            "transformers": transformers.__version__,
            "torchmetrics": torchmetrics.__version__,
            "processes": process_count,
        },
        "processes": processes,
        "runs": runs,
    }


def write_results(output: Path, record: dict[str, Any], console: Console) -> None:
    """``results.json`` and ``results.md`` under ``output``; the table on the console."""
    output.mkdir(parents=True, exist_ok=True)
    write_atomic(output / "results.json", json.dumps(record, indent=2) + "\n")
    write_atomic(output / "results.md", markdown_table(record))
    console.print(rich_table(record))
    console.print(f"results -> {output / 'results.json'}, {output / 'results.md'}")


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(record: dict[str, Any]) -> str:
    inputs = record["inputs"]
    lines = [
        "# tokenreduce eval",
        "",
        f"Model `{inputs['model']}`; {inputs['prompt_count']} prompts x {len(inputs['seeds'])} seeds, "
        f"{inputs['steps']} steps, {inputs['height']}x{inputs['width']} pixels, {inputs['dtype']}. "
        f"CLIP-T: `{inputs['clip_model']}` (CLIPScore, 0-100); DINO: CLS cosine similarity to the "
        f"baseline's image, `{inputs['dino_model']}`; FID: {inputs['fid_features']} features"
        + (f" against `{inputs['reference']}`." if inputs["reference"] else " (no reference folder)."),
        "",
        "| run | ratio | images | CLIP-T | DINO | FID | s/image | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]

    for run in record["runs"]:
        lines.append(
            f"| {run['name']} | {_fmt(run['ratio'], 'g')} | {run['images']} | {_fmt(run['clip_t'], '.2f')} | "
            f"{_fmt(run['dino'], '.4f')} | {_fmt(run['fid'], '.2f')} | {_fmt(run['seconds_per_image'], '.3f')} | "
            f"{_fmt(run['speedup'], '.2f')} |"
        )
    notes = sorted({r["fid_note"] for r in record["runs"] if r["fid_note"]})
    if notes:
        lines += ["", *(f"FID not given: {note}." for note in notes)]
    return "\n".join(lines) + "\n"


def rich_table(record: dict[str, Any]) -> Table:
    table = Table(title=f"tokenreduce eval: {record['inputs']['model']}")
    for column in ("run", "ratio", "images", "CLIP-T", "DINO", "FID", "s/image", "speed-up"):
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=column == "run")
    for run in record["runs"]:
        cells = [
            _fmt(run["ratio"], "g"),
            str(run["images"]),
            _fmt(run["clip_t"], ".2f"),
            _fmt(run["dino"], ".4f"),
            _fmt(run["fid"], ".2f"),
            _fmt(run["seconds_per_image"], ".3f"),
            _fmt(run["speedup"], ".2f"),
        ]
        table.add_row(run["name"], *cells)
    return table
