"""The hot path never reads device data on the host.

Selection, merge and unmerge run here on ``meta`` tensors, which have shapes but no data: any
``.item()``, ``bool(tensor)``, ``nonzero`` or copy to the host raises. This is what CUDA-graph
capture and ``torch.compile(fullgraph=True)`` require, checked without a GPU.
"""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tokenreduce.config import load_config, resolve
from tokenreduce.engine import Runtime
from tokenreduce.interfaces import SelectContext

GRIDS = [(32, 32), (24, 40), (25, 37)]


def _presets() -> list[str]:
    return sorted(tokenreduce.reset_manager().registry.presets)


@pytest.mark.parametrize("preset", _presets())
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_plan_merge_unmerge_without_device_reads(preset: str, grid: tuple[int, int]) -> None:
    runtime = Runtime(resolve(load_config(preset)))
    try:
        host_layout = runtime.layout(grid)
    except ValueError:
        pytest.skip(f"{preset} does not apply to a {grid} grid (a validation error, tested elsewhere)")
    layout = host_layout.to("meta")
    x = torch.empty(2, grid[0] * grid[1], 32, device="meta", dtype=torch.float16)
    features = runtime.features(x, layout)
    generator = torch.Generator()  # never drawn from on meta tensors' behalf: shapes only
    destinations = None
    if runtime.merger.needs_destinations:
        destinations = runtime.selector.select(features, SelectContext(layout=layout, generator=generator))
        assert destinations.shape == (layout.regions.num_regions, layout.k)
    for position in (0.0, 1.0):  # methods that vary by block (ToFu) take both branches
        plan = runtime.merger.for_site(position).plan(x, features, destinations, layout)
        merged = plan.merge(x)
        assert merged.shape[0] == 2 and merged.shape[2] == 32
        if not runtime.merger.kv_only:
            assert merged.shape[1] == layout.keep
            assert plan.unmerge(merged).shape == x.shape
