"""The protocol end to end: check the inputs, make the missing images over the processes of an
``accelerate launch``, then measure and report on the main process."""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
from typing import Any

import torch
from rich.console import Console

from tokenreduce.quality.protocol.generation import (
    MANIFEST,
    check_manifest,
    generate_batches,
    pipeline_kwargs,
    read_timings,
    write_atomic,
)
from tokenreduce.quality.protocol.inputs import (
    call_default,
    check_feature_models,
    default_dtype,
    load_eval_pipeline,
    model_id,
    pipeline_index,
    read_prompts,
    reference_images,
    resolved_size,
    validate_runs,
)
from tokenreduce.quality.protocol.plan import image_path, plan_batches, plan_runs
from tokenreduce.quality.protocol.report import results_record, run_results, write_results
from tokenreduce.quality.protocol.scoring import measure
from tokenreduce.quality.protocol.settings import EvalSettings, ProtocolError


def require_packages() -> None:
    missing = [
        name
        for name in ("transformers", "accelerate", "torchmetrics", "tqdm")
        if importlib.util.find_spec(name) is None
    ]
    if missing:
        raise ProtocolError(
            f"tokenreduce eval --model needs {', '.join(missing)}: pip install 'tokenreduce[eval]'"
        )


def _state() -> Any:
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    # Several processes without CUDA (tests, CPU clusters) communicate through gloo.
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (
        "LOCAL_RANK" in os.environ and not torch.cuda.is_available()
    )
    return PartialState(cpu=cpu)


def evaluate(settings: EvalSettings, console: Console) -> dict[str, Any] | None:
    """Run the protocol; the record on the main process, ``None`` on the others."""
    require_packages()
    from accelerate.utils import gather_object

    state = _state()
    main = state.is_main_process
    device = torch.device("cpu") if state.device.type == "cpu" else state.device
    say = console.print if main else (lambda *a, **k: None)

    # Inputs, cheapest checks first; nothing is generated or modified until all pass.
    prompts = read_prompts(settings.prompts_file, settings.prompt_template, settings.limit)
    reference = reference_images(settings.reference) if settings.reference is not None else []
    runs = plan_runs(settings.configs, settings.ratios)
    check_feature_models(settings)
    index = pipeline_index(settings.model)
    dtype = settings.dtype or default_dtype(index, device)
    pipe = load_eval_pipeline(settings.model, dtype)
    height, width = resolved_size(pipe, settings.height, settings.width)
    given = settings.height is not None or settings.width is not None
    dumps = validate_runs(pipe, runs, (height, width) if given and height and width else None)
    resolved = {
        "model": model_id(settings.model),
        "steps": settings.steps or call_default(pipe, "num_inference_steps"),
        "height": height,
        "width": width,
        "guidance_scale": (
            settings.guidance_scale
            if settings.guidance_scale is not None
            else call_default(pipe, "guidance_scale")
        ),
        "dtype": dtype,
    }
    manifest = check_manifest(settings.output, {**resolved, "prompts": prompts, "runs": dumps})
    state.wait_for_everyone()
    if main:
        write_atomic(settings.output / "images" / MANIFEST, json.dumps(manifest, indent=2) + "\n")

    batches = plan_batches(runs, len(prompts), settings.seeds, settings.batch_size)
    pending = [[i for i in b if not image_path(settings.output, i).is_file()] for b in batches]
    pending = [b for b in pending if b]
    total = sum(len(b) for b in batches)
    todo = sum(len(b) for b in pending)
    say(
        f"{len(runs)} runs x {len(prompts)} prompts x {len(settings.seeds)} seeds = {total} images; "
        f"{total - todo} already made, {todo} to make on {state.num_processes} process(es)"
    )
    state.wait_for_everyone()  # every process has listed what exists before any image is written

    with state.split_between_processes(pending) as mine:
        stats = generate_batches(
            pipe,
            mine,
            {r.name: r for r in runs},
            prompts,
            pipeline_kwargs(settings),
            settings.output,
            device,
            state.process_index,
        )
    processes = gather_object([stats])
    state.wait_for_everyone()
    del pipe
    gc.collect()
    if not main:
        return None
    if device.type == "cuda":
        torch.cuda.empty_cache()

    metrics = measure(settings, runs, prompts, reference, device, console)
    timings = read_timings(settings.output)
    record = results_record(
        settings,
        resolved,
        prompt_count=len(prompts),
        reference_images=len(reference),
        process_count=state.num_processes,
        processes=processes,
        runs=run_results(runs, dumps, metrics, timings, len(prompts), settings.seeds),
    )
    write_results(settings.output, record, console)
    return record


def run_model_eval(args: argparse.Namespace, console: Console) -> int:
    """``tokenreduce eval --model``: exit code 0 (errors raise, and the command line prints them)."""
    evaluate(EvalSettings.from_args(args), console)
    return 0
