"""The hot path never reads device data on the host.

Selection, merge and unmerge run here on ``meta`` tensors, which have shapes but no data: any
``.item()``, ``bool(tensor)``, ``nonzero`` or copy to the host raises. Tensors made from host data
on the device (``torch.tensor(..., device=...)``: a host-to-device copy) raise too. This is what
CUDA-graph capture and ``torch.compile(fullgraph=True)`` require, checked without a GPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

import tokenreduce
from tokenreduce.config import load_config, resolve
from tokenreduce.engine import Runtime
from tokenreduce.interfaces import SelectContext

GRIDS = [(32, 32), (24, 40), (25, 37)]


@contextmanager
def no_host_to_device_copies(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``torch.tensor``/``as_tensor`` onto a device other than the CPU raise inside the block."""
    with monkeypatch.context() as patch:
        for name in ("tensor", "as_tensor"):
            original = getattr(torch, name)

            def guarded(*args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
                device = kwargs.get("device")
                if device is not None and torch.device(device).type != "cpu":
                    raise AssertionError(
                        f"torch.{_name}(..., device={device!r}) copies host data to the device"
                    )
                return _original(*args, **kwargs)

            patch.setattr(torch, name, guarded)
        yield


def _cases() -> list[Any]:
    """Every preset, and the built-in components no preset uses, on a preset."""
    presets = [
        pytest.param(name, {}, id=name) for name in sorted(tokenreduce.reset_manager().registry.presets)
    ]
    grid = {"selector": {"name": "grid", "stride": [1, 2]}}
    jitter = {"selector": {"jitter": 0.1}}
    return [
        *presets,
        pytest.param("toma-sdxl", grid, id="toma-sdxl+grid"),
        pytest.param("toma-flux", jitter, id="toma-flux+jitter"),
    ]


@pytest.mark.parametrize(("preset", "overrides"), _cases())
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: f"{g[0]}x{g[1]}")
def test_plan_merge_unmerge_without_device_reads(
    preset: str, overrides: dict[str, Any], grid: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime = Runtime(resolve(load_config(preset, **overrides)))
    try:
        host_layout = runtime.layout(grid)
    except ValueError:
        pytest.skip(f"{preset} does not apply to a {grid} grid (a validation error, tested elsewhere)")
    layout = host_layout.to("meta")
    x = torch.empty(2, grid[0] * grid[1], 32, device="meta", dtype=torch.float16)
    # Once as is, so that modules imported lazily on the way bind the real torch.tensor, not the guard.
    _select_plan_merge_unmerge(runtime, layout, x)
    with no_host_to_device_copies(monkeypatch):
        _select_plan_merge_unmerge(runtime, layout, x)


def _select_plan_merge_unmerge(runtime: Runtime, layout: Any, x: torch.Tensor) -> None:
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
