"""Making the images: data-parallel, resumable (each image is written as it finishes, and the
manifest records what the stored images were made with), with one timing line per image."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from tokenreduce.quality.protocol.plan import Item, Run, image_path
from tokenreduce.quality.protocol.settings import EvalSettings, ProtocolError

MANIFEST = "manifest.json"  # under OUTPUT/images: the settings the stored images were made with


def pipeline_kwargs(settings: EvalSettings) -> dict[str, Any]:
    """The pipeline call's arguments besides prompts and generators (the pipeline's defaults otherwise)."""
    kwargs: dict[str, Any] = {"output_type": "pil"}
    for key, value in (
        ("num_inference_steps", settings.steps),
        ("height", settings.height),
        ("width", settings.width),
        ("guidance_scale", settings.guidance_scale),
    ):
        if value is not None:
            kwargs[key] = value
    return kwargs


def check_manifest(output: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest to store: the stored one extended, if the stored images were made alike."""
    path = output / "images" / MANIFEST
    if not path.is_file():
        return manifest
    stored = json.loads(path.read_text(encoding="utf-8"))
    differences = [
        f"{key}: {stored.get(key)!r} there, {manifest[key]!r} now"
        for key in ("model", "steps", "height", "width", "guidance_scale", "dtype")
        if stored.get(key) != manifest[key]
    ]
    for i, (old, new) in enumerate(zip(stored.get("prompts", []), manifest["prompts"], strict=False)):
        if old != new:
            differences.append(f"prompt {i}: {old!r} there, {new!r} now")
            break
    runs = stored.get("runs", {})
    differences += [
        f"run {name}: another config"
        for name in sorted(runs.keys() & manifest["runs"].keys())
        if runs[name] != manifest["runs"][name]
    ]
    if differences:
        raise ProtocolError(
            f"{str(output)!r} holds images made with other settings ({'; '.join(differences)}): "
            f"use another --output, or delete {str(path.parent)!r} to start over"
        )
    longer = stored["prompts"] if len(stored["prompts"]) > len(manifest["prompts"]) else manifest["prompts"]
    return {**manifest, "prompts": longer, "runs": {**runs, **manifest["runs"]}}


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def save_image_atomic(image: Any, path: Path) -> None:
    """Write a temporary file, then rename: a stored image is always complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_batches(
    pipe: Any,
    batches: Sequence[Sequence[Item]],
    runs: dict[str, Run],
    prompts: Sequence[str],
    call_kwargs: dict[str, Any],
    output: Path,
    device: torch.device,
    process: int,
) -> dict[str, Any]:
    """Make this process's images; one timing line per image in ``OUTPUT/timings``."""
    from tqdm.auto import tqdm

    from tokenreduce.api import apply

    stats: dict[str, Any] = {"index": process, "device": str(device), "generated": 0, "seconds": 0.0}
    if not batches:
        return stats
    pipe.to(device)
    log_path = output / "timings" / f"process{process}.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    total = sum(len(b) for b in batches)
    handle, current, first = None, None, True
    with (
        log_path.open("a", encoding="utf-8") as log,
        tqdm(
            total=total, desc=f"process {process}", unit="image", position=process, dynamic_ncols=True
        ) as bar,
    ):
        try:
            for batch in batches:
                run = runs[batch[0].run]
                if run.name != current:
                    if handle is not None:
                        handle.remove()
                        handle = None
                    if run.config is not None:
                        handle = apply(pipe, run.config, **run.overrides)
                    current = run.name
                    bar.set_postfix_str(run.name)
                generators = [torch.Generator(device="cpu").manual_seed(item.seed) for item in batch]
                _sync(device)
                start = time.perf_counter()
                images = pipe(
                    prompt=[prompts[item.prompt] for item in batch], generator=generators, **call_kwargs
                ).images
                _sync(device)
                seconds = time.perf_counter() - start
                now = time.time()
                for item, image in zip(batch, images, strict=True):
                    save_image_atomic(image, image_path(output, item))
                    record = {**asdict(item), "seconds": seconds / len(batch), "batch": len(batch)}
                    log.write(json.dumps({**record, "first": first, "time": now}) + "\n")
                log.flush()
                first = False
                stats["generated"] += len(batch)
                stats["seconds"] += seconds
                bar.update(len(batch))
        finally:
            if handle is not None:
                handle.remove()
    stats["seconds"] = round(stats["seconds"], 4)
    return stats


def read_timings(output: Path) -> dict[tuple[str, int, int], dict[str, Any]]:
    """The latest timing of every image made in this output folder."""
    latest: dict[tuple[str, int, int], dict[str, Any]] = {}
    for path in sorted((output / "timings").glob("process*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                key = (record["run"], record["prompt"], record["seed"])
            except (ValueError, KeyError):
                continue  # a line cut short by an interruption
            if key not in latest or record["time"] >= latest[key]["time"]:
                latest[key] = record
    return latest


def seconds_per_image(records: Sequence[dict[str, Any]]) -> float | None:
    """Mean generation time per image; each process's first batch (warm-up) is left out when the
    run has other timings."""
    warm = [r for r in records if not r.get("first")] or list(records)
    return round(sum(r["seconds"] for r in warm) / len(warm), 4) if warm else None
