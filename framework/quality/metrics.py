"""Fidelity metrics on images in [0, 1] (SSIM and the Frechet distance through torchmetrics).

Same-seed comparisons (reduced image vs the unmodified model's image): PSNR, SSIM and the cosine
similarity of a feature extractor's embeddings. Distribution distance: the Frechet distance of
the same features to a set of reference images.
"""

from __future__ import annotations

import torch
from torch import nn


def psnr(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB, ``(N,)`` (plain torch, so the demo needs no metrics library; equal to
    torchmetrics' ``peak_signal_noise_ratio(..., data_range=1.0, reduction="none", dim=(1, 2, 3))``)."""
    mse = (images.float() - references.float()).square().mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(1.0 / mse)


def ssim(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM, ``(N,)``."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    out = structural_similarity_index_measure(images, references, data_range=1.0, reduction="none")
    assert isinstance(out, torch.Tensor)  # a tuple only with return_full_image / contrast sensitivity
    return out


@torch.no_grad()
def embed(features: nn.Module, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    device = next(features.parameters()).device
    return torch.cat(
        [features(images[i : i + batch].to(device)).float().cpu() for i in range(0, len(images), batch)]
    )


def frames(images: torch.Tensor) -> torch.Tensor:
    """Images as they are; videos ``(N, F, C, H, W)`` as their ``N * F`` frames."""
    return images.flatten(0, 1) if images.ndim == 5 else images


def psnr_per_item(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """:func:`psnr` per image, ``(N,)``; videos ``(N, F, C, H, W)``: the mean over their frames."""
    return psnr(frames(images), frames(references)).view(len(images), -1).mean(1)


def mean_and_sem(differences: torch.Tensor) -> tuple[float, float]:
    """Mean of per-image differences and its standard error (0 for a single image), in float64."""
    d = differences.double()
    return float(d.mean()), (float(d.std() / len(d) ** 0.5) if len(d) > 1 else 0.0)


def same_seed(
    features: nn.Module,
    images: torch.Tensor,
    references: torch.Tensor,
    reference_embeddings: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """PSNR, SSIM and feature similarity of each image to its reference, ``(N,)`` each. Videos
    ``(N, F, C, H, W)`` are scored frame by frame and averaged per video."""
    n = len(images)
    shots, refs = frames(images), frames(references)
    if reference_embeddings is None:
        reference_embeddings = embed(features, refs)
    similarity = torch.nn.functional.cosine_similarity(embed(features, shots), reference_embeddings, dim=-1)
    return {
        "psnr": psnr(shots, refs).view(n, -1).mean(1),
        "ssim": ssim(shots, refs).view(n, -1).mean(1),
        "feature_similarity": similarity.view(n, -1).mean(1),
    }


class FrechetDistance:
    """Frechet distance of feature distributions to a fixed reference set, whose features are
    computed once (torchmetrics keeps them across resets)."""

    def __init__(self, features: nn.Module, references: torch.Tensor) -> None:
        from torchmetrics.image.fid import FrechetInceptionDistance

        channels, height, width = references.shape[1:]
        self.metric = FrechetInceptionDistance(
            feature=features,
            normalize=True,
            input_img_size=(channels, height, width),
            reset_real_features=False,
        ).to(next(features.parameters()).device)
        self._update(references, real=True)

    def _update(self, images: torch.Tensor, real: bool) -> None:
        for i in range(0, len(images), 256):
            self.metric.update(images[i : i + 256].to(self.metric.device), real=real)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> float:
        self.metric.reset()
        self._update(images, real=False)
        return float(self.metric.compute())


def frechet_distance(features: nn.Module, images: torch.Tensor, references: torch.Tensor) -> float:
    """Frechet distance between the feature distributions of ``images`` and ``references``."""
    return FrechetDistance(features, references)(images)
