"""``tokenreduce explain``: what a config merges where, on the real architecture (meta device)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table
from torch import nn

from tokenreduce import archs
from tokenreduce.api import prepare
from tokenreduce.config import ConfigBase, load_config
from tokenreduce.engine import Runtime
from tokenreduce.engine.sites.stack import placement_notes
from tokenreduce.interfaces import Decision, MergeSchedule, ModelAdapter, ReusePolicy, SiteSpec
from tokenreduce.layout import grid_text


def default_arch(adapter: str) -> str:
    """The architecture ``explain`` shows for an adapter: the first one it registers (for ``auto``
    or an adapter that registers none: the first architecture ``bench`` times by default)."""
    found = archs.for_adapter(adapter)
    return found.name if found is not None else archs.bench_defaults()[0]


@dataclass(frozen=True)
class Checked:
    """A config prepared on an architecture, with the layouts of every merged group at one size."""

    config: ConfigBase
    arch: str
    model: nn.Module
    adapter: ModelAdapter
    runtime: Runtime
    sites: list[SiteSpec]
    grids: dict[str, tuple[int, ...]]


def check_on_architecture(
    config: Any,
    *,
    arch: str | None = None,
    height: int = 1024,
    width: int = 1024,
    frames: int | None = None,
) -> Checked:
    """Every check ``apply`` runs, on the published architecture (meta device, nothing
    downloaded), plus the layouts at this size; raises ``ConfigError`` / ``ValueError``."""
    cfg = load_config(config)
    if arch is None:
        arch = default_arch(cfg.adapter.name)
    model = archs.build(arch)
    model, _, adapter, runtime, sites = prepare(model, cfg)
    size = {} if frames is None else {"frames": frames}
    known = adapter.grids_for(model, height, width, **size) if hasattr(adapter, "grids_for") else {}
    grids = {}
    for site in sites:
        grid = known.get(site.group, site.grid)
        if grid is not None:
            grids[site.group] = tuple(grid)
            runtime.layout(grids[site.group])
    return Checked(cfg, arch, model, adapter, runtime, sites, grids)


def merged_steps(schedule: MergeSchedule, steps: int) -> list[int]:
    """The steps of ``steps`` that ``schedule`` merges. Timestep schedules assume evenly spaced
    timesteps from 1 (noise) down, ``1 - i / steps`` (a real scheduler's spacing may differ)."""
    timesteps = [1 - i / steps for i in range(steps)] if schedule.needs == "timestep" else None
    return [i for i, m in enumerate(schedule.steps(steps, timesteps)) if m]


def schedule_line(schedule: MergeSchedule, steps: int, merged: list[int]) -> str:
    """Which of ``steps`` steps a schedule merges (``merged``: :func:`merged_steps`)."""
    timesteps = schedule.needs == "timestep"
    params = ", ".join(f"{k}={v}" for k, v in schedule.params.model_dump().items() if k != "name")
    listed = ", ".join(map(str, merged[:24])) + (" ..." if len(merged) > 24 else "")
    note = " (timesteps assumed evenly spaced from 1 down)" if timesteps else ""
    return (
        f"schedule {schedule.name}{f' ({params})' if params else ''}: merges {len(merged)} of {steps} "
        f"steps: {listed or 'none'}{note}; the other steps run the unmodified model"
    )


def plans_line(reuse: ReusePolicy, merged: int) -> str:
    """When a reuse policy makes plans over ``merged`` merged steps, and whether a plan outlives the
    denoiser call that made it (which torch.compile's CUDA-graph modes cannot run)."""
    if merged == 0:
        return "plans: none (no step merges)"
    decisions = [reuse.decide(i) if reuse.needs_step else Decision.SELECT for i in range(merged)]
    select = decisions.count(Decision.SELECT)
    if select == merged:
        return (
            "plans: new destinations and weights at every merged step; nothing is kept from one denoiser "
            "call to the next (runs under torch.compile's CUDA-graph modes)"
        )
    return (
        f"plans: new destinations at {select} of {merged} merged steps, new weights alone at "
        f"{decisions.count(Decision.WEIGHTS)}, reused at the others; plans are kept from one denoiser call "
        "to the next, which torch.compile's CUDA-graph modes (reduce-overhead, max-autotune) cannot run"
    )


def explain(
    config: Any,
    *,
    arch: str | None = None,
    height: int = 1024,
    width: int = 1024,
    frames: int | None = None,
    steps: int = 20,
    console: Console,
) -> None:
    checked = check_on_architecture(config, arch=arch, height=height, width=width, frames=frames)
    cfg, adapter, runtime, sites, grids = (
        checked.config,
        checked.adapter,
        checked.runtime,
        checked.sites,
        checked.grids,
    )
    arch = checked.arch
    video = "" if frames is None else f" x {frames} frames"
    console.print(
        f"[bold]{arch}[/bold] at {height}x{width}{video}: adapter [cyan]{adapter.name}[/cyan], ratio {cfg.ratio}, "
        f"selector {cfg.selector.name}, merger {cfg.merger.name}, partitioner {cfg.partitioner.name}, "
        f"reuse {cfg.reuse.name}"
    )
    try:
        merged = merged_steps(runtime.schedule, steps)
    except ValueError as exc:
        console.print(f"schedule {runtime.schedule.name}: {exc}")
    else:
        console.print(schedule_line(runtime.schedule, steps, merged))
        console.print(plans_line(runtime.reuse, len(merged)))
    if getattr(adapter.params, "size_weighting", False):
        console.print(
            "size-weighted attention: on (each merged key's logit + log(group size); head dim padded to a "
            "multiple of 8 in merged attention)"
        )
    else:
        console.print("size-weighted attention: off")
    for line in placement_notes(sites):
        console.print(f"placement {line}", markup=False)
    by_group: dict[str, list] = defaultdict(list)
    for site in sites:
        by_group[site.group].append(site)
    table = Table(
        title="merged sites by group (one shared plan per group and guidance pass; tokens and kept per block)"
    )
    for column in (
        "group",
        "sites",
        "blocks",
        "grid",
        "tokens",
        "kept",
        "regions x slots",
        "destinations/region",
    ):
        table.add_column(column)
    frame_lines: list[str] = []
    for group, members in by_group.items():
        grid = grids.get(group)
        kinds = ", ".join(sorted({s.site for s in members}))
        blocks = len({s.path.removesuffix(f".{s.site}").removesuffix(".attn") for s in members})
        if grid is None:
            table.add_row(group, kinds, str(blocks), "?", "?", "?", "?", "?")
            continue
        layout = runtime.layout(grid)
        n = layout.num_tokens
        if grid in runtime.unmerged:
            table.add_row(group, kinds, str(blocks), grid_text(grid), str(n), "all (unmerged)", "", "")
            continue
        dests = sorted(set(layout.dests))
        if len(grid) == 3:  # video (frames x rows x cols): what one frame has and keeps on average
            frame_lines.append(
                f"{group}: {grid[0]} frames x {grid[1] * grid[2]} tokens per frame = {n} tokens per block "
                f"({grid_text(grid)}); keeps {layout.keep} per block, {layout.keep / grid[0]:.0f} per frame"
            )
        table.add_row(
            group,
            kinds,
            str(blocks),
            grid_text(grid),
            str(n),
            f"{layout.keep} ({layout.keep / n:.0%})",
            f"{layout.regions.num_regions} x {layout.regions.slots}",
            ", ".join(map(str, dests[:4])) + (" ..." if len(dests) > 4 else ""),
        )
    console.print(table)
    for line in frame_lines:
        console.print(line)
    console.print(f"{len(sites)} merged sites in {len(by_group)} groups.")
