"""Static token layouts: regions of a grid and the number of tokens each region keeps.

Everything here is computed once per (grid, ratio) on the host, so the hot path only sees
fixed index tensors and fixed shapes (what CUDA graphs and ``torch.compile`` need).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Regions:
    """A partition of a raster grid of any rank into ``R`` regions of at most ``S`` tokens.

    ``grid`` is the token grid, outermost axis first: ``(rows, cols)`` for images, ``(frames,
    rows, cols)`` for video; tokens are numbered in raster (C) order over it. ``index[r, s]`` is
    the raster index of slot ``s`` of region ``r``; padding slots (ragged border tiles) point at
    token 0 and are ``False`` in ``valid``. ``shape`` is the extent of a full region along every
    grid axis when regions are boxes, for grid-aware selectors.
    """

    grid: tuple[int, ...]
    index: torch.Tensor  # (R, S) int64
    valid: torch.Tensor  # (R, S) bool
    sizes: tuple[int, ...]  # valid tokens per region
    shape: tuple[int, ...] | None = None
    # (R, S, rank) position of each slot inside its region's box, one column per grid axis
    # (for rank 2: row, col), for grid-aware selectors
    local_rc: torch.Tensor | None = None
    # One full region listing the tokens in raster order; decided once on the host when not given.
    raster_order: bool | None = field(default=None, compare=False, repr=False)
    # Full regions holding consecutive tokens (region r = tokens r*S .. r*S+S-1): regions are views.
    sequential: bool | None = field(default=None, compare=False, repr=False)
    # (th, tw) when the regions are the full th x tw tiles of a 2-D grid, tiles in raster order and slots
    # in raster order inside each tile: then region order is a reshape and a transpose of the (H, W)
    # grid. Decided once on the host (a plain field: nothing to compute inside a compiled graph).
    tiling: tuple[int, int] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.sequential is None:
            r, s = self.index.shape
            seq = all(n == s for n in self.sizes) and torch.equal(
                self.index.cpu(), torch.arange(r * s).view(r, s)
            )
            object.__setattr__(self, "sequential", seq)
        if self.raster_order is None:
            object.__setattr__(self, "raster_order", bool(self.sequential) and self.index.shape[0] == 1)
        if (
            self.tiling is None
            and self.shape is not None
            and len(self.grid) == len(self.shape) == 2
            and not self.ragged
        ):
            (h, w), (th, tw) = self.grid, self.shape
            if h % th == 0 and w % tw == 0:
                tiles = torch.arange(h * w).view(h // th, th, w // tw, tw).permute(0, 2, 1, 3)
                if torch.equal(self.index.cpu(), tiles.reshape(self.num_regions, self.slots)):
                    object.__setattr__(self, "tiling", (th, tw))

    def in_sequence_order(self) -> Regions:
        """These regions over tokens that arrive region by region (token ``r * S + s`` is slot ``s`` of
        region ``r``): the same shapes and local positions, consecutive indices. Full regions only."""
        if self.ragged:
            raise ValueError(
                f"regions of the {self.grid} grid have padding; they cannot be laid out in sequence"
            )
        r, s = self.index.shape
        return Regions(
            grid=self.grid,
            index=torch.arange(r * s, device=self.index.device).view(r, s),
            valid=torch.ones_like(self.valid),
            sizes=self.sizes,
            shape=self.shape,
            local_rc=self.local_rc,
            raster_order=r == 1,
            sequential=True,
            tiling=self.tiling,
        )

    @property
    def rank(self) -> int:
        return len(self.grid)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def num_regions(self) -> int:
        return self.index.shape[0]

    @property
    def slots(self) -> int:
        return self.index.shape[1]

    @property
    def ragged(self) -> bool:
        return any(s != self.slots for s in self.sizes)

    @property
    def is_raster(self) -> bool:
        """One region holding every token in raster order: no gather needed."""
        return bool(self.raster_order)

    def check_cover(self) -> None:
        """Raise if the valid slots do not cover every token of the grid exactly once."""
        n = self.num_tokens
        taken = self.index[self.valid]
        counts = torch.bincount(taken, minlength=n)
        if taken.numel() != n or bool((counts != 1).any()):
            raise ValueError(f"regions do not cover the {self.grid} grid exactly once")


def grid_text(grid: Sequence[int]) -> str:
    """``"21x45x80"``: a grid as users write it."""
    return "x".join(str(n) for n in grid)


def grid_fits(grid: Sequence[int], minimum: Sequence[int]) -> bool:
    """Whether ``grid`` has at least ``minimum``'s rank and is at least as large on its trailing axes."""
    if len(grid) < len(minimum):
        return False
    return all(g >= m for g, m in zip(grid[len(grid) - len(minimum) :], minimum, strict=True))


def raster_positions(shape: Sequence[int]) -> torch.Tensor:
    """``(prod(shape), rank)`` coordinates of every position of a box, in raster order."""
    axes = [torch.arange(n) for n in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(shape))


def raster_index(positions: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Raster index of ``(..., rank)`` coordinates on ``grid``."""
    strides = [math.prod(grid[i + 1 :]) for i in range(len(grid))]
    return (positions * torch.tensor(strides, dtype=positions.dtype)).sum(dim=-1)


def box_regions(grid: tuple[int, ...], box: tuple[int, ...]) -> Regions:
    """Regions of ``box``-sized tiles of ``grid`` (same rank), tiles and slots in raster order."""
    counts = tuple(-(-g // b) for g, b in zip(grid, box, strict=True))
    local = raster_positions(box)  # (S, rank): slot s of a tile, in raster order inside the box
    origin = raster_positions(counts) * torch.tensor(box)  # (R, rank): first position of each tile
    pos = origin[:, None, :] + local[None, :, :]  # (R, S, rank)
    valid = (pos < torch.tensor(grid)).all(dim=-1)
    index = torch.where(valid, raster_index(pos, grid), torch.zeros_like(valid, dtype=torch.long))
    return Regions(
        grid=grid,
        index=index,
        valid=valid,
        sizes=tuple(int(n) for n in valid.sum(dim=1).tolist()),
        shape=box,
        local_rc=local.expand(index.shape[0], -1, -1).contiguous(),
    )


def kept_per_region(sizes: tuple[int, ...], ratio: float) -> tuple[int, ...]:
    """Tokens each region keeps: ``round(S * (1 - r))`` adjusted so the layer keeps ``N - floor(r N)``.

    The adjustment uses largest remainders and keeps every non-empty region at >= 1 token.
    """
    n = sum(sizes)
    total = n - math.floor(ratio * n)
    exact = [s * (1.0 - ratio) for s in sizes]
    keep = [min(s, max(1 if s else 0, round(e))) for s, e in zip(sizes, exact, strict=True)]
    diff = total - sum(keep)
    # Regions whose rounding lost the most get the extra tokens first (and vice versa).
    order = sorted(range(len(sizes)), key=lambda i: exact[i] - keep[i], reverse=diff > 0)
    while diff != 0:
        room = [i for i in order if (keep[i] < sizes[i] if diff > 0 else keep[i] > 1)]
        if not room:
            raise ValueError(f"cannot keep {total} of {n} tokens over regions of sizes {sizes}")
        for i in room[: abs(diff)]:
            keep[i] += 1 if diff > 0 else -1
        diff = total - sum(keep)
    return tuple(keep)


def destinations_for_fraction(
    sizes: tuple[int, ...], keep: tuple[int, ...], fraction: float | None
) -> tuple[int, ...]:
    """Destinations per region: one per kept token, or ``fraction`` of each region (at least one
    per non-empty region), for selectors feeding mergers that keep unmatched tokens."""
    if fraction is None:
        return tuple(keep)
    return tuple(min(s, max(1, round(fraction * s))) if s else 0 for s in sizes)


@dataclass(frozen=True)
class Layout:
    """Regions plus the static destination budget of one layer.

    ``k`` = destination slots per region (the maximum over regions); ``slot_valid[r, j]`` says
    whether slot ``j`` of region ``r`` is a real destination. ``compact`` lists the flat slot
    positions ``r * k + j`` that are real, in order: the merged sequence has ``len(compact)``
    tokens. ``keep`` is the number of tokens the layer keeps after merging (``N'``).
    """

    regions: Regions
    ratio: float
    k: int
    dests: tuple[int, ...]  # real destinations per region
    keep: int
    slot_valid: torch.Tensor  # (R, k) bool
    compact: torch.Tensor | None  # (D,) int64, None when every slot is real
    # (N,) position of each raster token among the flattened region slots (built on the host)
    inverse: torch.Tensor | None = None
    _device_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.inverse is None and not self.regions.sequential:
            flat_index = self.regions.index.reshape(-1)
            flat_valid = self.regions.valid.reshape(-1)
            inverse = torch.empty(self.num_tokens, dtype=torch.long, device=flat_index.device)
            positions = torch.arange(flat_index.numel(), device=flat_index.device)
            inverse[flat_index[flat_valid]] = positions[flat_valid]
            object.__setattr__(self, "inverse", inverse)

    @property
    def host(self) -> Layout:
        """The host (CPU) original of this layout: build lookup tables from it, never from device copies."""
        return self._device_cache.get("host", self)

    @property
    def all_slots_real(self) -> bool:
        """Every destination slot is real (host-side: no device read)."""
        return self.compact is None

    @property
    def num_tokens(self) -> int:
        return self.regions.num_tokens

    @property
    def num_destinations(self) -> int:
        return sum(self.dests)

    def to(self, device: torch.device) -> Layout:
        """This layout with its index tensors on ``device`` (cached; every index is built on the host
        first, so nothing is ever read back from the device)."""
        key = str(device)
        if key not in self._device_cache:
            r = self.regions
            moved_regions = Regions(
                grid=r.grid,
                index=r.index.to(device),
                valid=r.valid.to(device),
                sizes=r.sizes,
                shape=r.shape,
                local_rc=None if r.local_rc is None else r.local_rc.to(device),
                raster_order=r.raster_order,
                sequential=r.sequential,
                tiling=r.tiling,
            )
            self._device_cache[key] = Layout(
                regions=moved_regions,
                ratio=self.ratio,
                k=self.k,
                dests=self.dests,
                keep=self.keep,
                slot_valid=self.slot_valid.to(device),
                compact=None if self.compact is None else self.compact.to(device),
                inverse=None if self.inverse is None else self.inverse.to(device),
            )
            self._device_cache[key]._device_cache["host"] = self.host
        return self._device_cache[key]

    # --- reshaping helpers shared by mergers (pure views/gathers, static shapes) ---

    def to_regions(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` raster tokens -> ``(B, R, S, C)`` region slots (padding slots hold token 0)."""
        r = self.regions
        b, _, c = x.shape
        if r.sequential:
            return x.view(b, r.num_regions, r.slots, c)
        return x.index_select(1, r.index.reshape(-1)).view(b, r.num_regions, r.slots, c)

    def from_regions(self, xr: torch.Tensor) -> torch.Tensor:
        """``(B, R, S, C)`` region slots -> ``(B, N, C)`` raster tokens (padding slots dropped)."""
        r = self.regions
        b, _, _, c = xr.shape
        if r.sequential:
            return xr.reshape(b, -1, c)
        flat = xr.reshape(b, -1, c)
        assert self.inverse is not None  # built in __post_init__ for non-sequential regions
        return flat.index_select(1, self.inverse)

    def compact_slots(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, R, k, C)`` destination slots -> ``(B, D, C)`` real destinations."""
        b, _, _, c = y.shape
        flat = y.reshape(b, -1, c)
        return flat if self.compact is None else flat.index_select(1, self.compact)

    def expand_slots(self, y: torch.Tensor) -> torch.Tensor:
        """``(B, D, C)`` -> ``(B, R, k, C)``; unreal slots are filled with zeros."""
        b, _, c = y.shape
        r = self.regions.num_regions
        if self.compact is None:
            return y.view(b, r, self.k, c)
        out = y.new_zeros(b, r * self.k, c)
        out = out.index_copy(1, self.compact, y)
        return out.view(b, r, self.k, c)

    def in_sequence_order(self) -> Layout:
        """This layout for tokens that arrive region by region (see :meth:`Regions.in_sequence_order`):
        regions become views, positions count in that order. Built once, from the host layout."""
        host = self.host
        cached = host._device_cache.get("sequence")
        if cached is None:
            regions = host.regions if host.regions.sequential else host.regions.in_sequence_order()
            cached = build_layout(regions, host.ratio, host.dests, host.keep)
            host._device_cache["sequence"] = cached
        return cached

    def global_destinations(self, local: torch.Tensor) -> torch.Tensor:
        """Local destination indices ``(R, k)`` -> raster indices ``(D,)`` of the real destinations."""
        raster = torch.gather(self.regions.index, 1, local)
        flat = raster.reshape(-1)
        return flat if self.compact is None else flat.index_select(0, self.compact)


def build_layout(regions: Regions, ratio: float, dests: tuple[int, ...], keep: int) -> Layout:
    """A layout with ``dests[r]`` destination slots per region, padded to ``k = max(dests)``."""
    k = max(max(dests), 1)
    slot_valid = torch.arange(k).unsqueeze(0) < torch.tensor(dests).unsqueeze(1)
    compact = None
    if not bool(slot_valid.all()):
        compact = torch.nonzero(slot_valid.reshape(-1), as_tuple=False).squeeze(1)
    return Layout(
        regions=regions, ratio=ratio, k=k, dests=dests, keep=keep, slot_valid=slot_valid, compact=compact
    )


def unmerged_layout(grid: tuple[int, ...]) -> Layout:
    """The layout of a grid that keeps every token: one raster region, every token its own destination."""
    n = math.prod(grid)
    regions = Regions(
        grid=tuple(grid),
        index=torch.arange(n).unsqueeze(0),
        valid=torch.ones(1, n, dtype=torch.bool),
        sizes=(n,),
        shape=tuple(grid),
        local_rc=raster_positions(grid).unsqueeze(0),
    )
    return build_layout(regions, 0.0, (n,), n)
