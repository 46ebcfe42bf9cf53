"""Proxy models: data, deterministic training, weight files, sampling, and tokenreduce on them."""

from __future__ import annotations

import json

import pytest
import torch

from tokenreduce.api import apply
from tokenreduce.quality.proxy.data import PHOTOS, photo_bank, sample_crops
from tokenreduce.quality.proxy.features import features_path, load_features
from tokenreduce.quality.proxy.models import (
    IMAGE_SIZE,
    KINDS,
    ProxyPipeline,
    build_denoiser,
    build_prompts,
    load_proxy,
    pack,
    save_proxy,
    unpack,
    weights_path,
)
from tokenreduce.quality.proxy.train import TrainSettings, train_denoiser, train_features

pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def bank():
    return photo_bank()


def test_photo_bank_splits_every_photo_into_train_and_heldout(bank):
    assert bank.names == list(PHOTOS)
    for train, held in zip(bank.train, bank.heldout, strict=True):
        assert train.shape[0] == held.shape[0] == 3
        assert train.shape[2] == held.shape[2]  # same width: a horizontal band is held out
        assert min(train.shape[1:]) >= IMAGE_SIZE and held.shape[1] >= IMAGE_SIZE
        assert train.min() >= -1 and train.max() <= 1


def test_crops_come_from_their_class_region(bank):
    crops, labels = sample_crops(bank.train, 32, IMAGE_SIZE, torch.Generator().manual_seed(0), flip=False)
    assert crops.shape == (32, 3, IMAGE_SIZE, IMAGE_SIZE) and labels.shape == (32,)
    for crop, label in zip(crops, labels, strict=True):
        region = bank.train[label]
        # The crop occurs in its region: a sliding-window search finds an exact match.
        windows = region.unfold(1, IMAGE_SIZE, 1).unfold(2, IMAGE_SIZE, 1)
        diff = (windows - crop[:, None, None]).abs().amax(dim=(0, 3, 4))
        assert diff.min() == 0


def test_pack_unpack_round_trip():
    x = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    tokens = pack(x)
    assert tokens.shape == (2, (IMAGE_SIZE // 2) ** 2, 12)
    assert torch.equal(unpack(tokens, IMAGE_SIZE, IMAGE_SIZE), x)
    # Token 1 is the 2x2 patch right of token 0 (raster order, as the Flux image ids say).
    assert torch.equal(tokens[0, 1].reshape(3, 2, 2), x[0, :, 0:2, 2:4])


@pytest.mark.parametrize("kind", KINDS)
def test_training_is_deterministic_and_moves_the_weights(bank, kind):
    settings = TrainSettings(steps=2, batch=2, warmup=1)
    device = torch.device("cpu")
    a = train_denoiser(kind, bank, settings, device)
    b = train_denoiser(kind, bank, settings, device)
    for (name, x), y in zip(a.denoiser.state_dict().items(), b.denoiser.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    assert torch.equal(a.prompts.tokens, b.prompts.tokens)
    torch.manual_seed(settings.seed)
    initial = build_denoiser(kind).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in a.denoiser.state_dict().items())
    assert a.record["settings"]["steps"] == 2 and a.record["params"] > 0


def test_feature_training_is_deterministic(bank):
    a, record = train_features(bank, steps=2, device=torch.device("cpu"), batch=8)
    b, _ = train_features(bank, steps=2, device=torch.device("cpu"), batch=8)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert 0.0 <= record["heldout_accuracy"] <= 1.0


def _random_proxy(kind: str) -> ProxyPipeline:
    torch.manual_seed(0)
    return ProxyPipeline(kind, build_denoiser(kind).eval(), build_prompts(kind, 3), ["a", "b", "c"])


@pytest.mark.parametrize("kind", KINDS)
def test_weight_file_round_trip(tmp_path, kind):
    pipe = _random_proxy(kind)
    pipe.record = {"steps": 7}
    save_proxy(pipe, weights_path(kind, tmp_path))
    loaded = load_proxy(kind, tmp_path)
    assert loaded.class_names == ["a", "b", "c"] and loaded.record == {"steps": 7}
    for k, v in pipe.denoiser.state_dict().items():
        assert torch.equal(loaded.denoiser.state_dict()[k], v.half().float()), k
    with pytest.raises(ValueError, match="holds a"):
        weights_path(kind, tmp_path).rename(weights_path(_other(kind), tmp_path))
        load_proxy(_other(kind), tmp_path)


def _other(kind: str) -> str:
    return next(k for k in KINDS if k != kind)


def test_missing_weights_say_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-proxies"):
        load_proxy("sdxl", tmp_path)
    with pytest.raises(FileNotFoundError, match="train-proxies"):
        load_features(tmp_path)


@pytest.mark.parametrize("kind", KINDS)
def test_an_image_does_not_depend_on_its_batch(kind):
    pipe = _random_proxy(kind)
    together = pipe([0, 2], [5, 9], steps=2)
    alone = pipe([2], [9], steps=2)
    torch.testing.assert_close(together[1:], alone, atol=1e-5, rtol=0)
    assert together.min() >= 0 and together.max() <= 1


def test_bad_labels_are_refused():
    pipe = _random_proxy("sdxl")
    with pytest.raises(ValueError, match="out of range"):
        pipe([3], [0], steps=1)
    with pytest.raises(ValueError, match="labels but"):
        pipe([0, 1], [0], steps=1)


@pytest.mark.parametrize(("kind", "preset"), [("sdxl", "toma-sdxl"), ("flux", "toma-flux")])
def test_tokenreduce_applies_to_the_proxy_pipeline(kind, preset):
    pipe = _random_proxy(kind)
    base = pipe([0, 1], [0, 1], steps=3)
    adapter = {"name": "flux", "skip_double": 1, "skip_single": 1} if kind == "flux" else {"name": "sdxl"}
    handle = apply(pipe, preset, adapter=adapter)
    assert handle.model is pipe.denoiser
    reduced = pipe([0, 1], [0, 1], steps=3)
    assert handle.runtime.clock.step == 3  # the scheduler's steps drove the clock
    handle.remove()
    assert not torch.equal(reduced, base)
    assert torch.equal(pipe([0, 1], [0, 1], steps=3), base)
    with apply(pipe, preset, adapter=adapter, ratio=0.0):
        assert torch.equal(pipe([0, 1], [0, 1], steps=3), base)


def test_committed_weights_load_with_their_record():
    for kind in KINDS:
        pipe = load_proxy(kind)
        assert pipe.record["settings"]["steps"] >= 1000
        assert pipe.class_names == list(PHOTOS)
    features = load_features()
    record = json.loads((features_path().parent / "record.json").read_text())
    assert record["features"]["heldout_accuracy"] > 0.5
    assert set(KINDS) <= set(record)
    assert features.num_features == 128


@pytest.mark.slow
def test_train_proxies_command_writes_loadable_weights_and_a_record(tmp_path, capsys):
    from tokenreduce.cli import main

    code = main(
        ["train-proxies", "-o", str(tmp_path), "--steps", "2", "--feature-steps", "2", "--batch", "2"]
    )
    assert code == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "record.json").read_text())
    assert {"features", "sdxl", "flux", "data", "env"} <= set(record)
    assert record["sdxl"]["settings"]["steps"] == 2
    for kind in KINDS:
        assert load_proxy(kind, tmp_path).record["settings"]["batch"] == 2
    assert load_features(tmp_path).num_features == 128
    # Parts trained separately update the same record.
    assert main(["train-proxies", "-o", str(tmp_path), "--parts", "features", "--feature-steps", "1"]) == 0
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["features"]["steps"] == 1 and record["sdxl"]["settings"]["steps"] == 2


class _IdealSDXL(torch.nn.Module):
    """Predicts the exact noise that leads to ``target`` (Euler input scaling undone)."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        from diffusers import DDPMScheduler

        from tokenreduce.quality.proxy.models import SDXL_SCHEDULE

        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.target = target
        self.alphas = DDPMScheduler(**SDXL_SCHEDULE).alphas_cumprod

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None, return_dict=False):
        a = self.alphas[int(t)]
        # The scaled Euler input is sqrt(a) times the DDPM sample.
        return ((x - a.sqrt() * self.target) / (1 - a).sqrt(),)


class _IdealFlux(torch.nn.Module):
    """Predicts the exact velocity toward ``target`` (rectified flow)."""

    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.target = pack(target)

    def forward(self, hidden_states, timestep, **_):
        sigma = timestep.view(-1, 1, 1)
        noise = (hidden_states - (1 - sigma) * self.target) / sigma
        return (noise - self.target,)


@pytest.mark.parametrize(("kind", "ideal"), [("sdxl", _IdealSDXL), ("flux", _IdealFlux)])
def test_the_sampler_reaches_the_image_an_ideal_denoiser_points_to(kind, ideal):
    target = torch.rand(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pipe = ProxyPipeline(kind, ideal(target), build_prompts(kind, 2), ["a", "b"])
    image = pipe([1], [7], steps=12, guidance=3.0)
    torch.testing.assert_close(image * 2 - 1, target, atol=1e-5, rtol=0)
