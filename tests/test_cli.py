"""The ``tokenreduce`` command line, run in-process through ``tokenreduce.cli.main``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import tokenreduce
from tokenreduce.cli import main
from tokenreduce.testing.plugins import make_plugin_distribution

THIRD_PARTY = """
from typing import Literal

from tokenreduce import Selector, StrictParams, hookimpl


class EveryOther(Selector):
    name = "every_other"

    class Params(StrictParams):
        name: Literal["every_other"] = "every_other"

    def select(self, features, ctx):
        import torch

        k = ctx.layout.k
        slots = ctx.layout.regions.slots
        return (torch.arange(k, device=features.device) * 2 % slots).expand(ctx.layout.regions.num_regions, k)


@hookimpl
def tokenreduce_register(registry):
    registry.add(EveryOther)
"""


@pytest.fixture(autouse=True)
def fresh_registry():
    tokenreduce.reset_manager()
    yield
    tokenreduce.reset_manager()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plugins_lists_every_kind_with_its_source(capsys) -> None:
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    for name in ("facility_location", "attention", "tile", "step_sharing", "sdxl", "flux", "bipartite"):
        assert re.search(rf"{name}\s.*tokenreduce", out), name
    assert "toma-sdxl" in out and "toma-flux" in out


def test_third_party_plugin_is_listed_and_usable(capsys, tmp_path: Path, monkeypatch) -> None:
    dist = make_plugin_distribution(tmp_path, "tr-everyother", THIRD_PARTY, version="2.3.4")
    monkeypatch.syspath_prepend(str(dist.root))
    tokenreduce.reset_manager()
    code, out, _ = run(capsys, "plugins")
    assert code == 0
    assert re.search(r"every_other\s.*selector.*tr-everyother 2\.3\.4", out)
    config = tmp_path / "third.yaml"
    config.write_text("adapter: {name: sdxl}\nratio: 0.5\nselector: {name: every_other}\n", encoding="utf-8")
    code, out, err = run(capsys, "validate", str(config))
    assert code == 0, err

    monkeypatch.setenv("TOKENREDUCE_DISABLE_PLUGIN_AUTOLOAD", "1")
    tokenreduce.reset_manager()
    code, out, _ = run(capsys, "plugins")
    assert "every_other" not in out
    code, _, err = run(capsys, "validate", str(config))
    assert code == 2 and "every_other" in err and "facility_location" in err


def test_schema_is_json_and_names_the_components(capsys, tmp_path: Path) -> None:
    code, out, _ = run(capsys, "schema")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "tokenreduce config"
    text = json.dumps(schema)
    for name in ("facility_location", "attention", "tile", "step_sharing", "tomesd_grid", "downsample"):
        assert f'"{name}"' in text
    target = tmp_path / "schema.json"
    assert run(capsys, "schema", "-o", str(target))[0] == 0
    assert json.loads(target.read_text()) == schema


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("merger: {name: attentoin}\n", "valid mergers"),
        ("ratio: 1.5\n", "ratio must be in [0, 1)"),
        ("merger: {name: attention, temperature: fast}\n", "merger.temperature"),
        ("partitioner: {name: tile, size: [8, 8], stride: 2}\n", "stride"),
    ],
)
def test_validate_rejects_bad_configs_with_a_clear_message(
    capsys, tmp_path: Path, body: str, needle: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("adapter: {name: sdxl}\n" + body, encoding="utf-8")
    code, _, err = run(capsys, "validate", str(config))
    assert code == 2
    assert needle in err


def test_validate_accepts_presets_and_every_format(capsys, tmp_path: Path) -> None:
    assert run(capsys, "validate", "toma-sdxl")[0] == 0
    (tmp_path / "c.json").write_text(json.dumps({"ratio": 0.25, "adapter": {"name": "flux"}}))
    (tmp_path / "c.toml").write_text('ratio = 0.25\n[adapter]\nname = "flux"\n')
    for name in ("c.json", "c.toml"):
        code, out, err = run(capsys, "validate", str(tmp_path / name))
        assert code == 0, err
        assert '"ratio": 0.25' in out
    assert run(capsys, "validate", str(tmp_path / "missing.yaml"))[0] == 2


def test_explain_reports_grids_and_kept_tokens_of_real_sdxl(capsys) -> None:
    code, out, err = run(capsys, "explain", "toma-sdxl")
    assert code == 0, err
    # SDXL-base at 1024x1024: attention at 64x64 and 32x32 tokens, half of them kept.
    assert "64x64" in out and "32x32" in out
    assert "2048" in out and "512" in out


def test_explain_flux(capsys) -> None:
    code, out, err = run(capsys, "explain", "toma-flux")
    assert code == 0, err
    assert "double" in out and "single" in out


def test_explain_shows_size_weighting(capsys, tmp_path: Path) -> None:
    assert "size-weighted attention: off" in run(capsys, "explain", "toma-sdxl")[1]
    assert "size-weighted attention: on" in run(capsys, "explain", "toma-flux")[1]
    config = tmp_path / "c.yaml"
    config.write_text("adapter: {name: flux, size_weighting: false}\nratio: 0.5\n")
    code, out, err = run(capsys, "explain", str(config))
    assert code == 0, err
    assert "size-weighted attention: off" in out


def test_explain_says_whether_plans_outlive_a_denoiser_call(capsys) -> None:
    # Every model preset plans at each merged step: nothing crosses calls, as CUDA graphs need.
    for preset in ("toma-sdxl", "toma-sdxl-fast", "toma-flux", "toma-wan"):
        out = " ".join(run(capsys, "explain", preset)[1].split())  # rich wraps lines
        assert "nothing is kept from one denoiser call to the next" in out, preset
    # The release's reuse (destinations every 10 merged steps, weights every 5) over 20 merged steps.
    out = " ".join(run(capsys, "explain", "toma")[1].split())
    assert "new destinations at 2 of 20 merged steps, new weights alone at 2, reused at the others" in out
    assert "kept from one denoiser call to the next, which torch.compile's CUDA-graph modes" in out


@pytest.mark.slow
def test_generate_writes_image_and_record(capsys, tmp_path: Path) -> None:
    from tokenreduce.testing.tiny_sdxl import tiny_sdxl_pipeline

    pipe = tiny_sdxl_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    config = tmp_path / "c.yaml"
    config.write_text("adapter: {name: sdxl}\nratio: 0.5\npartitioner: {name: tile, size: 4}\n")
    out_dir = tmp_path / "out"
    code, out, err = run(
        capsys,
        "generate",
        "--model",
        str(tmp_path / "pipe"),
        "--config",
        str(config),
        "--steps",
        "2",
        "--device",
        "cpu",
        "--baseline",
        "-o",
        str(out_dir),
    )
    assert code == 0, err
    record = json.loads((out_dir / "record.json").read_text())
    assert (out_dir / "reduced.png").is_file() and (out_dir / "baseline.png").is_file()
    assert record["config"]["ratio"] == 0.5 and record["reduced"]["seconds"] > 0
    assert record["speedup"] > 0


def test_generate_rejects_a_folder_that_is_not_a_pipeline(capsys, tmp_path: Path) -> None:
    code, _, err = run(capsys, "generate", "--model", str(tmp_path), "--device", "cpu")
    assert code == 2 and "model_index.json" in err


@pytest.mark.slow
def test_demo_writes_table_picture_and_json(capsys, tmp_path: Path) -> None:
    code, out, err = run(capsys, "demo", "-o", str(tmp_path), "--steps", "3")  # the presets merge step 2
    assert code == 0, err
    results = json.loads((tmp_path / "demo.json").read_text())
    assert set(results["models"]) == {
        "SDXL-shaped UNet (latent space)",
        "Flux-shaped transformer (latent space)",
    }
    for model in results["models"].values():
        assert model["step_ms_unmodified"] > 0 and model["step_ms_toma"] > 0
        assert 10 < model["psnr_db"] < 100
        assert 0 < model["merged_steps"] <= 3
    assert "GPU speedup" in out and 1 <= results["difference_gain"] <= 255
    for model in results["models"].values():
        assert model["gpu_speedup_1024"] is None or model["gpu_speedup_1024"] > 1
    from PIL import Image

    with Image.open(tmp_path / "side_by_side.png") as picture:
        assert picture.width > 200 and picture.height > 200


def test_demo_runs_the_latent_proxies_unless_told_pixel() -> None:
    from tokenreduce.cli import build_parser

    parser = build_parser()
    assert [parser.parse_args(["demo", *flags]).pixel for flags in ([], ["--latent"], ["--pixel"])] == [
        False,
        False,
        True,
    ]
