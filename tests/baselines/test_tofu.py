"""ToFu: the ``tofu`` merger (prune or MLERP fusion after ToMeSD's bipartite matching)."""

from __future__ import annotations

import pytest
import torch

import tokenreduce as tr
from tokenreduce.baselines.tofu import TofuMerger, mlerp
from tokenreduce.baselines.tomesd import TomesdGridSelector
from tokenreduce.baselines.tomesd.matching import group_mean
from tokenreduce.builtins import GlobalPartitioner
from tokenreduce.config import ConfigError, load_config
from tokenreduce.engine import Runtime
from tokenreduce.interfaces import SelectContext
from tokenreduce.testing.contracts import make_runtime
from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_unet


def tofu_plan(policy: str, x: torch.Tensor, grid=(8, 8), ratio=0.5):
    merger = TofuMerger(TofuMerger.Params(policy=policy))
    selector = TomesdGridSelector(TomesdGridSelector.Params(use_rand=False))
    layout = make_runtime(
        partitioner=GlobalPartitioner(), selector=selector, merger=merger, ratio=ratio
    ).layout(grid)
    features = Runtime.features(x, layout)
    destinations = selector.select(features, SelectContext(layout=layout))
    return layout, layout.global_destinations(destinations), merger.plan(x, features, destinations, layout)


def groups_of(plan, n: int) -> torch.Tensor:
    """``(keep, N)`` membership of the first sample, read from unmerge of one-hot merged tokens."""
    batch, keep = plan.matching.kept.shape
    index = torch.arange(keep, dtype=torch.float64).view(1, keep, 1).expand(batch, keep, 1)
    owner = plan.unmerge(index)[0, :, 0].long()
    return torch.nn.functional.one_hot(owner, keep).T.bool()


def test_prune_keeps_destinations_and_kept_tokens_unchanged() -> None:
    x = torch.randn(2, 64, 6)
    layout, destinations, plan = tofu_plan("prune", x)
    merged = plan.merge(x)
    assert merged.shape == (2, layout.keep, 6)
    for b in range(2):
        kept = plan.matching.positions[b]
        assert torch.equal(merged[b], x[b, kept])  # every kept token is its own exact value
        assert set(destinations.tolist()) <= set(kept.tolist())  # destinations are always kept
    # Unmerge: pruned sources copy their destination's output.
    y = torch.randn_like(merged)
    restored = plan.unmerge(y)
    groups = groups_of(plan, 64)
    for j in range(layout.keep):
        members = groups[j].nonzero().flatten()
        assert torch.equal(restored[0, members], y[0, j].expand(len(members), 6))


def test_mlerp_has_the_largest_norm_of_its_group_and_the_mean_direction() -> None:
    x = torch.randn(1, 64, 6, dtype=torch.float64) * torch.rand(1, 64, 1, dtype=torch.float64) * 3
    layout, _, plan = tofu_plan("mlerp", x)
    merged = plan.merge(x)[0]
    groups = groups_of(plan, 64)
    multi = 0
    for j in range(layout.keep):
        members = x[0, groups[j]]
        largest = members.norm(dim=-1).max()
        torch.testing.assert_close(merged[j].norm(), largest)
        mean = members.mean(dim=0)
        torch.testing.assert_close(merged[j] / merged[j].norm(), mean / mean.norm())
        multi += len(members) > 1
    assert multi > 0


def test_mlerp_of_a_single_token_is_exact() -> None:
    x = torch.randn(2, 1, 5, 4)
    target = torch.zeros(1, 1, 5, dtype=torch.long) + torch.arange(5)
    assert torch.equal(mlerp(x, target), x)


def test_mlerp_keeps_norms_where_averaging_shrinks_them() -> None:
    x = torch.randn(1, 64, 6)
    _, _, fused = tofu_plan("mlerp", x)
    mean_norms = fused.kept(group_mean(x.unsqueeze(1), fused.matching.target)).norm(dim=-1)
    fused_norms = fused.merge(x).norm(dim=-1)
    assert bool((fused_norms >= mean_norms - 1e-5).all()) and bool((fused_norms > mean_norms + 1e-3).any())


@pytest.mark.parametrize(
    ("policy", "switch_at", "expected"),
    [
        ("auto", 0.5, ["prune", "prune", "mlerp", "mlerp", "mlerp"]),
        ("auto", 0.0, ["mlerp"] * 5),
        ("auto", 1.0, ["prune"] * 4 + ["mlerp"]),
        ("prune", 0.5, ["prune"] * 5),
        ("mlerp", 0.5, ["mlerp"] * 5),
    ],
)
def test_for_site_picks_the_mode_by_position(policy, switch_at, expected) -> None:
    merger = TofuMerger(TofuMerger.Params(policy=policy, switch_at=switch_at))
    bound = [merger.for_site(p) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert [m.mode for m in bound] == expected
    if policy != "auto":
        assert all(m is merger for m in bound)


def test_flux_needs_shared_matching() -> None:
    tr.reset_manager()
    base = {
        "adapter": {"name": "flux"},
        "selector": {"name": "tomesd_grid"},
        "partitioner": {"name": "global"},
    }
    with pytest.raises(ConfigError, match=r"merger 'tofu'.*adapter 'flux'"):
        load_config({**base, "merger": {"name": "tofu"}})
    assert load_config("tofu-flux").merger.matching == "shared"


def test_preset_prunes_early_and_fuses_late_on_the_unet() -> None:
    tr.reset_manager()
    unet = tiny_sdxl_unet(seed=0, sample_size=16)
    inputs = tiny_sdxl_inputs(unet, batch=2)
    with torch.no_grad():
        baseline = unet(**inputs).sample
    with tr.apply(unet, "tofu-sdxl") as handle, torch.no_grad():
        out = unet(**inputs).sample
        # One group per block (reuse 'always'), in execution order: 3 blocks at the 2x level.
        modes = [group.merger.mode for group in handle.runtime.groups.values()]
    assert modes == ["prune", "mlerp", "mlerp"]
    assert torch.isfinite(out).all() and not torch.allclose(out, baseline, atol=1e-4)
    with torch.no_grad():
        assert torch.equal(unet(**inputs).sample, baseline)  # removed exactly
