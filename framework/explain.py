"""``tokenreduce explain``: what a config merges where, on the real architecture (meta device)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.console import Console
from rich.table import Table

from tokenreduce import archs
from tokenreduce.api import prepare
from tokenreduce.config import load_config
from tokenreduce.layout import grid_text


def explain(
    config: Any, *, arch: str | None = None, height: int = 1024, width: int = 1024, console: Console
) -> None:
    cfg = load_config(config)
    if arch is None:
        arch = cfg.adapter.name if cfg.adapter.name in archs.ARCHITECTURES else "sdxl"
    model = archs.build(arch)
    model, _, adapter, runtime, sites = prepare(model, cfg, **({} if cfg.adapter.name != "auto" else {}))
    grids = adapter.grids_for(model, height, width) if hasattr(adapter, "grids_for") else {}
    console.print(
        f"[bold]{arch}[/bold] at {height}x{width}: adapter [cyan]{adapter.name}[/cyan], ratio {cfg.ratio}, "
        f"selector {cfg.selector.name}, merger {cfg.merger.name}, partitioner {cfg.partitioner.name}, "
        f"reuse {cfg.reuse.name}"
    )
    by_group: dict[str, list] = defaultdict(list)
    for site in sites:
        by_group[site.group].append(site)
    table = Table(title="merged sites by group (one shared plan per group and guidance pass)")
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
    for group, members in by_group.items():
        grid = grids.get(group, members[0].grid)
        kinds = ", ".join(sorted({s.site for s in members}))
        blocks = len({s.path.removesuffix(f".{s.site}").removesuffix(".attn") for s in members})
        if grid is None:
            table.add_row(group, kinds, str(blocks), "?", "?", "?", "?", "?")
            continue
        layout = runtime.layout(tuple(grid))
        n = layout.num_tokens
        dests = sorted(set(layout.dests))
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
    console.print(f"{len(sites)} merged sites in {len(by_group)} groups.")
