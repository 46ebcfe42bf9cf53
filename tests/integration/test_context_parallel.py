"""Which context-parallel set-ups tokenreduce accepts, checked in one process.

What ``enable_parallelism(ContextParallelConfig(...))`` leaves on a model is recreated without a
process group: the config on ``model._parallel_config`` and, where the model's plan splits at its
own forward, diffusers' split hook on the model. The two-process runs are in
``test_context_parallel_mp.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

import tokenreduce as tr
from tokenreduce.config import ConfigError
from tokenreduce.parallel import ENTRY_SPLIT_HOOK, gathered_inverse
from tokenreduce.testing.tiny_flux import tiny_flux_transformer
from tokenreduce.testing.tiny_wan import tiny_wan_inputs, tiny_wan_transformer


def _enable(model: Any, split_at_entry: bool = True, **config: Any) -> None:
    """What diffusers' ``enable_parallelism`` records on the model (no mesh is set up)."""
    from diffusers import ContextParallelConfig
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.context_parallel import ContextParallelSplitHook

    cp = ContextParallelConfig(**({"ulysses_degree": 2} | config))
    model._parallel_config = SimpleNamespace(context_parallel_config=cp)
    if split_at_entry:
        hook = ContextParallelSplitHook(type(model)._cp_plan[""], cp)
        HookRegistry.check_if_exists_or_initialize(model).register_hook(hook, ENTRY_SPLIT_HOOK)


def test_flux_with_context_parallelism_is_accepted() -> None:
    model = tiny_flux_transformer()
    _enable(model)
    handle = tr.apply(model, "toma-flux")
    handle.remove()


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"split_at_entry": False}, "does not split hidden_states at the model's own forward"),
        ({"ulysses_anything": True}, "ulysses_anything/ring_anything"),
    ],
)
def test_flux_set_ups_that_cannot_be_served_are_refused_before_patching(
    settings: dict[str, Any], message: str
) -> None:
    model = tiny_flux_transformer()
    _enable(model, **settings)
    forward = model.forward
    with pytest.raises(ConfigError, match=message):
        tr.apply(model, "toma-flux")
    assert model.forward == forward and tr.get_handle(model) is None  # nothing was patched


def test_an_adapter_without_support_is_refused_at_apply() -> None:
    model = tiny_wan_transformer()
    model._parallel_config = SimpleNamespace(context_parallel_config=SimpleNamespace(ulysses_degree=2))
    forward = model.forward
    with pytest.raises(ConfigError, match="wan adapter does not support context parallelism"):
        tr.apply(model, "toma-wan")
    assert model.forward == forward and tr.get_handle(model) is None


def test_an_adapter_without_support_is_refused_at_the_call_when_enabled_after_apply() -> None:
    model = tiny_wan_transformer()
    handle = tr.apply(model, "toma-wan", schedule={"name": "always"})  # a bare model: merge every call
    inputs = tiny_wan_inputs(model)
    model(**inputs)  # fine before
    model._parallel_config = SimpleNamespace(context_parallel_config=SimpleNamespace(ulysses_degree=2))
    with pytest.raises(ValueError, match="wan adapter does not support context parallelism"):
        model(**inputs)
    handle.remove()


def test_a_model_without_context_parallelism_is_accepted() -> None:
    model = tiny_flux_transformer()
    model._parallel_config = SimpleNamespace(context_parallel_config=None)  # tensor parallel only
    handle = tr.apply(model, "toma-flux")
    assert isinstance(handle.model, torch.nn.Module)
    handle.remove()


def test_gathered_inverse_undoes_each_chunks_order() -> None:
    order = torch.tensor([2, 0, 3, 1])  # one chunk's raster -> region order
    inverse = torch.argsort(order)
    raster = torch.arange(12)
    # Three ranks: rank r holds raster[4r:4r+4] in region order; the model gathers them in rank order.
    gathered = torch.cat([raster[4 * r : 4 * r + 4][order] for r in range(3)])
    assert torch.equal(gathered[gathered_inverse(inverse, 3)], raster)
