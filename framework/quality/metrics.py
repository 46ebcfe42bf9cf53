"""Fidelity metrics on images in [0, 1], through torchmetrics.

Same-seed comparisons (reduced image vs the unmodified model's image): PSNR, SSIM and the cosine
similarity of a feature extractor's embeddings. Distribution distance: the Frechet distance of
the same features to a set of reference images.
"""

from __future__ import annotations

import torch
from torch import nn


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, ``(N,)``."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(images, references, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, ``(N,)``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(images, references, data_range=1.0, reduction="none")


@torch.no_grad()
def embed(features: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    device = next(features.parameters()).device
    return torch.cat(
        [features(images[i : i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)]
    )


def feature_similarity(features: nn.Module, images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image cosine similarity of the embeddings (the role DINO plays on real images)."""
    return torch.nn.functional.cosine_similarity(embed(features, images), embed(features, references), dim=-1)


@torch.no_grad()
def frechet_distance(features: nn.Module, images: torch.Tensor, references: torch.Tensor) -> float:
    """Frechet distance between the feature distributions of ``images`` and ``references``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    size = tuple(images.shape[1:])
    metric = FrechetInceptionDistance(feature=features, normalize=True, input_img_size=size)
    metric = metric.to(next(features.parameters()).device)
    for chunk, real in ((references, True), (images, False)):
        for i in range(0, len(chunk), 256):
            metric.update(chunk[i : i + 256].to(metric.device), real=real)
    return float(metric.compute())
