"""ToMeSD's destination grid: one destination per ``sy x sx`` cell of every region (on video
grids, frames x rows x cols, cells are one frame deep: ``sy x sx`` in every frame).

Cells tile each region from its top-left corner; border rows and columns that do not fill a
whole cell hold no destination (their tokens are sources). A region smaller than one cell (a
thin border tile) gets a single destination, its first token, so that it can still merge.

The destination's position inside its cell is random (from the runtime's dedicated generator,
so the sampler's random stream is untouched) or the cell's top-left token. As in ToMeSD,
randomness is switched off for odd batch sizes, where a batch cannot hold matched guidance
halves. The cell table is built once per grid and device; selection is one gather.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator

from tokenreduce.interfaces import SelectContext, Selector
from tokenreduce.layout import Regions, raster_positions
from tokenreduce.params import StrictParams


def local_positions(regions: Regions) -> torch.Tensor:
    """``(R, S, 3)`` frame/row/col of every slot inside its region (frame 0 on image grids; raster
    order for a single raster region)."""
    if regions.local_rc is not None:
        pos = regions.local_rc.cpu()
    elif regions.is_raster:
        pos = raster_positions(regions.grid).unsqueeze(0)  # one raster region: the whole grid
    else:
        raise ValueError(
            "needs rectangular regions with per-slot positions (Regions.local_rc); the partitioner provides none"
        )
    if pos.shape[-1] not in (2, 3) or pos.shape[-1] != len(regions.grid):
        raise ValueError(
            f"works on grids of rank 2 or 3 with positions of that rank, got rank-{pos.shape[-1]} "
            f"positions on a rank-{len(regions.grid)} grid"
        )
    return pos if pos.shape[-1] == 3 else torch.cat([torch.zeros_like(pos[..., :1]), pos], dim=-1)


def spans(positions: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``(R, 3)`` frames, rows and cols spanned by the valid slots of each region (0 for an empty one)."""
    return torch.where(valid.unsqueeze(-1), positions + 1, 0).amax(dim=1)


def region_extents(regions: Regions) -> list[tuple[int, int, int]]:
    """``(frames, rows, cols)`` spanned by the valid slots of every region (host, set-up time)."""
    span = spans(local_positions(regions), regions.valid.cpu())
    return [(int(t), int(h), int(w)) for t, h, w in span.tolist()]


def cells_per_region(regions: Regions, stride: tuple[int, int]) -> list[int]:
    """Whole cells per region (one frame deep); a non-empty region smaller than one cell gets one
    destination (its first token)."""
    sy, sx = stride
    counts = [t * (h // sy) * (w // sx) for t, h, w in region_extents(regions)]
    return [n if n or not size else 1 for n, size in zip(counts, regions.sizes, strict=True)]


def cell_table(regions: Regions, stride: tuple[int, int], k: int) -> torch.Tensor:
    """``(R, k, sy*sx)``: local slot of every offset of every cell (cells one frame deep, frame by
    frame, each frame's cells in row-major order).

    Entries past a region's cell count are slot 0 (never used: the layout marks them unreal); a
    region smaller than one cell has one "cell" whose every offset is its first valid slot.
    Raises ``ValueError`` when a cell covers a position that no valid slot holds.
    """
    sy, sx = stride
    pos = local_positions(regions)
    valid = regions.valid.cpu()
    extent = spans(pos, valid)  # (R, 3)
    frames, rows, cols = (max(int(n), 1) for n in extent.amax(dim=0).tolist()) if len(extent) else (1, 1, 1)
    # slot_at[r, frame, row, col]: the slot holding that position of region r, or -1.
    slot_at = torch.full((regions.num_regions, frames, rows, cols), -1, dtype=torch.long)
    r_ids, s_ids = torch.nonzero(valid, as_tuple=True)
    slot_at[r_ids, pos[r_ids, s_ids, 0], pos[r_ids, s_ids, 1], pos[r_ids, s_ids, 2]] = s_ids
    n_cols = (extent[:, 2] // sx).clamp_min(1).unsqueeze(1)  # (R, 1)
    per_frame = ((extent[:, 1] // sy) * (extent[:, 2] // sx)).unsqueeze(1)  # (R, 1)
    n_cells = extent[:, :1] * per_frame  # (R, 1)
    cell = torch.arange(k).unsqueeze(0)  # (1, k)
    real = cell < n_cells  # (R, k)
    frame = cell // per_frame.clamp_min(1)
    in_frame = cell % per_frame.clamp_min(1)
    dy = torch.arange(sy).repeat_interleave(sx)  # (O,) offsets in row-major order
    dx = torch.arange(sx).repeat(sy)
    row = ((in_frame // n_cols) * sy).unsqueeze(-1) + dy  # (R, k, O)
    col = ((in_frame % n_cols) * sx).unsqueeze(-1) + dx
    frame = torch.where(real, frame, 0).unsqueeze(-1).expand_as(row)
    row = torch.where(real.unsqueeze(-1), row, 0)
    col = torch.where(real.unsqueeze(-1), col, 0)
    region = torch.arange(regions.num_regions).view(-1, 1, 1)
    table = slot_at[region, frame, row.clamp_max(rows - 1), col.clamp_max(cols - 1)]
    missing = real.unsqueeze(-1) & (table < 0)
    if bool(missing.any()):
        r, c, _ = (int(v) for v in torch.nonzero(missing)[0])
        raise ValueError(f"region {r} is not a full rectangle: cell {c} covers a position without a token")
    table = torch.where(real.unsqueeze(-1), table, 0)
    tiny = (n_cells.squeeze(1) == 0) & valid.any(dim=1)  # regions with no whole cell
    table[tiny, 0] = valid.to(torch.uint8).argmax(dim=1)[tiny].unsqueeze(-1)
    return table


class TomesdGridSelector(Selector):
    """One destination per stride cell of each region (ToMeSD's ``bipartite_soft_matching_random2d`` split)."""

    name = "tomesd_grid"
    grid_ranks = (2, 3)  # cells of rows x cols, one frame deep on video grids

    class Params(StrictParams):
        name: Literal["tomesd_grid"] = "tomesd_grid"
        stride: list[int] = Field(
            default_factory=lambda: [2, 2],
            description="Cell size [rows, cols] = ToMeSD's [sy, sx]: one destination per cell.",
        )
        use_rand: bool = Field(
            True,
            description="Random destination inside each cell (ToMeSD's use_rand); False: the cell's top-left. "
            "Forced off for odd batch sizes.",
        )

        @field_validator("stride")
        @classmethod
        def _check_stride(cls, value: list[int]) -> list[int]:
            if len(value) != 2 or min(value) < 1:
                raise ValueError(f"stride must be [rows, cols] of positive ints, got {value!r}")
            return value

    params: Params

    def __init__(self, params: StrictParams | None = None) -> None:
        super().__init__(params)
        self.stride: tuple[int, int] = (self.params.stride[0], self.params.stride[1])
        self._tables: dict[tuple, torch.Tensor] = {}
        self._fallback: dict[str, torch.Generator] = {}

    def count(self, regions: Regions, keep: Sequence[int]) -> tuple[int, ...]:
        try:
            return tuple(cells_per_region(regions, self.stride))
        except ValueError as exc:
            raise ValueError(f"selector {self.name!r} {exc}") from None

    def select(self, features: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        layout = ctx.layout
        table = self._table(layout.host.regions, layout.k, features.device)  # (R, k, sy*sx)
        cell = self.stride[0] * self.stride[1]
        if self.params.use_rand and features.shape[0] % 2 == 0 and cell > 1:
            gen = ctx.generator if ctx.generator is not None else self._own_generator(features.device)
            offset = torch.randint(cell, table.shape[:2], generator=gen, device=gen.device).to(
                features.device
            )
        else:
            offset = torch.zeros(table.shape[:2], dtype=torch.long, device=features.device)
        return table.gather(2, offset.unsqueeze(-1)).squeeze(-1)

    def _table(self, regions: Regions, k: int, device: torch.device) -> torch.Tensor:
        key = (regions.grid, regions.sizes, regions.slots, regions.shape, k, str(device))
        table = self._tables.get(key)
        if table is None:  # once per grid and device
            table = self._tables[key] = cell_table(regions, self.stride, k).to(device)
        return table

    def _own_generator(self, device: torch.device) -> torch.Generator:
        """Used only when called without the runtime's generator (fixed seed, never the global RNG)."""
        key = str(device)
        if key not in self._fallback:
            self._fallback[key] = torch.Generator(device=device).manual_seed(0)
        return self._fallback[key]
