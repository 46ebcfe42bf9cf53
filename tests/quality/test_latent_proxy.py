"""Latent proxies: the autoencoder, clips, deterministic training, weight files, tokenreduce on them."""

from __future__ import annotations

import json

import pytest
import torch

from tokenreduce.api import apply
from tokenreduce.quality.proxy.latent import (
    ProxyAutoencoder,
    ae_path,
    latent_bank,
    load_autoencoder,
    sample_clips,
    save_autoencoder,
    train_autoencoder,
)
from tokenreduce.quality.proxy.models import (
    SPECS,
    ProxyPipeline,
    build_denoiser,
    build_prompts,
    load_proxy,
    save_proxy,
    weights_path,
)
from tokenreduce.quality.proxy.train import TrainSettings, train_denoiser, train_proxies

pytest.importorskip("skimage")

IMAGE_KINDS = ("sdxl-latent", "flux-latent")


@pytest.fixture(scope="module")
def bank():
    return latent_bank()


def _ae(seed: int = 0) -> ProxyAutoencoder:
    torch.manual_seed(seed)
    return ProxyAutoencoder().eval()


def _random_proxy(kind: str) -> ProxyPipeline:
    torch.manual_seed(0)
    denoiser = build_denoiser(kind).eval()
    return ProxyPipeline(kind, denoiser, build_prompts(kind, 3), ["a", "b", "c"], vae=_ae())


def test_autoencoder_shapes_and_latent_normalisation():
    ae = _ae()
    images = torch.rand(2, 3, 128, 128) * 2 - 1
    with torch.no_grad():
        ae.shift.fill_(0.5)
        ae.scale.fill_(2.0)
        latents = ae.encode_latents(images)
        assert latents.shape == (2, 4, 32, 32)
        torch.testing.assert_close(latents, (ae.encode(images) - 0.5) * 2.0)
        decoded = ae.decode_latents(latents)
        torch.testing.assert_close(decoded, ae.decode(ae.encode(images)).clamp(-1, 1))
        # Clips: frame by frame, latents laid out (N, C, F, h, w) as Wan takes them.
        clips = torch.stack([images, images.flip(0)], dim=1)  # (2, 2, 3, 128, 128)
        clip_latents = ae.encode_latents(clips)
        assert clip_latents.shape == (2, 4, 2, 32, 32)
        torch.testing.assert_close(clip_latents[:, :, 0], latents)
        torch.testing.assert_close(ae.decode_latents(clip_latents)[:, 0], decoded)


def test_fingerprint_names_the_saved_weights(tmp_path):
    ae = _ae()
    save_autoencoder(ae, {"steps": 1}, ae_path(tmp_path))
    assert load_autoencoder(tmp_path).fingerprint() == ae.fingerprint()
    assert _ae(seed=1).fingerprint() != ae.fingerprint()


def test_clips_pan_and_zoom_inside_the_region(bank):
    clips, labels = sample_clips(bank.train, 3, 128, 5, torch.Generator().manual_seed(0))
    assert clips.shape == (3, 5, 3, 128, 128) and labels.shape == (3,)
    assert clips.min() >= -1 and clips.max() <= 1
    # The window moves: the first and last frames differ, neighbouring frames less so.
    first_last = (clips[:, 0] - clips[:, -1]).abs().mean()
    neighbours = (clips[:, 0] - clips[:, 1]).abs().mean()
    assert 0 < neighbours < first_last
    again, _ = sample_clips(bank.train, 3, 128, 5, torch.Generator().manual_seed(0))
    assert torch.equal(clips, again)


def test_autoencoder_training_is_deterministic(bank):
    a, record = train_autoencoder(bank, steps=1, batch=2, device=torch.device("cpu"), eval_crops=4)
    b, _ = train_autoencoder(bank, steps=1, batch=2, device=torch.device("cpu"), eval_crops=4)
    assert a.fingerprint() == b.fingerprint()
    assert all(torch.equal(v, v.half().float()) for v in a.state_dict().values())  # as saved
    assert record["scale"] != 1.0 and record["settings"]["steps"] == 1
    assert record["heldout_psnr_db"] > 0


@pytest.mark.parametrize("kind", [*IMAGE_KINDS, "wan-latent"])
def test_latent_training_is_deterministic_and_moves_the_weights(bank, kind):
    settings = TrainSettings(steps=2, batch=1 if kind == "wan-latent" else 2, warmup=1)
    device = torch.device("cpu")
    a = train_denoiser(kind, bank, settings, device, vae=_ae())
    b = train_denoiser(kind, bank, settings, device, vae=_ae())
    for (name, x), y in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    torch.manual_seed(settings.seed)
    initial = build_denoiser(kind).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in a.denoiser.state_dict().items())
    assert a.vae is not None and a.record["loss_start"] > 0


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_latent_pipeline_decodes_and_tokenreduce_applies(kind):
    pipe = _random_proxy(kind)
    base = pipe([0, 1], [0, 1], steps=3)
    assert base.shape == (2, 3, 128, 128) and base.min() >= 0 and base.max() <= 1
    arch = SPECS[kind].arch
    preset = f"toma-{arch}"
    adapter = {"name": "flux", "skip_double": 1, "skip_single": 1} if arch == "flux" else {"name": "sdxl"}
    with apply(pipe, preset, adapter=adapter, ratio=0.0):
        assert torch.equal(pipe([0, 1], [0, 1], steps=3), base)
    with apply(pipe, preset, adapter=adapter) as handle:
        assert handle.model is pipe.denoiser
        reduced = pipe([0, 1], [0, 1], steps=3)
        assert handle.runtime.clock.step == 3
    assert not torch.equal(reduced, base)
    assert torch.equal(pipe([0, 1], [0, 1], steps=3), base)


def test_wan_pipeline_generates_clips_and_tokenreduce_applies():
    pipe = _random_proxy("wan-latent")
    assert pipe.transformer is pipe.denoiser and pipe.unet is None
    base = pipe([2], [0], steps=2)
    assert base.shape == (1, 5, 3, 128, 128)
    with apply(pipe, "toma-wan", ratio=0.0):
        assert torch.equal(pipe([2], [0], steps=2), base)
    with apply(pipe, "toma-wan") as handle:
        assert not torch.equal(pipe([2], [0], steps=2), base)
        assert handle.runtime.clock.step == 2


def test_latent_weight_files_are_tied_to_their_autoencoder(tmp_path):
    pipe = _random_proxy("flux-latent")
    pipe.record = {"steps": 3}
    with pytest.raises(FileNotFoundError, match="--parts ae flux-latent"):
        load_proxy("flux-latent", tmp_path)
    save_proxy(pipe, weights_path("flux-latent", tmp_path))
    with pytest.raises(FileNotFoundError, match="--parts ae"):
        load_proxy("flux-latent", tmp_path)
    save_autoencoder(pipe.vae, {}, ae_path(tmp_path))
    loaded = load_proxy("flux-latent", tmp_path)
    assert loaded.record == {"steps": 3} and loaded.vae.fingerprint() == pipe.vae.fingerprint()
    save_autoencoder(_ae(seed=1), {}, ae_path(tmp_path))
    with pytest.raises(ValueError, match="another autoencoder"):
        load_proxy("flux-latent", tmp_path)


def test_pixel_and_latent_proxies_refuse_the_wrong_decoder():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="needs"):
        ProxyPipeline(
            "flux-latent", build_denoiser("flux-latent"), build_prompts("flux-latent", 2), ["a", "b"]
        )
    with pytest.raises(ValueError, match="takes no"):
        ProxyPipeline("flux", build_denoiser("flux"), build_prompts("flux", 2), ["a", "b"], vae=_ae())


def test_latent_parts_need_an_autoencoder(tmp_path):
    with pytest.raises(FileNotFoundError, match="add the part `ae`"):
        train_proxies(tmp_path, parts=("sdxl-latent",), steps=1, batch=1, device="cpu")


@pytest.mark.slow
def test_train_proxies_latent_command_writes_loadable_weights_and_a_record(tmp_path, capsys):
    from tokenreduce.cli import main

    args = [
        "train-proxies",
        "-o",
        str(tmp_path),
        "--parts",
        "ae",
        *IMAGE_KINDS,
        "--steps",
        "1",
        "--batch",
        "2",
    ]
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "record.json").read_text())
    assert {"ae", *IMAGE_KINDS, "latent_data", "env"} <= set(record)
    assert record["flux-latent"]["command"].startswith("tokenreduce train-proxies --parts ae sdxl-latent")
    for kind in IMAGE_KINDS:
        pipe = load_proxy(kind, tmp_path)
        assert pipe.record["settings"]["batch"] == 2
        assert pipe([0], [0], steps=1).shape == (1, 3, 128, 128)


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_every_fidelity_variant_validates_against_the_latent_proxy(kind):
    from tokenreduce.api import prepare
    from tokenreduce.quality import fidelity

    pipe = _random_proxy(kind)
    variants = fidelity.sweep([kind])
    assert {"toma@0.5", "tomesd@0.5", "tofu@0.5"} <= {v.label for v in variants}
    for variant in variants:
        prepare(pipe, variant.config)


def test_fidelity_benchmark_scores_latent_images():
    from tokenreduce.quality import fidelity
    from tokenreduce.quality.proxy.features import ProxyFeatures

    pipe = _random_proxy("flux-latent")
    torch.manual_seed(0)
    config = fidelity.config_for("flux-latent", "toma-flux", ratio=0.0)
    variants = [fidelity.Variant("flux-latent", "toma", "methods", "toma@0", config)]
    protocol = fidelity.Protocol(seeds_per_class=1, steps=2, batches=(3,), reference_crops=8)
    result = fidelity.evaluate({"flux-latent": pipe}, ProxyFeatures().eval(), variants, protocol)
    rows = {r["label"]: r for r in result["record"]["runs"]}
    assert rows["toma@0"]["psnr"] is None  # bit-exact at ratio 0, through the decoder
    assert result["samples"]["flux-latent/unmodified"].shape == (3, 3, 128, 128)


def _save_random_latent_proxies(folder) -> None:
    for kind in IMAGE_KINDS:
        torch.manual_seed(0)
        names = ["astronaut", "cat", "coffee", "rocket"]
        pipe = ProxyPipeline(kind, build_denoiser(kind), build_prompts(kind, 4), names, vae=_ae())
        save_proxy(pipe, weights_path(kind, folder))
    save_autoencoder(_ae(), {}, ae_path(folder))


@pytest.mark.slow
def test_demo_runs_on_the_latent_proxies(tmp_path, capsys):
    from tokenreduce.cli import main

    _save_random_latent_proxies(tmp_path / "w")
    args = ["demo", "--latent", "--weights", str(tmp_path / "w"), "-o", str(tmp_path / "out"), "--steps", "2"]
    assert main(args) == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "out" / "demo.json").read_text())
    assert results["latent"] is True
    assert set(results["models"]) == {
        "SDXL-shaped UNet (latent space)",
        "Flux-shaped transformer (latent space)",
    }
    assert (tmp_path / "out" / "side_by_side.png").stat().st_size > 1000


@pytest.mark.parametrize(
    ("args", "parts"),
    [
        ([], ("features", "sdxl", "flux")),
        (["--latent"], ("ae", "sdxl-latent", "flux-latent", "wan-latent")),
        (["--parts", "features", "--latent"], ("features", "ae", "sdxl-latent", "flux-latent", "wan-latent")),
        (["--parts", "flux-latent"], ("flux-latent",)),
    ],
)
def test_train_proxies_command_picks_the_parts(monkeypatch, tmp_path, args, parts):
    from tokenreduce.cli import main
    from tokenreduce.quality.proxy import train

    seen = {}
    monkeypatch.setattr(train, "train_proxies", lambda output, **kw: seen.update(kw) or {})
    assert main(["train-proxies", "-o", str(tmp_path), *args]) == 0
    assert seen["parts"] == parts and seen["steps"] is None and seen["batch"] is None
    assert seen["command"].startswith(f"tokenreduce train-proxies --parts {' '.join(parts)}")
