"""Facility-location (submodular) destination selector, greedy and batched over regions.

Objective per region and sample: ``f(D) = sum_i max_{j in D} sim(i, j)`` with cosine similarity.
Destinations are shared by the batch: by default the objective is summed over the samples (a
sum of facility-location functions is still submodular), or taken from sample 0 only.

The greedy runs ``k`` iterations of a few batched tensor ops: no host synchronisation and no
data-dependent shapes, so it can be captured by CUDA graphs or ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Literal

import torch
from pydantic import Field

from tokenreduce.interfaces import SelectContext, Selector
from tokenreduce.layout import Regions, destinations_for_fraction
from tokenreduce.params import StrictParams

#: Diagonal of the similarity in the greedy: a candidate covers itself better than any other token can
#: (cosines are at most 1). Once chosen, every candidate's own column is covered at this value, so
#: chosen candidates score strictly below every unchosen one (by at least 1 per sample) without a mask,
#: while unchosen candidates keep their order (their scores all shift by the same constant).
SELF_COVER = 2.0
#: Largest cosine magnitude taken into z space (``atanh(1)`` is infinite).
Z_BOUND = 1.0 - 1e-6


def greedy_picks(
    features: torch.Tensor,
    k: int,
    padding: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Greedy facility-location picks ``(R, k)`` from ``(B, R, S, C)`` normalised features, objective
    summed over the batch. ``padding``: ``(R, S)`` bool of padding slots (zero features), or ``None``.
    ``noise``: ``(R, S, S)`` moved into every sample's similarities (candidate, client; see
    :func:`perturbed`), or ``None``.

    Per pick: one ``maximum``, one ``sum``, one ``argmax`` and one ``gather`` (the covered similarity
    of every client after the pick is the chosen row of the ``maximum`` just computed). Once a
    region has no valid slot left its remaining picks are arbitrary.
    """
    batch, regions, slots, _ = features.shape
    sim = features @ features.transpose(-1, -2)  # (B, R, S, S): sim[b, r, v, i] candidate v, client i
    if noise is not None:
        if padding is not None:  # padding clients' columns stay constant (see below)
            noise = noise.masked_fill(padding.unsqueeze(1), 0.0)
        sim = perturbed(sim, noise)
    sim.diagonal(dim1=-2, dim2=-1).fill_(SELF_COVER)
    if padding is not None:
        # Padding candidates cover nothing (their score is the current objective, below any real one);
        # padding clients have zero features, hence a constant column: no mask needed there.
        sim.masked_fill_(padding.unsqueeze(0).unsqueeze(-1), float("-inf"))
    covered = sim.new_full((1, 1, 1, slots), -1.0)  # m_i = -1 (the lowest cosine) before any pick
    wide = torch.promote_types(sim.dtype, torch.float32)  # sums in at least float32
    picks: list[torch.Tensor] = []
    for step in range(k):
        m = torch.maximum(sim, covered)
        idx = m.sum(dim=(0, 3), dtype=wide).argmax(dim=-1)  # (R,)
        picks.append(idx)
        if step + 1 < k:
            covered = m.gather(2, idx.view(1, regions, 1, 1).expand(batch, regions, 1, slots))
    return torch.stack(picks, dim=1)


def perturbed(sim: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Cosines moved by ``noise`` in Fisher's z (``atanh``) space: the result stays inside (-1, 1),
    so SELF_COVER still exceeds every off-diagonal similarity, with no ties at the bounds (clamping
    would tie every pushed-out value at 1 and hand the pick to the lowest index); near-equal
    cosines swap order far more often than distant ones. In float32 at least: half precision would
    round the perturbed cosines near 1 into ties again."""
    wide = torch.promote_types(sim.dtype, torch.float32)
    z = torch.atanh(sim.to(wide).clamp(-Z_BOUND, Z_BOUND))
    return torch.tanh(z + noise.to(wide))


def facility_location_greedy(
    features: torch.Tensor, valid: torch.Tensor, k: int, reduce: Literal["sum", "first"] = "sum"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy facility-location picks and their gains (the selector uses :func:`greedy_picks` alone).

    ``features``: ``(B, R, S, C)`` L2-normalised tokens; ``valid``: ``(R, S)`` bool (padding slots are
    never picked and never count as clients). Returns ``(indices, gains)``, both ``(R, k)``.

    Gains are the marginal gains of ``f`` measured from the baseline ``m_i = -1`` (the lowest
    cosine), so the first gain is the row sum plus the number of clients (per sample) and the
    gains are non-increasing. Once a region has no valid slot left, its remaining picks are slot 0
    with gain 0; callers only use the first ``valid.sum(1)`` picks at most.
    """
    feats = features.float()
    if reduce == "first":
        feats = feats[:1]
    elif reduce != "sum":
        raise ValueError(f"reduce must be 'sum' or 'first', got {reduce!r}")
    valid = valid.to(device=feats.device, dtype=torch.bool)
    feats = feats * valid[None, :, :, None]
    indices = greedy_picks(feats, k, ~valid)
    # Gains (and slot 0 past the valid count) from the true objective, outside the greedy.
    counts = valid.sum(dim=1, keepdim=True)
    real = torch.arange(k, device=feats.device)[None, :] < counts
    indices = torch.where(real, indices, torch.zeros_like(indices))
    sim = feats @ feats.transpose(-1, -2)
    batch, regions, slots, _ = feats.shape
    clients = valid.to(feats.dtype)[None, :, None, :]
    covered = torch.where(valid, -1.0, 0.0).to(feats.dtype)[None, :, None, :].expand(batch, -1, -1, -1)
    gains = []
    for step in range(k):
        row = sim.gather(2, indices[:, step].view(1, regions, 1, 1).expand(batch, regions, 1, slots))
        new = torch.maximum(covered, row * clients)
        gains.append((new - covered).sum(dim=(0, 2, 3)))
        covered = new
    gain_table = torch.where(real, torch.stack(gains, dim=1), torch.zeros(()))
    return indices, gain_table


class FacilityLocationSelector(Selector):
    name = "facility_location"

    class Params(StrictParams):
        name: Literal["facility_location"] = "facility_location"
        reference: Literal["sum", "first"] = Field(
            "sum",
            description=(
                "Which samples choose the batch-shared destinations: 'sum' maximises the objective summed "
                "over the batch; 'first' uses sample 0 only (the original release's behaviour)."
            ),
        )
        fraction: Annotated[float, Field(gt=0.0, le=1.0)] | None = Field(
            None,
            description=(
                "Destinations as a fraction of each region's tokens (for mergers that keep unmatched tokens, "
                "e.g. bipartite); null: one per kept token."
            ),
        )

        jitter: Annotated[float, Field(ge=0.0)] = Field(
            0.0,
            description=(
                "Standard deviation of Gaussian noise added to the cosine similarities between each "
                "region's tokens before the greedy, in Fisher's z space (atanh), drawn anew at every selection "
                "(a counter-based hash of the config's seed: the same values eager, compiled and in CUDA "
                "graphs; the draws restart with each generation, so one seed gives one image at every "
                "call): near-equal candidates then alternate between steps, so merge errors do not pile "
                "up in the same tokens. 0: deterministic (the paper's selector)."
            ),
        )

    params: Params

    def count(self, regions: Regions, keep: Sequence[int]) -> tuple[int, ...]:
        return destinations_for_fraction(regions.sizes, tuple(keep), self.params.fraction)

    def select(self, features: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        layout = ctx.layout
        feats = features[:1] if self.params.reference == "first" else features
        # Features are normalised and zero on padding slots (the runtime's contract); a layout without
        # padding needs no mask at all (a host-side fact).
        padding = ~layout.regions.valid if layout.regions.ragged else None
        noise = similarity_noise(feats, self.params.jitter, ctx) if self.params.jitter > 0 else None
        return greedy_picks(feats, layout.k, padding, noise)


def similarity_noise(features: torch.Tensor, scale: float, ctx: SelectContext) -> torch.Tensor:
    """One ``(R, S, S)`` Gaussian draw of standard deviation ``scale`` for the similarities of
    ``(B, R, S, C)`` features (the same for every sample: the destinations are shared). Drawn on the
    similarities rather than the features: ``S`` values per token instead of ``C``, and a scale that
    means the same at every hidden size."""
    _, regions, slots, _ = features.shape
    return scale * ctx.normal((regions, slots, slots), features.device, features.dtype)
