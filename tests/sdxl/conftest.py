"""Fixtures and helpers for the SDXL adapter tests (tiny models, CPU)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import tokenreduce as tr
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_unet


@pytest.fixture(scope="module", autouse=True)
def fresh_registry():
    tr.reset_manager()


@pytest.fixture(scope="module")
def unet():
    """The tiny SDXL-shaped UNet: levels 0 (downsample 2, 3 blocks) and 1 (downsample 4, 8 blocks)."""
    return tiny_sdxl_unet(seed=0, sample_size=16)


@pytest.fixture(autouse=True)
def clean_unet(request):
    """Whatever a test applied to the shared UNet is removed afterwards."""
    yield
    if "unet" in request.fixturenames:
        tr.remove(request.getfixturevalue("unet"))


def config(
    sites: list[str] | None = None, ratio: float = 0.5, *, adapter: dict | None = None, **parts: Any
) -> dict[str, Any]:
    """ToMA components on 4x4 tiles (they fit the tiny UNet's 4x4 level), new plans every step."""
    cfg: dict[str, Any] = {
        "adapter": {"name": "sdxl", **({"sites": sites} if sites else {}), **(adapter or {})},
        "ratio": ratio,
        "selector": {"name": "facility_location"},
        "merger": {"name": "attention"},
        "partitioner": {"name": "tile", "size": [4, 4]},
        "reuse": {"name": "step_sharing", "destinations_every": 1, "weights_every": 1},
    }
    cfg.update(parts)
    return cfg


def run(unet: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out - ref).norm() / ref.norm())


def wrapped(model: nn.Module) -> set[str]:
    """Paths of the modules (and the root as "") that carry an instance ``forward``."""
    return {name for name, module in model.named_modules() if "forward" in module.__dict__}
