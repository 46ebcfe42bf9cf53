"""``torch.compile(fullgraph=True)`` of a Wan transformer with ToMA applied (CPU, inductor)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import tokenreduce as tr
from tokenreduce.testing.tiny_wan import tiny_wan_inputs, tiny_wan_transformer

pytestmark = pytest.mark.slow


def test_compiled_transformer_matches_eager() -> None:
    model = tiny_wan_transformer(num_layers=2)
    inputs = tiny_wan_inputs(model, batch=2)
    tr.apply(model, "toma-wan")
    timesteps = torch.linspace(900.0, 100.0, 4)
    with torch.no_grad():
        # Eager calls build the static layout of this grid; compiled calls find it.
        eager = [model(**{**inputs, "timestep": t.expand(2)}).sample for t in timesteps]
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, fullgraph=True)
        for t, want in zip(timesteps, eager, strict=True):
            got = compiled(**{**inputs, "timestep": t.expand(2)}).sample
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert 1 <= torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
