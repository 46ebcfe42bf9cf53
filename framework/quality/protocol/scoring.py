"""The measures of every run, on the main process: CLIP-T (image vs prompt), DINO (CLS cosine
similarity to the baseline's image of the same prompt and seed) and FID (against a reference folder,
on Inception-v3 or DINO features)."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from rich.console import Console
from torch import nn

from tokenreduce.quality.protocol.plan import Item, Run, image_path
from tokenreduce.quality.protocol.settings import EvalSettings, ProtocolError

if TYPE_CHECKING:
    from transformers import CLIPModel, PreTrainedModel

METRIC_BATCH = 32  # images per feature-model call when measuring


class _TensorFeatures(nn.Module):
    """A ``CLIPModel`` whose feature methods return tensors, as torchmetrics' CLIPScore expects
    (transformers 5 returns output objects: torchmetrics <= 1.9.0 fails on them)."""

    def __init__(self, model: CLIPModel) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(out: Any) -> torch.Tensor:
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_score_metric(name: str) -> Any:
    """torchmetrics ``CLIPScore`` for any CLIP model id or local folder (through the loader callable
    that torchmetrics accepts: its string form takes only a fixed list of hub ids)."""
    from torchmetrics.multimodal import CLIPScore
    from transformers import CLIPModel, CLIPProcessor

    def load() -> tuple[Any, Any]:
        return _TensorFeatures(CLIPModel.from_pretrained(name).eval()), CLIPProcessor.from_pretrained(name)

    # Only the main process measures: no synchronisation with the others.
    return CLIPScore(model_name_or_path=load, sync_on_compute=False)


class ClsFeatures(nn.Module):
    """CLS embedding of a ViT-like model (DINO) for uint8 images ``(N, 3, H, W)``; usable as
    torchmetrics FID's ``feature`` module."""

    def __init__(self, model: PreTrainedModel, processor: Any) -> None:
        super().__init__()
        self.model = model.eval()
        self.processor = processor
        self.num_features = int(model.config.hidden_size)

    @classmethod
    def from_pretrained(cls, name: str) -> ClsFeatures:
        from transformers import AutoImageProcessor, AutoModel

        return cls(AutoModel.from_pretrained(name), AutoImageProcessor.from_pretrained(name))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        inputs = self.processor(images=[image.cpu() for image in images], return_tensors="pt")
        out = self.model(pixel_values=inputs["pixel_values"].to(device))
        return out.last_hidden_state[:, 0].float()


def load_uint8(path: Path) -> torch.Tensor:
    """An image file as a ``(3, H, W)`` uint8 tensor."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def image_chunks(paths: Sequence[Path], size: int = METRIC_BATCH) -> Iterator[list[torch.Tensor]]:
    """Consecutive images in chunks of at most ``size``, each chunk of one image size."""
    chunk: list[torch.Tensor] = []
    for path in paths:
        image = load_uint8(path)
        if chunk and (len(chunk) == size or chunk[0].shape != image.shape):
            yield chunk
            chunk = []
        chunk.append(image)
    if chunk:
        yield chunk


@torch.no_grad()
def measure(
    settings: EvalSettings,
    runs: Sequence[Run],
    prompts: Sequence[str],
    reference: Sequence[Path],
    device: torch.device,
    console: Console,
) -> dict[str, dict[str, Any]]:
    """CLIP-T, DINO and FID of every run."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    pairs = [(p, s) for p in range(len(prompts)) for s in settings.seeds]
    paths = {r.name: [image_path(settings.output, Item(r.name, p, s)) for p, s in pairs] for r in runs}
    missing = [str(p) for ps in paths.values() for p in ps if not p.is_file()]
    if missing:
        raise ProtocolError(
            f"{len(missing)} image(s) were not made, e.g. {missing[0]}: run again to make them"
        )
    texts = [prompts[p] for p, _ in pairs]

    with console.status("loading the feature models"):
        clip = clip_score_metric(settings.clip_model).to(device)
        dino = ClsFeatures.from_pretrained(settings.dino_model).to(device)
    fid = None
    fid_note = None
    if settings.reference is None:
        fid_note = "no --reference folder given"
    else:
        with console.status(f"FID: features of {len(reference)} reference images ({settings.fid_features})"):
            weights = None
            if settings.fid_features == "inception" and settings.inception_weights is not None:
                weights = str(settings.inception_weights)
            feature: int | nn.Module = 2048 if settings.fid_features == "inception" else dino
            fid = FrechetInceptionDistance(
                feature=feature,
                reset_real_features=False,
                feature_extractor_weights_path=weights,
                sync_on_compute=False,
            ).to(device)
            for chunk in image_chunks(reference):
                fid.update(torch.stack(chunk).to(device), real=True)

    def cls_features(run_paths: Sequence[Path]) -> torch.Tensor:
        return torch.cat([dino(torch.stack(chunk).to(device)) for chunk in image_chunks(run_paths)])

    results: dict[str, dict[str, Any]] = {}
    baseline = None
    for run in runs:
        with console.status(f"measuring {run.name} ({len(paths[run.name])} images)"):
            clip.reset()
            for start in range(0, len(pairs), METRIC_BATCH):
                chunk = [load_uint8(p).to(device) for p in paths[run.name][start : start + METRIC_BATCH]]
                clip.update(chunk, texts[start : start + METRIC_BATCH])
            features = cls_features(paths[run.name])
            if baseline is None:  # the baseline is the first run
                baseline = features
            dino_mean = torch.nn.functional.cosine_similarity(features, baseline, dim=-1).mean()
            value, note = None, fid_note
            if fid is not None:
                if len(pairs) < 2:
                    note = "FID needs at least 2 images per run"
                else:
                    fid.reset()  # keeps the reference features
                    for chunk in image_chunks(paths[run.name]):
                        fid.update(torch.stack(chunk).to(device), real=False)
                    value = float(fid.compute())
                    if not math.isfinite(value):
                        value, note = None, "not finite (too few images for the feature size?)"
            results[run.name] = {
                "clip_t": float(clip.compute()),
                "dino": float(dino_mean),
                "fid": value,
                "fid_note": note,
            }
    return results
