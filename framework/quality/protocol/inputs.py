"""The checks of everything an evaluation reads (prompt file, reference folder, feature models, the
pipeline and every run's config against it), all made before anything is generated and before the
model is modified; and the pipeline's loading and defaults."""

from __future__ import annotations

import importlib.util
import inspect
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tokenreduce.api import UnsupportedModelError
from tokenreduce.config import ConfigError
from tokenreduce.generate import DTYPES
from tokenreduce.quality.protocol.plan import Run
from tokenreduce.quality.protocol.settings import EvalSettings, ProtocolError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_prompts(path: Path, template: str = "{}", limit: int | None = None) -> list[str]:
    """The prompts of a text file, one a line (blank lines and ``#`` comments skipped), templated."""
    if not path.exists():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    if not path.is_file():
        raise ProtocolError(f"prompt file {str(path)!r} is not a file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"prompt file {str(path)!r} is not UTF-8 text: {exc}") from None
    prompts = [line.strip() for line in lines]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise ProtocolError(
            f"prompt file {str(path)!r} has no prompts (one a line; blank lines and lines starting with # are skipped)"
        )
    return [template.replace("{}", p) for p in prompts[:limit]]


def reference_images(folder: Path) -> list[Path]:
    """The images under a folder (sub-folders included), each checked to open; at least two."""
    from PIL import Image

    if not folder.exists():
        raise FileNotFoundError(f"reference folder {str(folder)!r} does not exist")
    if not folder.is_dir():
        raise ProtocolError(f"--reference {str(folder)!r} is not a folder")
    paths = sorted(
        p
        for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )
    if len(paths) < 2:
        raise ProtocolError(
            f"reference folder {str(folder)!r} has {len(paths)} image(s) ({' '.join(IMAGE_SUFFIXES)}); "
            "FID needs at least 2"
        )
    unreadable = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:  # PIL raises many kinds for a broken file
            unreadable.append(path)
    if unreadable:
        names = ", ".join(str(p) for p in unreadable[:5]) + (" ..." if len(unreadable) > 5 else "")
        raise ProtocolError(f"{len(unreadable)} reference image(s) cannot be read: {names}")
    return paths


def check_feature_models(settings: EvalSettings) -> None:
    """The feature models resolve (configs and processors, not weights) and FID's extractor is there."""
    from transformers import AutoConfig, AutoImageProcessor, CLIPProcessor

    for flag, name, processor in (
        ("--clip-model", settings.clip_model, CLIPProcessor),
        ("--dino-model", settings.dino_model, AutoImageProcessor),
    ):
        try:
            config = AutoConfig.from_pretrained(name)
            processor.from_pretrained(name)
        except (OSError, ValueError) as exc:
            raise ProtocolError(f"{flag} {name!r} cannot be loaded: {exc}") from None
        if flag == "--clip-model" and config.model_type != "clip":
            raise ProtocolError(
                f"--clip-model {name!r} is not a CLIP model (model_type {config.model_type!r})"
            )
    if settings.reference is not None and settings.fid_features == "inception":
        if importlib.util.find_spec("torch_fidelity") is None:
            raise ProtocolError(
                "--fid-features inception needs torch-fidelity (pip install torch-fidelity), which "
                "provides torchmetrics' Inception-v3; or use --fid-features dino"
            )
        if settings.inception_weights is not None and not settings.inception_weights.is_file():
            raise FileNotFoundError(f"--inception-weights {str(settings.inception_weights)!r} does not exist")


def model_id(model: str) -> str:
    """A local folder as an absolute path (so resuming from elsewhere matches); a hub id as is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def pipeline_index(model: str) -> dict[str, Any]:
    """``model_index.json`` of a pipeline (read before loading any weights)."""
    from diffusers import DiffusionPipeline

    path = Path(model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{model!r} is a folder without model_index.json: not a diffusers pipeline")
    try:
        index = dict(DiffusionPipeline.load_config(model))
    except (OSError, ValueError) as exc:
        raise ProtocolError(
            f"cannot find the pipeline {model!r} (a local diffusers pipeline folder, or a hub id "
            f"that is cached or can be downloaded): {exc}"
        ) from None
    if not any(isinstance(index.get(k), list) and index[k][0] for k in ("unet", "transformer")):
        raise UnsupportedModelError(
            f"{index.get('_class_name', 'the pipeline')} at {model!r} has neither a `unet` nor a `transformer`"
        )
    return index


def default_dtype(index: dict[str, Any], device: torch.device) -> str:
    """fp32 on a CPU; on a GPU bf16 for transformer (Flux-like) pipelines and fp16 for UNets."""
    if device.type == "cpu":
        return "fp32"
    return "bf16" if isinstance(index.get("transformer"), list) and index["transformer"][0] else "fp16"


def load_eval_pipeline(model: str, dtype: str) -> Any:
    """The pipeline on the CPU (moved to a process's device only if it has images to make)."""
    from tokenreduce.generate import load_pipeline

    try:
        pipe = load_pipeline(model, "cpu", DTYPES[dtype])
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ProtocolError(f"cannot load the pipeline {model!r}: {exc}") from None
    pipe.set_progress_bar_config(disable=True)  # ours counts images per process
    return pipe


def call_default(pipe: Any, name: str) -> Any:
    """The default of one of the pipeline's call arguments (``None`` if it has none)."""
    parameter = inspect.signature(pipe.__call__).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


def resolved_size(pipe: Any, height: int | None, width: int | None) -> tuple[int | None, int | None]:
    """The image size in pixels: as given, else the pipeline's default (``None`` if unknown)."""
    sample, scale = getattr(pipe, "default_sample_size", None), getattr(pipe, "vae_scale_factor", None)
    default = sample * scale if isinstance(sample, int) and isinstance(scale, int) else None
    return height or default, width or default


def validate_runs(pipe: Any, runs: Sequence[Run], size: tuple[int, int] | None) -> dict[str, Any]:
    """Each run's resolved config (``None`` for the baseline), checked against the pipeline without
    modifying it; with ``size`` (pixels, given by the user) also the token grids at that size."""
    from tokenreduce.api import find_denoiser, prepare

    find_denoiser(pipe)  # UnsupportedModelError for a pipeline without a supported denoiser
    dumps: dict[str, Any] = {}
    for run in runs:
        if run.config is None:
            dumps[run.name] = None
            continue
        try:
            model, _, adapter, runtime, _ = prepare(pipe, run.config, **run.overrides)
            if size is not None:
                try:
                    grids = adapter.grids_for(model, *size)
                except NotImplementedError:
                    grids = {}
                with warnings.catch_warnings():  # the small-grid warning becomes the error below
                    warnings.filterwarnings("ignore", "token grid .* run unmerged", UserWarning)
                    for grid in set(grids.values()):
                        runtime.layout(grid)
                if runtime.unmerged:
                    # Generation would run those levels unmerged (with a warning): an evaluation
                    # must measure the config it names, so refuse the size instead.
                    small = ", ".join("x".join(map(str, g)) for g in sorted(runtime.unmerged))
                    raise ValueError(
                        f"token grid {small} is smaller than partitioner {runtime.partitioner.name!r} needs "
                        f"{runtime.partitioner.min_grid()}; choose a larger size or a smaller partitioner"
                    )
        except (ConfigError, UnsupportedModelError) as exc:
            raise type(exc)(f"{run.name}: {exc}") from None
        except ValueError as exc:
            where = f" at height {size[0]}, width {size[1]}" if size is not None else ""
            raise ConfigError(f"{run.name}{where}: {exc}") from None
        dumps[run.name] = json.loads(json.dumps(runtime.config.model_dump(mode="json")))
    return dumps
