"""The paired comparison runs A and B on the same images and reports their per-image difference."""

from __future__ import annotations

from tokenreduce.quality import paired


def test_identical_configs_differ_by_nothing() -> None:
    (preset, always) = paired.compare(["flux-latent"], {"seed": 0}, {}, "fp32", steps=2, num_seeds=1)
    assert preset["schedule"] == "preset" and always["schedule"] == "always"
    assert always["paired_difference_db"] == 0.0 and always["psnr_a"] == always["psnr_b"]


def test_a_change_that_matters_moves_the_images() -> None:
    (_, always) = paired.compare(["flux-latent"], {"ratio": 0.75}, {}, "fp32", steps=2, num_seeds=1)
    assert always["psnr_b"] < always["psnr_a"]
    assert 0 < always["psnr_a_vs_b"] < 100  # finite: B's images are not A's
