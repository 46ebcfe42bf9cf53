"""``tokenreduce generate``: one image from a real diffusers pipeline, with and without reduction."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
from rich.console import Console

from tokenreduce.api import apply, get_handle, prepare

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: Denoising steps of the untimed generation that precedes each timed one (first-call set-up:
#: kernels, allocator, lazy layouts), so neither variant is timed cold.
WARMUP_STEPS = 2


def environment() -> dict[str, Any]:
    """Versions and device, for result records."""
    import diffusers

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "platform": platform.platform(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def load_pipeline(model: str, device: str, dtype: torch.dtype) -> Any:
    from diffusers import DiffusionPipeline

    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{model!r} is a folder without model_index.json: not a diffusers pipeline")
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=dtype)
    return pipe.to(device)


def generate(
    *,
    model: str,
    config: Any,
    prompt: str,
    steps: int,
    seed: int,
    height: int | None,
    width: int | None,
    device: str | None,
    dtype: str | None,
    output: Path,
    baseline: bool,
    console: Console,
) -> dict[str, Any]:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = DTYPES[dtype] if dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    pipe = load_pipeline(model, device, torch_dtype)
    prepare(pipe, config)  # fail on a bad config before generating anything
    output.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {"prompt": prompt, "num_inference_steps": steps}
    if height:
        kwargs["height"] = height
    if width:
        kwargs["width"] = width
    record: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "steps": steps,
        "seed": seed,
        "env": environment(),
        "warmup_steps": min(steps, WARMUP_STEPS),
    }
    warmup = {"num_inference_steps": record["warmup_steps"]}

    def run(name: str) -> None:
        pipe(generator=torch.Generator(device="cpu").manual_seed(seed), **(kwargs | warmup))
        handle = get_handle(pipe)
        if handle is not None:
            handle.reset()  # the timed generation starts from fresh plans and seeds, as a cold one would
        generator = torch.Generator(device="cpu").manual_seed(seed)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = perf_counter()
        image = pipe(generator=generator, **kwargs).images[0]
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = perf_counter() - start
        path = output / f"{name}.png"
        image.save(path)
        record[name] = {"seconds": round(seconds, 4), "image": str(path)}
        console.print(f"{name}: {seconds:.2f} s -> {path}")

    if baseline:
        run("baseline")
    handle = apply(pipe, config)
    record["config"] = handle.config.model_dump(mode="json")
    try:
        run("reduced")
    finally:
        handle.remove()
    if baseline:
        record["speedup"] = round(record["baseline"]["seconds"] / record["reduced"]["seconds"], 4)
    (output / "record.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    console.print(f"record -> {output / 'record.json'}")
    return record
