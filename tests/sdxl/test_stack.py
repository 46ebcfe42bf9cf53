"""The ``stack`` site: one merge before and one unmerge after each Transformer2DModel's blocks.

With a plan shared by the blocks of a level and a merge that is exact after unmerge
(``M U = I``, true for hard assignments), per-block merging telescopes:
``x_L = x_0 + sum_l U(y_{l+1} - y_l) = x_0 + U(y_L - y_0)`` with ``y = M x`` evolving on merged
tokens, which is exactly the stack. So ``stack`` must equal ``block`` for a hard merger.
"""

from __future__ import annotations

import pytest
import torch

import tokenreduce
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_unet

BASE = {"ratio": 0.5, "partitioner": {"name": "tile", "size": 4}, "reuse": {"name": "step_sharing"}}


@pytest.fixture(scope="module")
def unet():
    tokenreduce.reset_manager()
    # Three blocks per Transformer2DModel at the lower levels, so stacks have first, middle and last blocks.
    return tiny_sdxl_unet(transformer_layers_per_block=(1, 3, 3), dtype=torch.float64)


def run(unet, config=None) -> torch.Tensor:
    inputs = tiny_sdxl_inputs(unet, batch=2)
    with torch.no_grad():
        if config is None:
            return unet(**inputs).sample
        handle = tokenreduce.apply(unet, config)
        try:
            return unet(**inputs).sample
        finally:
            handle.remove()


def test_stack_equals_per_block_for_a_hard_merge(unet) -> None:
    merger = {"merger": {"name": "hard_mean"}}
    block = run(unet, {**BASE, **merger, "adapter": {"name": "sdxl", "sites": ["block"]}})
    stack = run(unet, {**BASE, **merger, "adapter": {"name": "sdxl", "sites": ["stack"]}})
    reference = run(unet)
    assert not torch.allclose(stack, reference, atol=1e-3)  # merging does something
    torch.testing.assert_close(stack, block, rtol=1e-9, atol=1e-9)


def test_stack_is_close_to_per_block_for_toma(unet) -> None:
    block = run(unet, {**BASE, "adapter": {"name": "sdxl", "sites": ["block"]}})
    stack = run(unet, {**BASE, "adapter": {"name": "sdxl", "sites": ["stack"]}})
    reference = run(unet)
    effect = (block - reference).norm()
    assert (stack - block).norm() < 0.05 * effect


def test_stack_ratio_zero_and_remove_are_exact(unet) -> None:
    reference = run(unet)
    assert torch.equal(
        run(unet, {**BASE, "ratio": 0.0, "adapter": {"name": "sdxl", "sites": ["stack"]}}), reference
    )
    assert torch.equal(run(unet), reference)
    assert not [name for name, m in unet.named_modules() if "forward" in m.__dict__]


def test_stack_wraps_two_blocks_per_transformer(unet) -> None:
    handle = tokenreduce.apply(unet, {**BASE, "adapter": {"name": "sdxl", "sites": ["stack"]}})
    try:
        blocks = [name for name, m in unet.named_modules() if type(m).__name__ == "BasicTransformerBlock"]
        wrapped = [name for name in blocks if "forward" in unet.get_submodule(name).__dict__]
        transformers = {name for name, m in unet.named_modules() if type(m).__name__ == "Transformer2DModel"}
        per_transformer = {t: [b for b in blocks if b.startswith(t + ".")] for t in transformers}
        expected = {bs[0] for bs in per_transformer.values()} | {bs[-1] for bs in per_transformer.values()}
        assert set(wrapped) == expected
    finally:
        handle.remove()
