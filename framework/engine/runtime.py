"""Everything a wrapped site needs at run time, resolved once at apply time.

The hot path is :meth:`Runtime.plan`: a few attribute reads and one comparison when the plan is
reused; selection and weights when the reuse policy says so. No registry, no config, no host
synchronisation, static shapes.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from tokenreduce.builtins.schedules import AlwaysSchedule
from tokenreduce.engine.clock import MAX_PASSES_PER_STEP, Clock
from tokenreduce.interfaces import Decision, MergePlan, Merger, SelectContext
from tokenreduce.layout import Layout, build_layout, grid_fits, grid_text, kept_per_region, unmerged_layout

if TYPE_CHECKING:
    from tokenreduce.config import Resolved


def compiled_new_size_message(what: str) -> str:
    """The error for a compiled call at a size whose static tables were never built."""
    return (
        f"tokenreduce: {what} has no layout built before this compiled call (a graph cannot build one): "
        "call handle.prepare(height, width) with this image size before calling the compiled model "
        "(the pipeline's default size is prepared by apply)"
    )


class IdentityPlan(MergePlan):
    """Nothing merged (ratio 0 at this layer): both maps return their input."""

    is_identity = True

    def __init__(self, num_tokens: int, device: torch.device) -> None:
        self.positions = None
        self.num_tokens = num_tokens

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        return y


@dataclass
class Slot:
    """The cached plan of one sharing group for one guidance pass."""

    pending: Decision = Decision.SELECT
    key: tuple | None = None
    destinations: torch.Tensor | None = None
    plan: MergePlan | None = None


def fresh_slots() -> dict[int, Slot]:
    """One empty slot per possible guidance pass, made up front: a compiled graph then finds the
    same slots at the first merged call as at every later one (one graph per decision, not one
    more for the call that would have created them)."""
    return {index: Slot() for index in range(MAX_PASSES_PER_STEP)}


@dataclass
class Group:
    """Blocks sharing one plan (a block kind, or a single block)."""

    name: str
    merger: Merger
    slots: dict[int, Slot] = field(default_factory=fresh_slots)


class Runtime:
    def __init__(self, resolved: Resolved) -> None:
        self.resolved = resolved
        self.config = resolved.config
        self.ratio = resolved.config.ratio
        self.selector = resolved.selector
        self.merger = resolved.merger
        self.partitioner = resolved.partitioner
        self.reuse = resolved.reuse
        self.schedule = resolved.schedule if resolved.schedule is not None else AlwaysSchedule()
        # `switched_on` is the user's switch (handle.enable/disable); `enabled`, what the sites read,
        # is also off on a step the schedule does not merge. The clock sets it once per step.
        self.switched_on = True
        self.enabled = True
        # Set by `prepare`: checks at every call that the model's context parallelism (if any) can
        # be served (see tokenreduce.parallel).
        self.parallel_guard: Callable[[], None] | None = None
        # Called by the clock when a step starts merging, stops merging or selects new destinations
        # (set by `apply`: resets other libraries' cache hooks, whose cached tokens are stale then).
        self.on_new_tokens: Callable[[], None] | None = None
        self.groups: dict[str, Group] = {}
        self.clock = Clock(self)
        self._layouts: dict[tuple[int, ...], Layout] = {}
        self._generators: dict[str, torch.Generator] = {}
        self._draws: dict[str, torch.Tensor] = {}
        self.unmerged: set[tuple[int, ...]] = set()  # grids too small for the partitioner

    # ------------------------------------------------------------------ set-up (host)

    def group(self, kind: str, block: str, position: float = 0.0) -> Group:
        """The group a block belongs to under the reuse policy's sharing mode.

        ``position`` in [0, 1] is the block's place among the merged blocks; the group's merger
        is ``merger.for_site(position)`` of its first block.
        """
        name = kind if self.reuse.sharing == "kind" else block
        group = self.groups.get(name)
        if group is None:
            group = self.groups[name] = Group(name, self.merger.for_site(position))
        return group

    def check_rank(self, rank: int) -> None:
        """Raise ``ValueError`` if a component cannot work on token grids of ``rank`` axes."""
        check_grid_rank(self.resolved, rank)

    def layout(self, grid: tuple[int, ...], sequence: bool = False) -> Layout:
        """The static layout of a grid (built once; raises ``ValueError`` on impossible combinations).

        ``sequence``: the layout for tokens that arrive region by region (see :meth:`region_order`).
        """
        if torch.compiler.is_compiling():
            # Layouts are static per size: specialise dynamic shapes (a guard, not a graph break).
            grid = tuple(int(n) for n in grid)
        layout = self._layouts.get(grid)
        if layout is None:
            if torch.compiler.is_compiling():
                # (no sizes in the text: formatting a traced size is not traceable)
                raise ValueError(compiled_new_size_message("the token grid of this call"))
            layout = self._layouts[grid] = self._build_layout(grid)
        return layout.in_sequence_order() if sequence else layout

    def prepare_grid(self, grid: tuple[int, ...], device: torch.device) -> None:
        """Build the grid's layouts (raster and, where used, region order) and their ``device`` copies
        now, outside any compiled graph."""
        self.layout(grid).to(device)
        if self.reorders(grid):
            self.layout(grid, sequence=True).to(device)

    def region_order(
        self, grid: tuple[int, ...], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(order, inverse)`` when an adapter may hand the merged blocks their tokens region by region.

        ``x.index_select(1, order)`` puts raster tokens in region order, ``index_select(1, inverse)``
        back; inside, merge and unmerge need no gather and positions count in region order (permute
        positional tables with ``order`` too). ``None`` when there is nothing to gain (the regions are
        already consecutive, padded, or nothing is merged) or a merger's plans need raster tokens.
        """
        if not self.reorders(grid):
            return None
        moved = self.layout(grid).to(device)
        assert moved.inverse is not None  # reordered regions are not sequential
        return moved.regions.index.reshape(-1), moved.inverse

    def reorders(self, grid: tuple[int, ...]) -> bool:
        """Whether tokens on ``grid`` are worth handing to the merged blocks in region order (host-side)."""
        layout = self.layout(grid)
        mergers = [self.merger, *(g.merger for g in self.groups.values())]
        return not (
            layout.regions.sequential
            or layout.regions.ragged
            or layout.keep == layout.num_tokens
            or not all(m.any_token_order for m in mergers)
        )

    def tiles(self, grid: tuple[int, ...]) -> tuple[int, int] | None:
        """``(th, tw)`` when region order on ``grid`` is a reshape of the ``(H, W)`` grid into tiles
        (adapters fold it into a reshape they already do), else ``None``."""
        return self.layout(grid).regions.tiling if self.reorders(grid) else None

    def _build_layout(self, grid: tuple[int, ...]) -> Layout:
        self.check_rank(len(grid))
        g = grid_text(grid)
        minimum = self.partitioner.min_grid()
        if not grid_fits(grid, minimum):
            # A small image makes the low levels smaller than a tile: run them unmerged rather than
            # fail mid-generation (built once per grid, so this warns once per grid).
            warnings.warn(
                f"token grid {g} is smaller than partitioner {self.partitioner.name!r} needs "
                f"({grid_text(minimum)} on its last {len(minimum)} axes): layers on this grid run unmerged",
                stacklevel=2,
            )
            self.unmerged.add(grid)
            return unmerged_layout(grid)
        regions = self.partitioner.partition(tuple(grid))
        keep = kept_per_region(regions.sizes, self.ratio)
        dests = self.selector.count(regions, keep)
        total_keep = sum(keep)
        if self.merger.needs_destinations:
            if any(d > s for d, s in zip(dests, regions.sizes, strict=True)):
                raise ValueError(
                    f"selector {self.selector.name!r} asks for more destinations than tokens on {g}"
                )
            empty = [i for i, (d, s) in enumerate(zip(dests, regions.sizes, strict=True)) if s and not d]
            if empty:
                raise ValueError(
                    f"selector {self.selector.name!r} gives no destination to {len(empty)} region(s) of the "
                    f"{g} grid (partitioner {self.partitioner.name!r}); their tokens could not be merged anywhere"
                )
            if self.merger.output == "destinations" and sum(dests) != total_keep:
                raise ValueError(
                    f"selector {self.selector.name!r} gives {sum(dests)} destinations on the {g} grid but "
                    f"merger {self.merger.name!r} makes one token per destination and ratio {self.ratio} keeps "
                    f"{total_keep}; change the ratio to match the selector or use a selector that picks the kept count"
                )
            if self.merger.output == "keep" and any(d > k for d, k in zip(dests, keep, strict=True)):
                raise ValueError(
                    f"selector {self.selector.name!r} gives more destinations than merger {self.merger.name!r} "
                    f"keeps at ratio {self.ratio} on the {g} grid; lower the ratio"
                )
        return build_layout(regions, self.ratio, dests, total_keep)

    def generator(self, device: torch.device) -> torch.Generator:
        """A dedicated generator per device, so random selectors never shift the sampler's RNG."""
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            # The meta device (op counting) has no generator of its own; nothing is drawn there.
            gen = torch.Generator() if torch.device(device).type == "meta" else torch.Generator(device=device)
            gen.manual_seed(self.config.seed)
            self._generators[key] = gen
        return gen

    def draws(self, device: torch.device) -> torch.Tensor:
        """The noise draw counter of ``device`` (see :meth:`SelectContext.normal`)."""
        key = str(device)
        counter = self._draws.get(key)
        if counter is None:
            counter = self._draws[key] = torch.zeros((), dtype=torch.int64, device=device)
            if not torch.compiler.is_compiling():
                # Draws advance the counter in place. torch.compile's CUDA-graph trees capture a
                # graph that mutates an input only if the input's address is static; made here,
                # before the first compiled call (see `prepare`), the counter can be marked so.
                torch._dynamo.mark_static_address(counter)
        return counter

    def switch(self, on: bool) -> None:
        """The user's switch: off, every site runs the original computation."""
        self.switched_on = on
        self.enabled = on and self.clock.merging

    def mark_all(self, decision: Decision) -> None:
        for group in self.groups.values():
            for slot in group.slots.values():
                slot.pending = decision

    def reset_state(self) -> None:
        """Forget every cached plan (e.g. after the model moved to another device)."""
        for group in self.groups.values():
            group.slots = fresh_slots()
        self.clock.restart()

    def restart_draws(self) -> None:
        """Every random stream back to its start (the clock calls this when a generation starts), so
        one seed gives one image at every call. Re-seeded and zeroed in place rather than dropped:
        compiled graphs and captured CUDA graphs keep the objects."""
        for gen in self._generators.values():
            gen.manual_seed(self.config.seed)
        for counter in self._draws.values():
            counter.zero_()

    # ------------------------------------------------------------------ hot path

    def plan(
        self,
        group: Group,
        x: torch.Tensor,
        grid: tuple[int, ...],
        source: Callable[[torch.Tensor], torch.Tensor] | None = None,
        sequence: bool = False,
    ) -> MergePlan:
        """The plan for ``x`` (``(B, N, C)``, raster order on ``grid``) in this group.

        ``source``, if given, maps ``x`` to the tokens the plan is computed from (e.g. a block's
        norm when a whole block is wrapped); it runs only when a plan is computed, never on reuse.
        ``sequence``: ``x`` is in region order (:meth:`region_order`) instead of raster order.
        """
        slot = group.slots[self.clock.pass_index]
        key = (x.shape[0], x.shape[1], grid, x.dtype, x.device, sequence)
        decision = slot.pending
        # A plan for other shapes is no plan for these. (Not read when selecting anyway: a compiled
        # graph then guards on the decision alone, the same at the first selection as at later ones.)
        if decision is not Decision.SELECT and slot.key != key:
            decision = Decision.SELECT
        if decision is Decision.REUSE and slot.plan is not None:
            return slot.plan
        layout = self.layout(grid, sequence)
        merger = group.merger
        if layout.keep == layout.num_tokens and (not merger.kv_only or grid in self.unmerged):
            plan: MergePlan = IdentityPlan(layout.num_tokens, x.device)
        else:
            needs_features = merger.needs_destinations or merger.needs_features
            if source is not None and needs_features:  # the plan reads no tokens otherwise
                x = source(x)
            layout = layout.to(x.device)
            features = self.features(x, layout, self.config.features) if needs_features else None
            if decision is Decision.SELECT or slot.destinations is None or slot.key != key:
                ctx = SelectContext(
                    layout=layout,
                    generator=self.generator(x.device),
                    draws=self.draws(x.device),
                    seed=self.config.seed,
                )
                # features is None only when the merger needs no destinations (needs_features above)
                slot.destinations = (
                    self.selector.select(features, ctx)
                    if merger.needs_destinations and features is not None
                    else None
                )
            # None features / destinations reach only mergers that declare they read none
            plan = merger.plan(x, features, slot.destinations, layout)  # type: ignore[arg-type]
        slot.plan, slot.key, slot.pending = plan, key, Decision.REUSE
        return plan

    @staticmethod
    def features(x: torch.Tensor, layout: Layout, precision: str = "float32") -> torch.Tensor:
        """``(B, R, S, C)`` L2-normalised tokens (padding slots zero): float32, or with
        ``precision="model"`` in ``x``'s dtype, normalised by float32 norms (no float32 copy)."""
        regions = layout.to_regions(x)
        if precision == "float32" or regions.dtype == torch.float32:
            feats = F.normalize(regions.float(), dim=-1)
        else:
            wide = torch.promote_types(regions.dtype, torch.float32)
            norms = torch.linalg.vector_norm(regions, dim=-1, keepdim=True, dtype=wide)
            # clamped in the model's dtype: a float32 epsilon would round to 0 in float16 (0 / 0)
            feats = regions / norms.to(regions.dtype).clamp_min(torch.finfo(regions.dtype).tiny)
        if layout.regions.ragged:
            feats = feats * layout.regions.valid.unsqueeze(-1).unsqueeze(0).to(feats.dtype)
        return feats


def check_grid_rank(resolved: Resolved, rank: int) -> None:
    """Raise ``ValueError`` naming every component that does not work on grids of ``rank`` axes."""
    refused = []
    for kind in ("partitioner", "selector", "merger", "reuse"):
        component = getattr(resolved, kind)
        ranks = component.grid_ranks
        if ranks is not None and rank not in ranks:
            allowed = " or ".join(str(r) for r in ranks)
            refused.append(f"{kind} {component.name!r} works on grids of rank {allowed}")
    minimum = resolved.partitioner.min_grid()
    if len(minimum) > rank:
        refused.append(
            f"partitioner {resolved.partitioner.name!r} needs grids of rank >= {len(minimum)} "
            f"(min_grid {grid_text(minimum)})"
        )
    if refused:
        raise ValueError(f"the model's token grids have rank {rank}, but " + "; ".join(refused))
