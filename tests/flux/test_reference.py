"""The adapter against a float64 hand-written forward of the specified placement."""

from __future__ import annotations

import copy

import pytest
import torch

import tokenreduce as tr
from tokenreduce.config import resolve
from tokenreduce.engine.runtime import Runtime
from tokenreduce.interfaces import SelectContext
from tokenreduce.testing.tiny_flux import tiny_flux_inputs, tiny_flux_transformer
from tokenreduce.toma_plugin.facility_location import SELF_COVER

from .reference import reference_forward

TOMA = {
    "adapter": {"name": "flux"},
    "ratio": 0.5,
    "selector": {"name": "facility_location", "reference": "sum"},
    "merger": {"name": "attention"},
    "partitioner": {"name": "tile", "size": [4, 4]},
    "reuse": {"name": "step_sharing", "destinations_every": 1, "weights_every": 1, "sharing": "kind"},
}


def config(**changes: object) -> dict:
    out = copy.deepcopy(TOMA)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and "name" not in value:
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


#: Gains closer than this are float64 rounding apart: a tie the two forwards may break either way.
TIE = 1e-12


def assert_picks_differ_only_at_ties(
    features: torch.Tensor, padding: torch.Tensor | None, ours: torch.Tensor, theirs: torch.Tensor
) -> None:
    """Where two greedy runs' ``(R, k)`` picks differ in a tile, the first differing pick must be a
    tie: on ``features`` (``(B, R, S, C)``, normalised; ``padding``: ``(R, S)`` or ``None``), after
    the picks both made before it, the two candidates' facility-location gains are within
    :data:`TIE`. Later picks of that tile follow from different coverage and are not compared."""
    sim = features @ features.transpose(-1, -2)
    sim.diagonal(dim1=-2, dim2=-1).fill_(SELF_COVER)
    if padding is not None:  # as the selector: padding candidates cover nothing
        sim.masked_fill_(padding.unsqueeze(0).unsqueeze(-1), float("-inf"))
    for region in (ours != theirs).any(dim=1).nonzero().flatten().tolist():
        step = int((ours[region] != theirs[region]).nonzero()[0])
        tile = sim[:, region]  # (B, S, S): candidate, client
        covered = tile.new_full((tile.shape[0], 1, tile.shape[-1]), -1.0)
        for pick in ours[region, :step].tolist():
            covered = torch.maximum(tile[:, pick : pick + 1], covered)
        gains = torch.maximum(tile, covered).sum(dim=(0, 2))
        gap = (gains[ours[region, step]] - gains[theirs[region, step]]).abs().item()
        assert gap < TIE, f"tile {region}: pick {step} differs without a tie (gains {gap:.3g} apart)"


def component_planner(cfg: dict, grid: tuple[int, int], model_picks: list[torch.Tensor]):
    """Plans straight from the configured selector and merger (no adapter, no reuse machinery).

    The two forwards round differently (1e-16), so a destination whose greedy gain ties another's
    to float64 rounding may be picked differently; in such a tile (and only there) the model's
    picks, ``model_picks`` in call order, are used, so the rest of the plan is still compared."""
    runtime = Runtime(resolve(tr.load_config(cfg)))
    queue = list(model_picks)

    def plan(kind: str, index: int, tokens: torch.Tensor):
        layout = runtime.layout(grid)
        features = Runtime.features(tokens, layout, runtime.config.features)
        merger = runtime.merger
        dests = None
        if merger.needs_destinations:
            dests = runtime.selector.select(features, SelectContext(layout=layout))
            theirs = queue.pop(0)
            if not torch.equal(dests, theirs):
                padding = ~layout.regions.valid if layout.regions.ragged else None
                first = getattr(runtime.selector.params, "reference", "sum") == "first"
                assert_picks_differ_only_at_ties(features[:1] if first else features, padding, dests, theirs)
                dests = theirs
        return merger.plan(tokens, features, dests, layout)

    return plan


def run_both(
    cfg: dict, *, grid=(8, 8), batch=1, text_len=7, layers=(2, 3), seed=0, guidance=False, corrupt=None
):
    """The model with ``cfg`` applied and the reference forward on the same inputs. ``corrupt``: a
    change made to every pick of the model's selector (the reference must then disagree)."""
    model = tiny_flux_transformer(
        seed, num_layers=layers[0], num_single_layers=layers[1], guidance_embeds=guidance
    ).double()
    inputs = tiny_flux_inputs(
        model, batch=batch, height_tokens=grid[0], width_tokens=grid[1], text_len=text_len, seed=seed
    )
    reference_model = copy.deepcopy(model)
    handle = tr.apply(model, cfg)
    adapter = handle.adapter
    double, single = adapter.selected(model)
    model_picks: list[torch.Tensor] = []
    select = handle.runtime.selector.select

    def recorded_select(features: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        picks = select(features, ctx) if corrupt is None else corrupt(select(features, ctx))
        model_picks.append(picks)
        return picks

    handle.runtime.selector.select = recorded_select
    with torch.no_grad():
        got = model(**inputs).sample
        want = reference_forward(
            reference_model,
            inputs,
            set(double),
            set(single),
            component_planner(cfg, grid, model_picks),
            share_by_kind=cfg["reuse"].get("sharing", "kind") == "kind",
            double_ff=adapter.params.double_ff,
            single_run=adapter.params.single_placement == "run",
        )
    handle.remove()
    return got, want


def test_reference_without_merging_is_the_model() -> None:
    """The hand-written forward itself matches diffusers (so the comparisons below mean something)."""
    model = tiny_flux_transformer(num_layers=2, num_single_layers=3).double()
    inputs = tiny_flux_inputs(model, height_tokens=6, width_tokens=10, text_len=5)
    with torch.no_grad():
        torch.testing.assert_close(
            reference_forward(model, inputs, set(), set(), planner=None),
            model(**inputs).sample,
            rtol=1e-9,
            atol=1e-10,
        )


@pytest.mark.parametrize(
    ("grid", "batch", "text_len", "sharing"),
    [
        ((8, 8), 1, 7, "kind"),
        ((6, 10), 2, 7, "kind"),  # non-square, 10 not divisible by the 4-token tile, CFG-like batch
        ((5, 7), 3, 13, "kind"),  # neither side divisible by the tile
        ((6, 10), 2, 7, "block"),  # one plan per block
    ],
)
def test_toma_matches_reference(grid, batch, text_len, sharing) -> None:
    cfg = config(adapter={"skip_double": 0, "skip_single": 1}, reuse={"sharing": sharing})
    got, want = run_both(cfg, grid=grid, batch=batch, text_len=text_len)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("grid", [(8, 8), (6, 10)])  # whole tiles; border tiles with padding
def test_a_wrong_pick_is_not_taken_for_a_tie(grid) -> None:
    """The tie allowance is narrow: a selector whose every pick is moved to the next slot fails."""
    cfg = config(adapter={"skip_double": 0, "skip_single": 1})
    with pytest.raises(AssertionError, match="differs without a tie"):
        run_both(cfg, grid=grid, batch=2, corrupt=lambda picks: (picks + 1) % 16)


def test_toma_matches_reference_with_default_skips() -> None:
    got, want = run_both(config(), grid=(6, 10), batch=2, layers=(6, 7), guidance=True)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize("blocks", [[0, 1, 2, 3, 4], [1, 3]])
def test_arbitrary_linear_merger_matches_reference(blocks) -> None:
    """Non-convex M and non-stochastic U: the exact merge/unmerge points and RoPE rows are checked."""
    cfg = config(merger={"name": "flux_test_fixed"}, adapter={"blocks": blocks}, ratio=0.4)
    got, want = run_both(cfg, grid=(6, 10), batch=2)
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)


def test_merging_changes_the_reference_output() -> None:
    """Guard against a vacuous comparison: the merged reference differs from the unmerged one."""
    cfg = config(adapter={"skip_double": 0, "skip_single": 0})
    got, _ = run_both(cfg, grid=(6, 10), batch=2)
    model = tiny_flux_transformer(0, num_layers=2, num_single_layers=3).double()
    with torch.no_grad():
        plain = model(**tiny_flux_inputs(model, batch=2, height_tokens=6, width_tokens=10)).sample
    assert (got - plain).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("adapter", "merger"),
    [
        ({"single_placement": "run", "skip_single": 1}, "attention"),
        (
            {"single_placement": "run", "blocks": [0, 2, 3, 5]},
            "flux_test_fixed",
        ),  # two runs, one of one block
        ({"double_ff": True, "skip_double": 0}, "attention"),
        ({"double_ff": True, "single_placement": "run", "blocks": [1, 3, 4]}, "flux_test_fixed"),
    ],
)
@pytest.mark.parametrize("sharing", ["kind", "block"])
def test_opt_in_placements_match_reference(adapter, merger, sharing) -> None:
    """Merging once around runs of single-stream blocks and the double blocks' image MLP, where the
    reference places them (non-convex ``M`` and non-stochastic ``U`` for the stand-in merger)."""
    cfg = config(adapter=adapter, merger={"name": merger}, reuse={"sharing": sharing}, ratio=0.4)
    got, want = run_both(cfg, grid=(6, 10), batch=2, layers=(2, 4))
    plain_cfg = config(
        adapter={k: v for k, v in adapter.items() if k in ("skip_single", "blocks", "skip_double")}
    )
    plain, _ = run_both(
        {**plain_cfg, "merger": cfg["merger"], "reuse": cfg["reuse"], "ratio": 0.4},
        grid=(6, 10),
        batch=2,
        layers=(2, 4),
    )
    assert (got - plain).abs().max() > 1e-4  # the option changes where tokens are merged
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
