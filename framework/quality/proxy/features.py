"""A small fixed feature extractor for the proxies' images (the role DINO and Inception play on
real images): a CNN trained to tell the photographs apart from 64x64 crops. Its pooled features
give the feature similarity and the Frechet distance of the fidelity benchmark.

Larger images are resized to 64x64 first: the latent proxies' 128x128 images are crops of the
photographs at twice the scale, so resized they show what a 64x64 training crop shows."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CROP = 64  # the crop size the extractor is trained on


def _stage(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU())


class ProxyFeatures(nn.Module):
    """Images ``(N, 3, H, W)`` in [0, 1] -> features ``(N, num_features)``."""

    num_features = 128

    def __init__(self, num_classes: int = 8) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _stage(3, 32, 1), _stage(32, 64, 2), _stage(64, 96, 2), _stage(96, self.num_features, 2)
        )
        self.head = nn.Linear(self.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.head.weight.dtype) * 2 - 1
        if x.shape[-2:] != (CROP, CROP):
            x = F.interpolate(x, size=(CROP, CROP), mode="bilinear", antialias=True)
        return self.body(x).mean(dim=(2, 3))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward(images))


def features_path(folder: Path | None = None) -> Path:
    from tokenreduce.quality.proxy.models import WEIGHTS_DIR

    return (folder or WEIGHTS_DIR) / "features.safetensors"


def load_features(folder: Path | None = None, device: str = "cpu") -> ProxyFeatures:
    from safetensors.torch import load_file

    path = features_path(folder)
    if not path.is_file():
        raise FileNotFoundError(
            f"no proxy feature extractor at {path}: train it with `tokenreduce train-proxies`"
        )
    state = load_file(str(path))
    model = ProxyFeatures(num_classes=state["head.weight"].shape[0])
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval().to(device)
