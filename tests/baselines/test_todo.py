"""ToDo: the ``downsample`` merger (pooled keys/values, full-length queries)."""

from __future__ import annotations

import math
from typing import Literal

import pytest
import torch

import tokenreduce as tr
from tokenreduce.baselines.todo import DownsampleMerger, downsample_tokens
from tokenreduce.builtins import GlobalPartitioner
from tokenreduce.config import ConfigError, load_config
from tokenreduce.hookspecs import hookimpl
from tokenreduce.params import StrictParams
from tokenreduce.testing.contracts import make_runtime
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_unet


def reference_pool(x: torch.Tensor, grid: tuple[int, int], f: int, mode: str) -> torch.Tensor:
    """Window by window, clipped at the border (written independently of the merger)."""
    h, w = grid
    image = x.reshape(x.shape[0], h, w, x.shape[2])
    out = []
    for top in range(0, h, f):
        for left in range(0, w, f):
            window = image[:, top : top + f, left : left + f].flatten(1, 2)
            if mode == "nearest":
                out.append(window[:, 0])
            elif mode == "avg":
                out.append(window.mean(dim=1))
            else:
                out.append(window.amax(dim=1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("mode", ["nearest", "avg", "max"])
@pytest.mark.parametrize(
    ("grid", "factor"), [((8, 8), 2), ((9, 11), 2), ((7, 5), 3), ((1, 5), 2), ((4, 6), 1)]
)
def test_pools_windows_with_a_partial_border(grid, factor, mode) -> None:
    x = torch.randn(2, grid[0] * grid[1], 6, dtype=torch.float64)
    pooled = downsample_tokens(x, grid, factor, mode)
    assert pooled.shape == (2, math.ceil(grid[0] / factor) * math.ceil(grid[1] / factor), 6)
    torch.testing.assert_close(pooled, reference_pool(x, grid, factor, mode))


def test_plan_through_the_runtime_is_kv_only_and_has_no_unmerge() -> None:
    merger = DownsampleMerger(DownsampleMerger.Params(factor=2, mode="avg"))
    runtime = make_runtime(partitioner=GlobalPartitioner(), merger=merger, ratio=0.75)
    x = torch.randn(1, 63, 4)
    plan = runtime.plan(runtime.group("level0", "block"), x, (7, 9))
    assert plan.merge(x).shape == (1, 4 * 5, 4)
    assert plan.positions is None
    with pytest.raises(NotImplementedError, match="nothing to unmerge"):
        plan.unmerge(plan.merge(x))


def test_ratio_zero_still_downsamples() -> None:
    # ToDo's reduction comes from the factor; the runtime's ratio-0 identity shortcut must not apply.
    merger = DownsampleMerger(DownsampleMerger.Params(factor=1))
    runtime = make_runtime(partitioner=GlobalPartitioner(), merger=merger, ratio=0.0)
    x = torch.randn(1, 16, 4)
    assert torch.equal(runtime.plan(runtime.group("k", "b"), x, (4, 4)).merge(x), x)


BASE = {
    "adapter": {"name": "sdxl", "sites": ["attn1"], "levels": [0]},
    "ratio": 0.75,
    "selector": {"name": "random"},
    "merger": {"name": "downsample"},
    "partitioner": {"name": "global"},
    "reuse": {"name": "always"},
}


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"ratio": 0.5}, ["downsample", "ratio 0.5", "0.75"]),
        ({"merger": {"name": "downsample", "factor": 3}}, ["downsample", "factor 3", "0.888889"]),
        ({"partitioner": {"name": "tile"}}, ["downsample", "'tile'", "global"]),
        ({"adapter": {"name": "flux"}}, ["downsample", "'flux'", "not supported"]),
        ({"adapter": {"name": "qwenimage"}}, ["downsample", "'qwenimage'", "not supported"]),
        ({"adapter": {"name": "sdxl", "sites": ["attn1", "attn2"]}}, ["sdxl", "downsample", "attn1"]),
    ],
)
def test_validation_names_the_conflict(change, names) -> None:
    tr.reset_manager()
    with pytest.raises(ConfigError) as info:
        load_config({**BASE, **change})
    for name in names:
        assert name in str(info.value)


def test_preset_validates() -> None:
    config = load_config("todo-sdxl")
    assert config.merger.name == "downsample" and config.adapter.levels == [0]


@pytest.mark.parametrize("latent", [(18, 22), (16, 16)])
def test_on_the_unet_queries_keep_their_length_and_kv_are_pooled(latent) -> None:
    tr.reset_manager()
    unet = tiny_sdxl_unet(seed=0, sample_size=16)
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name):
        def hook(module, args):
            seen.setdefault(name, []).append(args[0].detach().clone())

        return hook

    blocks = [(name, m) for name, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
    for name, block in blocks:
        block.attn1.to_q.register_forward_pre_hook(record(f"{name}.q"))
        block.attn1.to_k.register_forward_pre_hook(record(f"{name}.k"))
        block.attn1.to_v.register_forward_pre_hook(record(f"{name}.v"))
    inputs = tiny_sdxl_inputs(unet, batch=2, height=latent[0], width=latent[1])
    level0 = (math.ceil(latent[0] / 2), math.ceil(latent[1] / 2))
    pooled = math.ceil(level0[0] / 2) * math.ceil(level0[1] / 2)
    with tr.apply(unet, "todo-sdxl"), torch.no_grad():
        out = unet(**inputs).sample
    assert torch.isfinite(out).all()
    merged_blocks = 0
    for name, _ in blocks:
        q, k, v = seen[f"{name}.q"][0], seen[f"{name}.k"][0], seen[f"{name}.v"][0]
        if q.shape[1] == level0[0] * level0[1]:  # level 0: pooled keys and values, full queries
            merged_blocks += 1
            assert k.shape[1] == v.shape[1] == pooled
            torch.testing.assert_close(k, downsample_tokens(q, level0, 2, "nearest"), rtol=0, atol=0)
        else:  # other levels untouched
            assert k.shape == q.shape and torch.equal(k, q)
    assert merged_blocks == 3


class WholeGrid(GlobalPartitioner):
    name = "test_whole_grid"

    class Params(StrictParams):
        name: Literal["test_whole_grid"] = "test_whole_grid"


class WholeGridPlugin:
    @hookimpl
    def tokenreduce_register(self, registry) -> None:  # noqa: ANN001
        registry.add(WholeGrid)


def test_a_partitioner_that_declares_the_whole_grid_is_accepted_whatever_its_name() -> None:
    """ToDo reads the partitioner's declared capability, not its name."""
    tr.reset_manager()
    tr.register_plugin(WholeGridPlugin(), name="todo-test-whole-grid")
    try:
        config = load_config({**BASE, "partitioner": {"name": "test_whole_grid"}})
        assert config.partitioner.name == "test_whole_grid"
    finally:
        tr.reset_manager()
