"""The paired comparison runs A and B on the same images and reports their per-image difference."""

from __future__ import annotations

import pytest

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


def test_a_run_in_parts_joins_into_the_run_made_whole() -> None:
    (_, whole) = paired.compare(["flux-latent"], {"ratio": 0.75}, {}, "fp32", steps=2, num_seeds=2)
    parts = [
        {"command": f"python -m tokenreduce.quality.paired --first-seed {s} -o part-{s}.json", "rows": [row]}
        for s in (1, 0)  # in any order
        for (_, row) in [paired.compare(["flux-latent"], {"ratio": 0.75}, {}, "fp32", 2, 1, first_seed=s)]
    ]
    assert parts[0]["rows"][0]["psnr_b_per_image"] == whole["psnr_b_per_image"][1:]
    joined = paired.join(parts)
    (row,) = joined["rows"]
    assert joined["parts"][0] == "python -m tokenreduce.quality.paired --first-seed 1"
    assert row["seeds"] == 2 and row["first_seed"] == 0
    for key, value in whole.items():
        if isinstance(value, float):
            assert abs(row[key] - value) < 1e-5, key
        elif key.endswith("_per_image"):
            # A run scores its images as one batch (PSNR's reductions, the feature extractor):
            # another batch size may round differently in the last stored digits.
            assert row[key] == pytest.approx(value, abs=1e-5), key
        else:
            assert row[key] == value, key


def _row(first_seed: int, a: list[float], b: list[float]) -> dict[str, object]:
    scores = {f"{m}_{name}_per_image": x for m in paired.METRICS for name, x in (("a", a), ("b", b))}
    comparison = {"kind": "k", "schedule": "preset", "base": {}, "change": {}, "dtype": "fp32", "steps": 2}
    return (
        comparison | {"preset": "p", "seeds": len(a), "first_seed": first_seed, "psnr_a_vs_b": 30.0} | scores
    )


def test_join_refuses_parts_that_are_not_one_seed_range() -> None:
    gap = [{"rows": [_row(0, [1.0], [2.0])]}, {"rows": [_row(2, [1.0], [2.0])]}]
    with pytest.raises(ValueError, match="not one range"):
        paired.join(gap)
    twice = [{"rows": [_row(0, [1.0], [2.0])]}, {"rows": [_row(0, [1.0], [2.0])]}]
    with pytest.raises(ValueError, match="not one range"):
        paired.join(twice)


def test_the_summary_counts_who_is_ahead_and_tests_the_differences() -> None:
    a = [float(i) for i in range(10)]
    ahead = paired.summary(_row(0, a, [x + 1 for x in a]))
    assert ahead["psnr_b_higher"] == 10 and ahead["psnr_a_higher"] == 0
    assert ahead["paired_difference_db"] == 1.0 and ahead["paired_difference_sem_db"] == 0.0
    assert ahead["psnr_wilcoxon_p"] == pytest.approx(2 / 2**10)  # exact: all ten signs agree
    mixed = paired.summary(_row(0, a, [x + (1 if i % 2 else -1) for i, x in enumerate(a)]))
    assert mixed["psnr_b_higher"] == mixed["psnr_a_higher"] == 5 and mixed["psnr_wilcoxon_p"] > 0.5
    assert paired.summary(_row(0, [1.0], [2.0]))["psnr_wilcoxon_p"] is None


def test_the_median_difference_shows_a_mean_carried_by_one_image() -> None:
    a = [0.0] * 4
    one_outlier = paired.summary(_row(0, a, [0.0, 0.1, -0.1, 10.0]))
    assert one_outlier["paired_difference_db"] == pytest.approx(2.5)
    assert one_outlier["psnr_median_difference_db"] == pytest.approx(0.05)  # between the middle two
    assert one_outlier["feature_similarity_median_difference"] == pytest.approx(0.05)


def test_it_asks_for_a_change_unless_joining() -> None:
    with pytest.raises(SystemExit):
        paired.main(["--kinds", "flux-latent"])


def test_a_later_seed_range_gives_the_same_images_as_the_same_seeds_in_a_longer_run() -> None:
    (_, longer) = paired.compare(["flux-latent"], {"ratio": 0.75}, {}, "fp32", steps=2, num_seeds=2)
    (_, later) = paired.compare(
        ["flux-latent"], {"ratio": 0.75}, {}, "fp32", steps=2, num_seeds=1, first_seed=1
    )
    assert later["first_seed"] == 1 and later["seeds"] == 1
    for key in ("psnr_a_per_image", "psnr_b_per_image", "feature_similarity_b_per_image"):
        assert later[key] == longer[key][1:]
