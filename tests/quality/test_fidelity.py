"""The proxy fidelity benchmark: metrics, the sweep, and `tokenreduce eval --proxy`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tokenreduce.api import prepare
from tokenreduce.cli import main
from tokenreduce.quality import fidelity, metrics
from tokenreduce.quality.proxy.features import ProxyFeatures
from tokenreduce.quality.proxy.models import KINDS, ProxyPipeline, build_denoiser, build_prompts

pytest.importorskip("torchmetrics")
ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "docs" / "results" / "bench-h100-2026-11-22.json"


def test_psnr_matches_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 16, 16, generator=g), torch.rand(3, 3, 16, 16, generator=g)
    mse = ((a.double() - b.double()) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(metrics.psnr(a, b).double(), 10 * torch.log10(1 / mse), rtol=1e-5, atol=1e-5)


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    a = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(metrics.ssim(a, a), torch.ones(2))
    noisy = (a + 0.2 * torch.randn(a.shape, generator=torch.Generator().manual_seed(2))).clamp(0, 1)
    assert (metrics.ssim(noisy, a) < 0.9).all()


def test_frechet_distance_is_zero_on_the_same_set_and_grows_with_a_shift():
    torch.manual_seed(0)
    features = ProxyFeatures().eval()
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    same = metrics.frechet_distance(features, images, images)
    shifted = metrics.frechet_distance(features, (images * 0.5).clamp(0, 1), images)
    assert abs(same) < 1e-3 and shifted > 100 * max(abs(same), 1e-6)


def _random_proxy(kind: str) -> ProxyPipeline:
    torch.manual_seed(0)
    return ProxyPipeline(
        kind, build_denoiser(kind).eval(), build_prompts(kind, 8), [str(i) for i in range(8)]
    )


@pytest.mark.parametrize("kind", KINDS)
def test_every_sweep_variant_validates_against_its_proxy(kind):
    variants = [v for v in fidelity.sweep([kind]) if v.kind == kind]
    names = [v.label for v in variants]
    assert len(names) == len(set(names))
    assert {"toma@0.5", "tomesd@0.5", "tofu@0.5"} <= set(names)
    pipe = _random_proxy(kind)
    for variant in variants:
        prepare(pipe, variant.config)  # raises on a config the proxy cannot take
    if kind == "flux":  # the proxies' skipped blocks replace Flux-dev's 5 + 5
        assert all(v.config["adapter"]["skip_double"] < 5 for v in variants)


def test_evaluate_scores_each_variant_against_the_unmodified_images():
    pipe = _random_proxy("sdxl")
    features = ProxyFeatures().eval()
    variants = [
        fidelity.Variant(
            "sdxl", "toma", "methods", "toma@0", fidelity.config_for("sdxl", "toma-sdxl", ratio=0.0)
        ),
        fidelity.Variant(
            "sdxl",
            "toma",
            "methods",
            "toma@0.75",
            # Both steps merge (the preset's second-half window would merge the second only).
            fidelity.config_for("sdxl", "toma-sdxl", ratio=0.75, schedule={"name": "always"}),
        ),
    ]
    protocol = fidelity.Protocol(seeds_per_class=1, steps=2, batches=(1, 4), reference_crops=16)
    result = fidelity.evaluate({"sdxl": pipe}, features, variants, protocol)
    runs = result["record"]["runs"]
    assert [r["batch"] for r in runs] == [1] * 3 + [4] * 3  # one image per call first
    rows = {r["label"]: r for r in runs if r["batch"] == 1}
    assert rows["unmodified"]["psnr"] is None and rows["unmodified"]["feature_similarity"] == 1.0
    assert rows["toma@0"]["psnr"] is None  # ratio 0: the same images
    assert rows["toma@0"]["fd_heldout"] == pytest.approx(rows["unmodified"]["fd_heldout"], rel=1e-6)
    merged = rows["toma@0.75"]
    assert math.isfinite(merged["psnr"]) and merged["ssim"] < 1.0
    assert result["samples"]["sdxl/toma@0.75"].shape == (8, 3, 64, 64)
    json.dumps(result["record"], allow_nan=False)  # strict JSON


@pytest.mark.slow
def test_eval_proxy_command_writes_every_output(tmp_path, capsys):
    out = tmp_path / "fid"
    args = ["eval", "--proxy", "--kinds", "sdxl", "--ratios", "0.5", "--no-knobs", "--num-seeds", "1"]
    args += [
        "--steps",
        "2",
        "--reference-crops",
        "16",
        "--device",
        "cpu",
        "-o",
        str(out),
        "--speed",
        str(BENCH),
    ]
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((out / "fidelity.json").read_text())
    labels = {r["label"] for r in record["runs"]}
    assert {
        "unmodified",
        "toma@0.5",
        "tomesd@0.5",
        "tofu@0.5",
        "todo@0.75",
        "toma-block@0.5",
        "toma-attn1@0.5",
    } == labels
    assert "| 1 | sdxl | methods | toma@0.5 |" in (out / "fidelity.md").read_text()
    for picture in ("fidelity-grid.png", "speed-fidelity.png"):
        assert (out / picture).stat().st_size > 1000


def test_eval_proxy_refuses_bad_input_before_generating(tmp_path, capsys):
    out = tmp_path / "fid"
    assert main(["eval", "--proxy", "--proxy-weights", str(tmp_path), "-o", str(out)]) == 2
    assert "train-proxies" in capsys.readouterr().err
    assert main(["eval", "--proxy", "--seeds", "1", "2", "-o", str(out)]) == 2
    assert "--num-seeds" in capsys.readouterr().err
    assert main(["eval", "--proxy", "--batch-size", "4", "-o", str(out)]) == 2
    assert "--batches" in capsys.readouterr().err
    assert not out.exists()


def test_a_reused_frechet_distance_equals_a_fresh_one():
    torch.manual_seed(0)
    features = ProxyFeatures().eval()
    g = torch.Generator().manual_seed(1)
    reference, a, b = (torch.rand(48, 3, 32, 32, generator=g) for _ in range(3))
    distance = metrics.FrechetDistance(features, reference)
    first, second, again = distance(a), distance(b * 0.5), distance(a)
    assert first == again == metrics.frechet_distance(features, a, reference)
    assert second == metrics.frechet_distance(features, b * 0.5, reference)


def test_a_variant_naming_another_component_replaces_the_presets_parameters():
    """Swapping the preset's schedule `window` (start, stop) for `every` must not keep start and stop."""
    config = fidelity.config_for("flux", "toma-flux", schedule={"name": "every", "k": 3})
    assert config["schedule"] == {"name": "every", "k": 3}
    assert fidelity.config_for("flux", "toma-flux", schedule={"start": 0.25})["schedule"]["stop"] == 1.0
    prepare(_random_proxy("flux"), config)  # a valid config


def test_given_configs_run_on_the_proxies_they_fit():
    variants = fidelity.config_variants(["sdxl", "flux"], ["toma-flux-run", "toma-sdxl"], ratios=[0.25, 0.5])
    assert [(v.kind, v.label) for v in variants] == [
        ("flux", "toma-flux-run@0.25"),
        ("flux", "toma-flux-run@0.5"),
        ("sdxl", "toma-sdxl@0.25"),
        ("sdxl", "toma-sdxl@0.5"),
    ]
    flux = variants[0].config
    assert flux["ratio"] == 0.25 and flux["adapter"]["single_placement"] == "run"
    assert flux["adapter"]["skip_single"] < 5  # the proxies' skipped blocks
    prepare(_random_proxy("flux"), flux)
    assert [v.label for v in fidelity.config_variants(["flux"], ["toma-flux"])] == ["toma-flux"]
    with pytest.raises(ValueError, match="fits none of the proxies"):
        fidelity.config_variants(["flux"], ["toma-sdxl"])
