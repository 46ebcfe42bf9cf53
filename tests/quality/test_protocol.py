"""``tokenreduce eval --model``: the paper's protocol end to end on tiny offline models.

A tiny SDXL pipeline, a tiny random CLIP and a tiny random ViT (standing in for DINO) are saved
to folders and loaded by path, exactly as real weights would be. FID uses the DINO features (the
Inception weights cannot be had offline).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tokenreduce
from tokenreduce.cli import main

PROMPTS = "# two prompts\nred cube\n\nblue ball\n"


@pytest.fixture(autouse=True)
def fresh_registry():
    tokenreduce.reset_manager()
    yield
    tokenreduce.reset_manager()


@pytest.fixture(autouse=True)
def offline_cpu(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # images compared with a CPU subprocess


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny pipeline, CLIP and DINO-like ViT; a prompt file; a reference folder."""
    from tokenreduce.testing.tiny_eval import save_tiny_clip, save_tiny_dino
    from tokenreduce.testing.tiny_sdxl import tiny_sdxl_pipeline

    root = tmp_path_factory.mktemp("assets")
    # 64x64-pixel images: token grids 16x16 and 8x8, large enough for the ToMA presets' 8x8 tiles.
    tiny_sdxl_pipeline(sample_size=32).save_pretrained(root / "pipe")
    save_tiny_clip(root / "clip")
    save_tiny_dino(root / "dino")

    (root / "prompts.txt").write_text(PROMPTS, encoding="utf-8")
    rng = np.random.default_rng(0)
    (root / "reference" / "class").mkdir(parents=True)
    for i, size in enumerate([(48, 40), (48, 40), (64, 64)]):
        pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "reference" / "class" / f"{i}.png")
    (root / "reference" / "notes.txt").write_text("not an image\n")
    return {name: root / name for name in ("pipe", "clip", "dino", "prompts.txt", "reference")}


def eval_args(assets: dict[str, Path], output: Path, **changes: str | None) -> list[str]:
    options = {
        "--model": str(assets["pipe"]),
        "--prompts": str(assets["prompts.txt"]),
        "--prompt-template": "a {}",
        "--configs": "toma-sdxl-block",
        "--ratios": "0.75",
        "--num-seeds": "2",
        "--steps": "6",  # the preset merges every step
        "--reference": str(assets["reference"]),
        "--clip-model": str(assets["clip"]),
        "--dino-model": str(assets["dino"]),
        "--fid-features": "dino",
        "-o": str(output),
    }
    options.update(changes)
    argv = ["eval"]
    for flag, value in options.items():
        if value is not None:
            argv += [flag, *value.split("|")]
    return argv


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def images(output: Path) -> dict[str, Path]:
    return {str(p.relative_to(output)): p for p in sorted((output / "images").rglob("*.png"))}


def results(output: Path) -> dict:
    return json.loads((output / "results.json").read_text(encoding="utf-8"))


def generated(record: dict) -> int:
    return sum(p["generated"] for p in record["processes"])


def test_eval_measures_every_run_then_resumes(capsys, assets, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, stdout, err = run(capsys, eval_args(assets, out))
    assert code == 0, err
    record = results(out)
    runs = {r["name"]: r for r in record["runs"]}
    assert list(runs) == ["baseline", "toma-sdxl-block@0.75"]
    for r in runs.values():
        assert r["images"] == 4 and r["timed_images"] == 4
        for metric in ("clip_t", "dino", "fid", "seconds_per_image"):
            assert math.isfinite(r[metric]), (r["name"], metric)
    assert runs["baseline"]["config"] is None and runs["toma-sdxl-block@0.75"]["config"]["ratio"] == 0.75
    assert abs(runs["baseline"]["dino"] - 1) < 1e-5
    assert runs["toma-sdxl-block@0.75"]["dino"] < 1
    assert record["inputs"]["reference_images"] == 3 and record["inputs"]["prompt_count"] == 2
    assert generated(record) == 8
    made = images(out)
    assert sorted(made) == sorted(
        f"images/{run}/{p:05d}_s{s}.png" for run in runs for p in range(2) for s in range(2)
    )
    baseline, reduced = (np.asarray(Image.open(made[f"images/{r}/00000_s0.png"])) for r in runs)
    assert not np.array_equal(baseline, reduced)
    table = (out / "results.md").read_text()
    assert "| toma-sdxl-block@0.75 | 0.75 | 4 |" in table and "toma-sdxl-block@0.75" in stdout

    # A rerun makes nothing and touches no image.
    mtimes = {name: p.stat().st_mtime_ns for name, p in made.items()}
    code, _, err = run(capsys, eval_args(assets, out))
    assert code == 0, err
    assert generated(results(out)) == 0
    assert {name: p.stat().st_mtime_ns for name, p in images(out).items()} == mtimes

    # A deleted image is made again, alone, and identical.
    victim = made["images/toma-sdxl-block@0.75/00001_s1.png"]
    before = np.asarray(Image.open(victim))
    victim.unlink()
    code, _, err = run(capsys, eval_args(assets, out))
    assert code == 0, err
    assert generated(results(out)) == 1
    assert np.array_equal(np.asarray(Image.open(victim)), before)
    changed = {name for name, p in images(out).items() if p.stat().st_mtime_ns != mtimes[name]}
    assert changed == {"images/toma-sdxl-block@0.75/00001_s1.png"}


def test_without_reference_fid_is_skipped_with_a_reason(capsys, assets, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run(
        capsys, eval_args(assets, out, **{"--reference": None, "--num-seeds": None, "--limit": "1"})
    )
    assert code == 0, err
    for r in results(out)["runs"]:
        assert r["fid"] is None and "--reference" in r["fid_note"]
        assert r["images"] == 1 and math.isfinite(r["clip_t"]) and math.isfinite(r["dino"])


def test_other_settings_in_the_same_output_folder_are_refused(capsys, assets, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = {"--reference": None, "--num-seeds": None, "--limit": "1"}
    assert run(capsys, eval_args(assets, out, **args))[0] == 0
    before = images(out)
    code, _, err = run(capsys, eval_args(assets, out, **args, **{"--steps": "7"}))
    assert code == 2 and "steps: 6 there, 7 now" in err
    assert images(out) == before


def _ddpm_pipeline(folder: Path) -> None:
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(folder)


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("missing prompt file", "does not exist"),
        ("empty prompt file", "has no prompts"),
        ("reference without images", "FID needs at least 2"),
        ("unreadable reference image", "cannot be read"),
        ("folder that is not a pipeline", "model_index.json"),
        ("pipeline without a supported denoiser", "supported `unet`/`transformer`"),
        ("config for another model", "toma-flux@0.75: adapter 'flux' does not support"),
        ("bad ratio", "ratio must be in [0, 1)"),
        ("CLIP model that does not exist", "--clip-model"),
        ("template without a slot", "--prompt-template"),
        ("size too small for the config", "toma-sdxl-block@0.75 at height 32, width 32: token grid"),
    ],
)
def test_bad_inputs_fail_before_generating(capsys, assets, tmp_path: Path, case: str, needle: str) -> None:
    changes: dict[str, str | None] = {}
    if case == "missing prompt file":
        changes["--prompts"] = str(tmp_path / "missing.txt")
    elif case == "empty prompt file":
        (tmp_path / "empty.txt").write_text("# nothing yet\n\n")
        changes["--prompts"] = str(tmp_path / "empty.txt")
    elif case == "reference without images":
        (tmp_path / "ref").mkdir()
        (tmp_path / "ref" / "a.txt").write_text("text")
        changes["--reference"] = str(tmp_path / "ref")
    elif case == "unreadable reference image":
        shutil.copytree(assets["reference"], tmp_path / "ref")
        (tmp_path / "ref" / "broken.png").write_bytes(b"not a png")
        changes["--reference"] = str(tmp_path / "ref")
    elif case == "folder that is not a pipeline":
        (tmp_path / "weights").mkdir()
        changes["--model"] = str(tmp_path / "weights")
    elif case == "pipeline without a supported denoiser":
        _ddpm_pipeline(tmp_path / "ddpm")
        changes["--model"] = str(tmp_path / "ddpm")
    elif case == "config for another model":
        changes["--configs"] = "toma-sdxl|toma-flux"
    elif case == "bad ratio":
        changes["--ratios"] = "0.5|1.5"
    elif case == "CLIP model that does not exist":
        changes["--clip-model"] = str(tmp_path / "no-clip")
    elif case == "template without a slot":
        changes["--prompt-template"] = "a photo"
    elif case == "size too small for the config":
        changes.update({"--height": "32", "--width": "32"})
    out = tmp_path / "out"
    code, _, err = run(capsys, eval_args(assets, out, **changes))
    assert code == 2, err
    assert "error: " in err, err
    message = err[err.rindex("error: ") :]  # after the loaders' progress bars
    assert needle in message, err
    assert not (out / "images").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity installed")
def test_inception_fid_without_torch_fidelity_says_what_to_install(capsys, assets, tmp_path: Path) -> None:
    out = tmp_path / "out"
    code, _, err = run(capsys, eval_args(assets, out, **{"--fid-features": "inception"}))
    assert code == 2 and "pip install torch-fidelity" in err and "--fid-features dino" in err
    assert not (out / "images").exists()


@pytest.mark.slow
def test_two_processes_make_the_same_images_as_one(capsys, assets, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    code, _, err = run(capsys, eval_args(assets, one))
    assert code == 0, err
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "ACCELERATE_USE_CPU": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "HF_HOME": str(tmp_path / "hf"),  # no user accelerate config
    }
    # `--multi_gpu` picks torchrun (`--cpu` with several processes needs MPI); without CUDA the
    # processes talk through gloo.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--main_process_port", str(port), "-m", "tokenreduce.cli"]
    done = subprocess.run(
        [*launch, *eval_args(assets, two)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    record = results(two)
    assert [p["index"] for p in record["processes"]] == [0, 1]
    assert all(p["generated"] > 0 for p in record["processes"]) and generated(record) == 8
    assert record["environment"]["processes"] == 2
    ones, twos = images(one), images(two)
    assert sorted(ones) == sorted(twos) and len(ones) == 8
    for name in ones:
        assert np.array_equal(np.asarray(Image.open(ones[name])), np.asarray(Image.open(twos[name]))), name
    by_name = {r["name"]: r for r in results(one)["runs"]}
    for r in record["runs"]:
        assert r["dino"] == pytest.approx(by_name[r["name"]]["dino"], abs=1e-6)
