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


def facility_location_greedy(
    features: torch.Tensor, valid: torch.Tensor, k: int, reduce: Literal["sum", "first"] = "sum"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy facility-location picks.

    ``features``: ``(B, R, S, C)`` L2-normalised tokens; ``valid``: ``(R, S)`` bool (padding slots are
    never picked and never count as clients). Returns ``(indices, gains)``, both ``(R, k)``.

    Gains are the marginal gains of ``f`` measured from the baseline ``m_i = -1`` (the lowest
    cosine), so the first gain is the row sum plus the number of clients (per sample) and the
    gains are non-increasing. Once a region has no valid slot left, its remaining picks are
    arbitrary (slot 0) with gain 0; callers only use the first ``valid.sum(1)`` picks at most.
    """
    feats = features.float()
    if reduce == "first":
        feats = feats[:1]
    elif reduce != "sum":
        raise ValueError(f"reduce must be 'sum' or 'first', got {reduce!r}")
    batch, regions, slots, _ = feats.shape
    valid = valid.to(device=feats.device, dtype=torch.bool)
    clients = valid.to(feats.dtype)

    # sim[b, r, v, i]: similarity of candidate v and client i; padding clients contribute 0.
    sim = feats @ feats.transpose(-1, -2) * clients[None, :, None, :]
    blocked = ~valid  # (R, S): padding, then also the chosen slots
    slot_ids = torch.arange(slots, device=feats.device)
    # First pick: largest row sum, reported as a gain from the baseline m_i = -1 of every client.
    gain = sim.sum(dim=(0, 3)) + batch * clients.sum(dim=-1, keepdim=True)  # (R, S)
    picks: list[torch.Tensor] = []
    gains: list[torch.Tensor] = []
    best = sim.new_empty(0)
    for step in range(k):
        if step > 0:
            gain = torch.relu(sim - best.unsqueeze(2)).sum(dim=(0, 3))
        gain = gain.masked_fill(blocked, float("-inf"))
        idx = gain.argmax(dim=-1)  # (R,)
        picks.append(idx)
        gains.append(gain.gather(1, idx[:, None]).squeeze(1))
        blocked = blocked | (slot_ids[None, :] == idx[:, None])
        row = sim.gather(2, idx.view(1, regions, 1, 1).expand(batch, regions, 1, slots)).squeeze(2)
        best = row if step == 0 else torch.maximum(best, row)  # m_i = max_{j in D} sim(i, j)

    indices = torch.stack(picks, dim=1)
    gain_table = torch.stack(gains, dim=1)
    gain_table = torch.where(torch.isinf(gain_table), torch.zeros_like(gain_table), gain_table)
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

    def count(self, regions: Regions, keep: Sequence[int]) -> tuple[int, ...]:
        return destinations_for_fraction(regions.sizes, tuple(keep), self.params.fraction)

    def select(self, features: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        layout = ctx.layout
        indices, _ = facility_location_greedy(features, layout.regions.valid, layout.k, self.params.reference)
        return indices
