"""Counter-based noise: standard normal, new at each draw, repeatable from the counter, and the
same values under torch.compile (which cannot trace a torch.Generator)."""

from __future__ import annotations

import torch

from tokenreduce import noise


def counter() -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64)


def test_values_are_standard_normal_and_new_at_each_draw() -> None:
    draws = counter()
    first, second = noise.normal((400, 250), draws, seed=0), noise.normal((400, 250), draws, seed=0)
    assert draws.item() == 2
    for x in (first, second):
        assert abs(float(x.mean())) < 0.02 and abs(float(x.std()) - 1.0) < 0.02
        assert abs(float((x.abs() < 1.0).float().mean()) - 0.6827) < 0.01  # one-sigma mass
    assert abs(float(torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1])) < 0.02


def test_the_counter_and_seed_decide_the_values() -> None:
    draws = counter()
    first = noise.normal((7, 5), draws, seed=3)
    draws.zero_()
    assert torch.equal(noise.normal((7, 5), draws, seed=3), first)
    assert not torch.equal(noise.normal((7, 5), counter(), seed=4), first)
    odd = noise.normal((3, 3), counter(), seed=3, dtype=torch.bfloat16)  # an odd count, another dtype
    assert odd.shape == (3, 3) and odd.dtype == torch.bfloat16


def test_compiled_draws_equal_eager_ones_and_advance_the_counter() -> None:
    compiled = torch.compile(lambda d: noise.normal((33, 6), d, 5), fullgraph=True)
    eager_draws, compiled_draws = counter(), counter()
    for _ in range(2):
        want = noise.normal((33, 6), eager_draws, 5)
        torch.testing.assert_close(compiled(compiled_draws), want, rtol=1e-5, atol=1e-5)
    assert compiled_draws.item() == eager_draws.item() == 2


def test_the_runtime_counts_draws_on_the_device_and_reset_restarts_them() -> None:
    import tokenreduce as tr
    from tokenreduce.testing.tiny_wan import tiny_wan_inputs, tiny_wan_transformer

    model = tiny_wan_transformer()
    inputs = tiny_wan_inputs(model, batch=1)
    with tr.apply(model, "toma-wan", schedule={"name": "always"}) as handle, torch.no_grad():
        first = model(**inputs, return_dict=False)[0]
        draws = handle.runtime.draws(torch.device("cpu"))
        assert draws.item() == 1  # one selection per call: one plan shared by every block
        handle.reset()
        assert draws.item() == 0
        again = model(**inputs, return_dict=False)[0]
    assert torch.equal(first, again)  # the same draw after a reset: the same destinations


def test_the_counter_is_a_static_input_of_the_compiled_graph_so_cuda_graph_trees_may_advance_it() -> None:
    """Under ``torch.compile(mode="reduce-overhead")`` CUDA-graph trees skip a graph that mutates an
    input unless the input's address is static (``check_for_mutation``). The draw counter is
    advanced in place inside the call: it must be among the graph's static inputs."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._guards import TracingContext

    import tokenreduce as tr
    from tokenreduce.testing.tiny_wan import tiny_wan_inputs, tiny_wan_transformer

    graphs: list[tuple[list[int], list[int]]] = []

    def inspect(gm: torch.fx.GraphModule, _: object) -> torch.fx.GraphModule:
        context = TracingContext.try_get()
        assert context is not None and context.fw_metadata is not None
        meta = context.fw_metadata
        graphs.append((list(meta.mutated_inp_runtime_indices), list(meta.static_input_indices)))
        return gm

    torch._dynamo.reset()
    model = tiny_wan_transformer()
    inputs = tiny_wan_inputs(model, batch=1)  # a 3 x 9 x 10 token grid: 9 frames of 144 x 160
    with tr.apply(model, "toma-wan", schedule={"name": "always"}) as handle, torch.no_grad():
        handle.prepare(144, 160, frames=9)  # as before any compiled call at a new size
        compiled = torch.compile(model, backend=aot_autograd(fw_compiler=inspect), fullgraph=True)
        for _ in range(2):
            compiled(**inputs, return_dict=False)
        assert handle.runtime.draws(torch.device("cpu")).item() == 2
    torch._dynamo.reset()
    assert len(graphs) == 1
    mutated, static = graphs[0]
    assert mutated, "the counter advances in place inside the graph"
    assert set(mutated) <= set(static)
