"""The paired comparison runs A and B on the same images and reports their per-image difference."""

from __future__ import annotations

from tokenreduce.quality import paired


def test_identical_configs_differ_by_nothing() -> None:
    (preset, always) = paired.compare(["flux-latent"], {"seed": 0}, {}, "fp32", steps=2, num_seeds=1)
    assert preset["schedule"] == "preset" and always["schedule"] == "always"
    assert always["paired_difference_db"] == 0.0 and always["psnr_a"] == always["psnr_b"]
    assert always["feature_similarity_paired_difference"] == 0.0
    assert always["ssim_paired_difference"] == 0.0 and always["ssim_a"] == always["ssim_b"]


def test_a_change_that_matters_moves_the_images() -> None:
    (_, always) = paired.compare(["flux-latent"], {"ratio": 0.75}, {}, "fp32", steps=2, num_seeds=1)
    assert always["psnr_b"] < always["psnr_a"]
    assert 0 < always["psnr_a_vs_b"] < 100  # finite: B's images are not A's


def test_feature_similarity_is_paired_per_image_too() -> None:
    (_, always) = paired.compare(["flux-latent"], {"ratio": 0.75}, {}, "fp32", steps=2, num_seeds=2)
    a, b = always["feature_similarity_a_per_image"], always["feature_similarity_b_per_image"]
    assert len(a) == len(b) == 2 and len(always["psnr_b_per_image"]) == 2
    mean = sum(y - x for x, y in zip(a, b, strict=True)) / 2
    assert abs(always["feature_similarity_paired_difference"] - mean) < 1e-5
    assert always["feature_similarity_paired_difference_sem"] > 0
    assert always["feature_similarity_b"] < always["feature_similarity_a"] <= 1.0


def test_ssim_is_reported_and_paired_per_image() -> None:
    (_, always) = paired.compare(["flux-latent"], {"ratio": 0.75}, {}, "fp32", steps=2, num_seeds=2)
    a, b = always["ssim_a_per_image"], always["ssim_b_per_image"]
    assert len(a) == len(b) == 2
    assert abs(always["ssim_paired_difference"] - sum(y - x for x, y in zip(a, b, strict=True)) / 2) < 1e-5
    assert always["ssim_paired_difference_sem"] > 0
    assert always["ssim_b"] < always["ssim_a"] <= 1.0


def test_a_later_seed_range_gives_the_same_images_as_the_same_seeds_in_a_longer_run() -> None:
    (_, longer) = paired.compare(["flux-latent"], {"ratio": 0.75}, {}, "fp32", steps=2, num_seeds=2)
    (_, later) = paired.compare(["flux-latent"], {"ratio": 0.75}, {}, "fp32", steps=2, num_seeds=1, first_seed=1)
    assert later["first_seed"] == 1 and later["seeds"] == 1
    for key in ("psnr_a_per_image", "psnr_b_per_image", "feature_similarity_b_per_image"):
        assert later[key] == longer[key][1:]
