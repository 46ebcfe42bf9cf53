"""``torch.compile(fullgraph=True)`` of a Flux transformer with ToMA applied (CPU, inductor)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

import tokenreduce as tr
from tokenreduce.testing.tiny_flux import tiny_flux_inputs, tiny_flux_transformer

pytestmark = pytest.mark.slow


def test_compiled_transformer_matches_eager_with_bounded_graphs() -> None:
    model = tiny_flux_transformer(num_layers=1, num_single_layers=2)
    inputs = tiny_flux_inputs(model, batch=2, height_tokens=10, width_tokens=14, text_len=5)
    # Merging at every step: a compiled bare denoiser cannot follow a merge schedule (see below).
    tr.apply(
        model,
        "toma-flux",
        adapter={"name": "flux", "skip_double": 0, "skip_single": 0},
        schedule={"name": "always"},
    )
    timesteps = torch.linspace(1.0, 0.1, 10)
    with torch.no_grad():
        # One eager call reads the token grid from img_ids; compiled calls reuse it for the same N.
        eager = [model(**{**inputs, "timestep": t.expand(2)}).sample for t in timesteps]
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, fullgraph=True)
        for t, want in zip(timesteps, eager, strict=True):
            got = compiled(**{**inputs, "timestep": t.expand(2)}).sample
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # A new selection at every step: one graph for ten steps, the very first call's included.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_a_compiled_bare_denoiser_refuses_a_schedule_it_cannot_follow() -> None:
    """Inside the graph the timestep cannot be read, so the step is unknown: the call fails with a
    message that says what to do instead of merging on the wrong steps."""
    model = tiny_flux_transformer(num_layers=1, num_single_layers=2)
    inputs = tiny_flux_inputs(model, batch=2, height_tokens=10, width_tokens=14, text_len=5)
    every_third = {"name": "every", "k": 3, "offset": 2}  # follows the timesteps it sees, in eager mode
    tr.apply(
        model, "toma-flux", adapter={"name": "flux", "skip_double": 0, "skip_single": 0}, schedule=every_third
    )
    with torch.no_grad():
        model(**inputs)  # eager: reads the token grid
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        with pytest.raises(
            Exception, match="merge schedule 'every' cannot follow .* apply tokenreduce to the pipeline"
        ):
            compiled(**inputs)
