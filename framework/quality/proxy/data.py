"""Training and held-out crops from the photographs bundled inside the scikit-image wheel.

Each photograph is one class (one "prompt"). Photos are scaled so their short side is
``short_side`` pixels; the top ``1 - heldout`` of every photo is the training region, the bottom
band is held out: Frechet distances are measured against crops the proxies never saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# class name -> scikit-image loader (all bundled in the wheel: no download).
PHOTOS: dict[str, str] = {
    "astronaut": "astronaut",
    "cat": "chelsea",
    "coffee": "coffee",
    "rocket": "rocket",
    "motorcycle": "stereo_motorcycle",
    "galaxies": "hubble_deep_field",
    "retina": "retina",
    "cells": "immunohistochemistry",
}


def load_photo(loader: str) -> np.ndarray:
    try:
        import skimage.data
    except ModuleNotFoundError as exc:  # pragma: no cover - depends on the install
        raise ModuleNotFoundError(
            "the proxy models are trained on scikit-image's bundled photographs: pip install 'tokenreduce[eval]'"
        ) from exc
    image = getattr(skimage.data, loader)()
    if isinstance(image, tuple):  # stereo_motorcycle -> (left, right, disparity)
        image = image[0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return np.ascontiguousarray(image[..., :3])


@dataclass
class PhotoBank:
    """Per class: a training region and a held-out band, float tensors ``(3, h, w)`` in [-1, 1]."""

    names: list[str]
    train: list[torch.Tensor]
    heldout: list[torch.Tensor]

    def to(self, device: torch.device | str) -> PhotoBank:
        return PhotoBank(self.names, [t.to(device) for t in self.train], [t.to(device) for t in self.heldout])


def photo_bank(short_side: int = 224, heldout: float = 0.3) -> PhotoBank:
    train, held = [], []
    for loader in PHOTOS.values():
        image = torch.from_numpy(load_photo(loader)).permute(2, 0, 1).float()[None] / 127.5 - 1.0
        h, w = image.shape[-2:]
        scale = short_side / min(h, w)
        image = F.interpolate(
            image, size=(round(h * scale), round(w * scale)), mode="bilinear", antialias=True
        )[0].clamp(-1, 1)
        split = round(image.shape[1] * (1 - heldout))
        train.append(image[:, :split].contiguous())
        held.append(image[:, split:].contiguous())
    return PhotoBank(list(PHOTOS), train, held)


def sample_crops(
    regions: list[torch.Tensor], count: int, size: int, generator: torch.Generator, flip: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` random ``size x size`` crops (classes uniform) and their class labels."""
    device = regions[0].device
    labels = torch.randint(len(regions), (count,), generator=generator, device=generator.device).to(device)
    crops = torch.empty(count, 3, size, size, device=device)
    u = torch.rand(count, 3, generator=generator, device=generator.device).to(device)
    for c, region in enumerate(regions):
        rows = (labels == c).nonzero().flatten()
        if rows.numel() == 0:
            continue
        h, w = region.shape[-2:]
        if h < size or w < size:
            raise ValueError(f"region {h}x{w} of class {c} is smaller than the {size}x{size} crop")
        top = (u[rows, 0] * (h - size + 1)).long()
        left = (u[rows, 1] * (w - size + 1)).long()
        # Gather every crop of this class at once through an index grid.
        ii = top[:, None] + torch.arange(size, device=device)[None]
        jj = left[:, None] + torch.arange(size, device=device)[None]
        crops[rows] = region[:, ii[:, :, None], jj[:, None, :]].permute(1, 0, 2, 3)
    if flip:
        mirrored = u[:, 2] < 0.5
        crops[mirrored] = crops[mirrored].flip(-1)
    return crops, labels
