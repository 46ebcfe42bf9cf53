"""Context parallelism enabled before tokenreduce is refused with the order to use."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import tokenreduce as tr
from tokenreduce.config import ConfigError
from tokenreduce.testing.tiny_flux import tiny_flux_transformer


def test_apply_after_enable_parallelism_names_the_order() -> None:
    model = tiny_flux_transformer()
    # What `enable_parallelism(ContextParallelConfig(...))` records on the model.
    model._parallel_config = SimpleNamespace(context_parallel_config=SimpleNamespace(ulysses_degree=2))
    forward = model.forward
    with pytest.raises(ConfigError, match="apply tokenreduce first, then call enable_parallelism"):
        tr.apply(model, "toma-flux")
    assert model.forward == forward and tr.get_handle(model) is None  # nothing was patched


def test_a_model_without_context_parallelism_is_accepted() -> None:
    model = tiny_flux_transformer()
    model._parallel_config = SimpleNamespace(context_parallel_config=None)  # tensor parallel only
    handle = tr.apply(model, "toma-flux")
    assert isinstance(handle.model, torch.nn.Module)
    handle.remove()
