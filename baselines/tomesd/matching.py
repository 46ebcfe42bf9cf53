"""Bipartite soft matching (ToMeSD) as static-shape tensor ops over region slots.

Per region: every source (a valid slot that is not a destination) finds its most similar
destination (cosine); sources are ranked by that score and the top ``m_r = size_r - keep_r``
are merged into their destination, the others stay. The kept tokens of a region are its
destinations and unmerged sources, in slot order (raster order for the ``global`` partitioner).

Everything is computed once per plan: ``target`` (where each slot's value goes), the flat slot
indices of the kept tokens in merged order, and the raster -> merged index used to unmerge.
Merging and unmerging are then one scatter/gather each, with no host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenreduce.layout import Layout, kept_per_region


@dataclass(frozen=True)
class StaticPlan:
    """Per-layout constants (host-computed once per grid, ratio and device)."""

    merges: torch.Tensor  # (R,) tokens each region loses: size - keep
    offsets: torch.Tensor  # (R,) start of each region's kept tokens in the merged sequence
    keep_max: int  # most kept tokens in one region
    compact: torch.Tensor | None  # (keep,) flat positions r * keep_max + j that are real, None if all are


def static_plan(layout: Layout, device: torch.device) -> StaticPlan:
    """The per-layout constants of a bipartite plan on ``device``."""
    regions = layout.regions
    keep = kept_per_region(regions.sizes, layout.ratio)
    for r, (size, kept, dests) in enumerate(zip(regions.sizes, keep, layout.dests, strict=True)):
        if dests > kept:
            raise ValueError(f"region {r} has {dests} destinations but keeps only {kept} tokens")
        if dests == 0 and kept < size:
            raise ValueError(f"region {r} has no destination but must lose {size - kept} tokens")
    keep_t = torch.tensor(keep, dtype=torch.long)
    keep_max = max(max(keep), 1)
    real = torch.arange(keep_max).unsqueeze(0) < keep_t.unsqueeze(1)  # (R, keep_max)
    compact = None if bool(real.all()) else torch.nonzero(real.reshape(-1)).squeeze(1).to(device)
    return StaticPlan(
        merges=(torch.tensor(regions.sizes, dtype=torch.long) - keep_t).to(device),
        offsets=(torch.cumsum(keep_t, 0) - keep_t).to(device),
        keep_max=keep_max,
        compact=compact,
    )


class StaticPlanCache:
    """``static_plan`` memoised by grid, ratio, destination counts and device."""

    def __init__(self) -> None:
        self._plans: dict[tuple, StaticPlan] = {}

    def get(self, layout: Layout, device: torch.device) -> StaticPlan:
        regions = layout.regions
        key = (regions.grid, regions.sizes, layout.ratio, layout.dests, str(device))
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = static_plan(layout, device)
        return plan


@dataclass(frozen=True)
class Matching:
    """A hard assignment of every slot to a kept token, batch-shared when its batch size is 1.

    ``target``: ``(B', R, S)`` slot whose merged token each slot joins (itself if kept);
    ``kept``: ``(B', N')`` flat slot indices ``r * S + s`` of the kept tokens in merged order;
    ``source``: ``(B', N)`` index into the merged sequence that each raster token reads on unmerge;
    ``positions``: ``(B', N')`` raster indices of the kept tokens. ``B'`` is 1 for shared matching.
    """

    target: torch.Tensor
    kept: torch.Tensor
    source: torch.Tensor
    positions: torch.Tensor

    @property
    def shared(self) -> bool:
        return self.target.shape[0] == 1


def bipartite_match(
    features: torch.Tensor, destinations: torch.Tensor, layout: Layout, static: StaticPlan, shared: bool
) -> Matching:
    """Match sources to destinations.

    ``features``: ``(B, R, S, C)`` normalised float32; ``destinations``: ``(R, k)`` local slots (the
    first ``layout.dests[r]`` are real). ``shared``: rank by scores summed over the batch, so every
    sample keeps the same tokens (else each sample is matched on its own, as ToMeSD does).
    """
    b, r, s, c = features.shape
    k = destinations.shape[1]
    device = features.device
    slot_valid = layout.slot_valid  # (R, k)
    valid = layout.regions.valid  # (R, S)

    dest_feats = features.gather(2, destinations.view(1, r, k, 1).expand(b, r, k, c))
    scores = features @ dest_feats.transpose(-1, -2)  # (B, R, S, k) cosine
    if shared:
        scores = scores.sum(dim=0, keepdim=True)
    if layout.compact is not None:  # some destination slots are unreal (host-side fact, no device read)
        scores = scores.masked_fill(~slot_valid.view(1, r, 1, k), float("-inf"))
    best, best_dest = scores.max(dim=-1)  # (B', R, S)

    # Destinations are not sources; count-based so that duplicate padding entries cannot clear a mark.
    is_dest = torch.zeros(r, s, dtype=torch.long, device=device)
    is_dest = is_dest.scatter_add(1, destinations, slot_valid.long()) > 0
    is_source = valid & ~is_dest
    score = best.masked_fill(~is_source, float("-inf"))
    order = score.argsort(dim=-1, descending=True, stable=True)  # sources first, most similar first
    slot_ids = torch.arange(s, device=device)
    rank = torch.empty_like(order).scatter_(-1, order, slot_ids.expand_as(order))
    merged = is_source & (rank < static.merges.view(1, r, 1))

    dest_slot = destinations.unsqueeze(0).expand(best_dest.shape[0], r, k).gather(-1, best_dest)
    target = torch.where(merged, dest_slot, slot_ids)  # (B', R, S)

    kept_mask = valid & ~merged
    # Kept slots first, in slot order; the first keep_max columns hold every region's kept tokens.
    kept_local = (~kept_mask).to(torch.uint8).argsort(dim=-1, stable=True)[..., : static.keep_max]
    kept_flat = (kept_local + (torch.arange(r, device=device) * s).view(1, r, 1)).flatten(1)
    if static.compact is not None:
        kept_flat = kept_flat.index_select(1, static.compact)

    # Position of each kept slot in its region's kept list; merged slots read their destination's.
    rank_kept = torch.cumsum(kept_mask.long(), dim=-1) - 1
    merged_pos = rank_kept.gather(-1, target) + static.offsets.view(1, r, 1)
    source = layout.from_regions(merged_pos.unsqueeze(-1)).squeeze(-1)  # (B', N)
    positions = layout.regions.index.reshape(-1)[kept_flat]
    return Matching(target=target, kept=kept_flat, source=source, positions=positions)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[b, index[b or 0, j]]``: ``(B, M, C)`` from ``(B, L, C)`` and ``(B', M)``, ``B'`` in {1, B}."""
    b, _, c = x.shape
    return x.gather(1, index.unsqueeze(-1).expand(b, index.shape[1], c))


def group_mean(xr: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Every slot that receives tokens becomes the mean of its group ``{itself} + merged sources``.

    ``scatter_reduce("mean")`` over the slots, as ToMeSD; kept slots map onto themselves, so a slot
    with no merged source keeps its exact value. ``xr``: ``(B, R, S, C)``; ``target``: ``(B', R, S)``.
    """
    b, r, s, c = xr.shape
    index = target.unsqueeze(-1).expand(b, r, s, c)
    return xr.scatter_reduce(2, index, xr, reduce="mean", include_self=False)


def unmerge_tokens(y: torch.Tensor, matching: Matching) -> torch.Tensor:
    """``(B, N', C)`` -> ``(B, N, C)``: kept tokens return to their place, merged ones copy their destination."""
    return gather_tokens(y, matching.source)
