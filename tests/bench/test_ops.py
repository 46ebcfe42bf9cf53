"""Kernel budgets per merged block at real scale (meta device): what each preset may add.

The counts come from ``tokenreduce bench --ops`` on the real architectures with fewer repeated
blocks (same widths, grids, tiles and placements, so the per-block counts are the same). A
hot-path change that adds kernels fails here before it reaches a GPU.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from tokenreduce.bench import ops
from tokenreduce.bench.variants import toma_preset
from tokenreduce.config import load_config, resolve
from tokenreduce.engine.runtime import Runtime

#: What size-weighted attention (on in the Flux presets) adds to a merged block: q and k widened
#: by one concatenation each and v padded (3 kernels per attention call), and the key weights built
#: once per plan from the group sizes (11 kernels).
SIZE_WEIGHTING = {"select": 3 + 11, "reuse": 3}
#: The concatenations size weighting makes on a reuse step (the only ones allowed there).
SIZE_WEIGHTING_CATS = 2

#: The opt-in Flux placements (docs/quality.md, "Beyond the ideal"). A merged run of single-stream
#: blocks recomputes its first block's modulated norm for the plan (silu, linear, layer norm,
#: scale, shift: 5 kernels, on plan steps only) and unmerges once at its last block (subtract,
#: unmerge, add: 3); the blocks in between add only what size weighting adds. The double blocks'
#: image feed-forward on merged tokens adds one merge and one unmerge (2).
RUN_PLAN_SOURCE, RUN_EXIT, FF_MERGE = 5, 3, 2

#: The families whose adapters were not reworked for the kernel targets (tokens stay in raster order
#: through the merged blocks, Flux.2's single blocks concatenate ``[text; merged]``) are pinned at
#: what they measure, plus this much on steps that compute a plan (reuse steps: exact).
PLAN_MARGIN = 5

#: Kernels per round of the facility-location greedy (argmax, maximum, gather, sum; the last round
#: skips its gather, which the fixed parts below absorb). It runs one round per destination of a
#: tile, so a select step's count grows with the tile: the presets take 32 of each 8x8 tile's 64
#: tokens (8 of 16 on the release's 4x4 tiles).
GREEDY_ROUND = 4
GREEDY = GREEDY_ROUND * 32

#: A Flux plan step: ToMA's own kernels (28 + the greedy) plus size weighting's (on in the presets).
FLUX_SELECT = 28 + GREEDY + SIZE_WEIGHTING["select"]

#: (site, step kind) -> most kernels a merged block may add over the unmodified one: ToMA's own
#: budget (select 28 + the greedy, reuse 2 on Flux) plus size weighting where the preset turns it on.
BUDGETS = {
    "flux": {
        "toma-flux": {
            ("double", "select"): FLUX_SELECT,
            ("double", "reuse"): 2 + SIZE_WEIGHTING["reuse"],
            ("single", "select"): FLUX_SELECT,
            ("single", "reuse"): 2 + SIZE_WEIGHTING["reuse"],
        },
        "toma-flux-run": {
            ("double", "select"): FLUX_SELECT,
            ("double", "reuse"): 2 + SIZE_WEIGHTING["reuse"],
            ("single_run", "select"): FLUX_SELECT + RUN_PLAN_SOURCE,
            ("single_run", "reuse"): RUN_EXIT + SIZE_WEIGHTING["reuse"],
        },
        "toma-flux-ff": {
            ("double_ff", "select"): FLUX_SELECT + FF_MERGE,
            ("double_ff", "reuse"): 2 + SIZE_WEIGHTING["reuse"] + FF_MERGE,
            ("single", "select"): FLUX_SELECT,
            ("single", "reuse"): 2 + SIZE_WEIGHTING["reuse"],
        },
    },
    "sdxl": {
        "toma-sdxl": {  # new plans at every merged step: no "weights" steps
            ("stack", "select"): 200,
            ("stack", "reuse"): 4,
        },
        "toma-sdxl-block": {
            ("block", "select"): 200,
            ("block", "weights"): 20,
            ("block", "reuse"): 4,
        },
    },
    # Measured on SD3.5-large, Flux.2-dev, Qwen-Image (bf16, 1024x1024) and Wan 2.1 1.3B (bf16,
    # 81 frames at 480x832); every preset computes new plans at every step (no "weights" steps).
    "sd3": {"toma-sd3": {("joint", "select"): 23 + GREEDY + PLAN_MARGIN, ("joint", "reuse"): 4}},
    "flux2": {
        "toma-flux2": {
            ("double", "select"): 27 + GREEDY + PLAN_MARGIN,
            ("double", "reuse"): 4,
            ("single", "select"): 29 + GREEDY + PLAN_MARGIN,
            ("single", "reuse"): 6,
        },
    },
    "qwenimage": {"toma-qwenimage": {("joint", "select"): 24 + GREEDY + PLAN_MARGIN, ("joint", "reuse"): 4}},
    # One Wan block holds three merged sites (self-attention, cross-attention, feed-forward). A
    # select step runs the greedy and about 45 kernels of jitter noise; it comes once per merged
    # step (one plan for all blocks). On
    # Wan 2.1 1.3B the merged step with 8x8 tiles measured as fast as with 4x4 (docs/performance.md),
    # with the noise drawn from a generator then (7 kernels).
    "wan": {
        "toma-wan": {
            ("attn1+attn2+ffn", "select"): 97 + GREEDY + PLAN_MARGIN,
            ("attn1+attn2+ffn", "reuse"): 21,
        }
    },
}
#: Gathers, scatters and concatenations a reuse step still makes per merged block where the
#: tile-major token order and the fused single-block path are not implemented (raster <-> tile
#: order around every merge and unmerge); the reworked families make none (size weighting's apart).
UNFUSED_REUSE = {
    "flux": {},
    "sdxl": {},
    "sd3": {"index_select": 2},
    "flux2": {"index_select": 2, "cat": 2},
    "qwenimage": {"index_select": 2},
    "wan": {"index_select": 9, "index_copy": 3},
}


def test_the_greedy_budget_matches_the_presets_tiles() -> None:
    """The budgets above count 32 greedy rounds: the DiT presets' tiles times their ratio."""
    for family in BUDGETS.keys() - {"sdxl"}:
        for preset in BUDGETS[family]:
            runtime = Runtime(resolve(load_config(preset)))
            tile = tuple(runtime.config.partitioner.model_dump()["size"])
            assert runtime.layout(tile).k * GREEDY_ROUND == GREEDY, (preset, tile)  # one tile's picks


def test_every_family_with_a_toma_preset_is_budgeted() -> None:
    assert set(ops.families()) == set(BUDGETS) == set(UNFUSED_REUSE) == set(ops.SHORT)


@pytest.fixture(scope="module", params=sorted(BUDGETS))
def counted(request: pytest.FixtureRequest) -> tuple[str, dict]:
    family = request.param
    only = [*BUDGETS[family], "ideal"]
    return family, ops.count_family(family, only=only, short=True)


@pytest.mark.slow
def test_presets_stay_within_their_kernel_budgets(counted: tuple[str, dict]) -> None:
    family, record = counted
    for preset, budget in BUDGETS[family].items():
        sites = record["variants"][preset]
        seen = {(site, kind) for site, kinds in sites.items() if site != ops.CALL for kind in kinds}
        assert seen == set(budget), f"{preset}: step kinds seen {sorted(seen)}"
        for (site, kind), most in budget.items():
            got = sites[site][kind]
            assert got["added"] <= most, f"{preset} {site} {kind}: {got['added']} > {most}: {got['ops']}"


@pytest.mark.slow
def test_reuse_steps_gather_and_concatenate_nothing(counted: tuple[str, dict]) -> None:
    family, record = counted
    unfused = UNFUSED_REUSE[family]
    for preset in BUDGETS[family]:
        for site, kinds in record["variants"][preset].items():
            if site != ops.CALL:
                reuse = kinds["reuse"]["ops"]
                for op in ("index_select", "gather", "index_copy", "scatter"):
                    assert reuse.get(op, 0) <= unfused.get(op, 0), (preset, site, reuse)
                weighted = load_config(preset).adapter.size_weighting
                cats = (SIZE_WEIGHTING_CATS if weighted else 0) + unfused.get("cat", 0)
                assert reuse.get("cat", 0) <= cats, (preset, site, reuse)


@pytest.mark.slow
def test_inside_a_merged_run_blocks_add_only_size_weighting() -> None:
    """Between a run's first and last block nothing is merged or unmerged (real widths, a run of 5)."""
    from tokenreduce import archs

    model = nn.Module.to(
        archs.build("flux", overrides={"num_layers": 1, "num_single_layers": 5}), torch.bfloat16
    )
    model.requires_grad_(False)
    call = ops.meta_inputs("flux", model, torch.bfloat16)
    adapter = {"skip_double": 0, "skip_single": 0}
    config = load_config("toma-flux-run", schedule={"name": "always"}, adapter=adapter).model_dump()
    sites = ops.count_variant(model, call, config, ops.count_call(model, call))
    assert sites["single_run"]["reuse"]["min"] == SIZE_WEIGHTING["reuse"]
    assert sites["single_run"]["reuse"]["added"] == RUN_EXIT + SIZE_WEIGHTING["reuse"]


@pytest.mark.slow
def test_the_ideal_is_no_dearer_than_the_method_reusing_its_plan(counted: tuple[str, dict]) -> None:
    family, record = counted
    ideal, toma = record["variants"]["ideal"], record["variants"][toma_preset(family)]
    for site, kinds in toma.items():
        if site == ops.CALL:
            continue
        for kind in ideal[site]:
            assert ideal[site][kind]["added"] <= kinds["reuse"]["added"], (site, kind)


def test_counter_counts_kernels_not_views() -> None:
    x = torch.empty(4, 6, device="meta")
    counter = ops.KernelCounter()
    counter.active.append("unit")
    with counter:
        y = x.view(2, 12).transpose(0, 1)[:3]  # views: no kernel
        z = y.contiguous()  # one copy
        _ = torch.cat((z, z)) + 1  # two kernels
        torch.empty(3, device="meta")  # allocation only
    assert counter.counts["unit"] == Counter({"clone": 1, "cat": 1, "add": 1})


def test_added_is_the_difference_per_op() -> None:
    assert ops.added(Counter(bmm=3, cat=1), Counter(bmm=1, cat=1)) == Counter(bmm=2)


@pytest.mark.filterwarnings("ignore:token grid .* is smaller")  # the toy video runs unmerged
def test_the_command_counts_the_architectures_asked_for(tmp_path: Path) -> None:
    """``--arch`` takes any architecture of a counted family (here the toy ones, fast on a CPU), at
    its own height, width and frames."""
    import json

    from tokenreduce.cli import main

    assert main(["bench", "--ops", "--arch", "tiny-sd3", "tiny-wan", "-o", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "ops.json").read_text(encoding="utf-8"))
    assert list(record["families"]) == ["tiny-sd3", "tiny-wan"]
    wan = record["families"]["tiny-wan"]
    assert (wan["size"], wan["width"], wan["frames"]) == (144, 160, 9)
    assert wan["image_tokens"] == 3 * 9 * 10  # 9 frames of 144x160 pixels, not 144x144
    assert "attn1+attn2+ffn" in wan["variants"]["toma-wan"]
    assert "| tiny-sd3 | toma-sd3 | joint | select |" in (tmp_path / "ops.md").read_text(encoding="utf-8")


def test_architectures_without_a_toma_preset_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ops, "families", lambda: ["flux"])
    with pytest.raises(ValueError, match=r"families with a ToMA preset \(flux\), not sdxl"):
        ops.run_ops(["sdxl"], Path("unused"), console=None)
