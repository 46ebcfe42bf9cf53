"""ToMeSD (Bolya & Hoffman, arXiv 2303.17604) as plugins: the ``tomesd_grid`` selector and the
``bipartite`` merger, with presets for SDXL, Flux and Wan and two presets that mix them with ToMA parts."""

from __future__ import annotations

from tokenreduce.baselines.tomesd.bipartite import BipartiteMerger, MatchedPlan
from tokenreduce.baselines.tomesd.grid import TomesdGridSelector
from tokenreduce.hookspecs import hookimpl

__all__ = ["BipartiteMerger", "MatchedPlan", "TomesdGridSelector"]

PRESETS = "tokenreduce.baselines.tomesd.presets"


@hookimpl
def tokenreduce_register(registry) -> None:  # noqa: ANN001 - the typed registry is passed by pluggy
    registry.add(TomesdGridSelector)
    registry.add(BipartiteMerger)
    registry.add_preset(
        "tomesd-sdxl",
        PRESETS,
        "tomesd-sdxl.yaml",
        "ToMeSD on SDXL: r=0.5 at self-attention of the 64x64 level, random 2x2 grid destinations, mean merge",
    )
    registry.add_preset(
        "tomesd-flux",
        PRESETS,
        "tomesd-flux.yaml",
        "ToMeSD's bipartite matching on Flux: r=0.5, 2x2 grid destinations, batch-shared matching",
    )
    registry.add_preset(
        "tomesd-wan",
        PRESETS,
        "tomesd-wan.yaml",
        "ToMeSD's bipartite matching on Wan: r=0.5 at toma-wan's sites, 2x2 grid destinations per frame",
    )
    registry.add_preset(
        "mixed-fl-bipartite",
        PRESETS,
        "mixed-fl-bipartite.yaml",
        "Facility-location destinations (8x8 tiles) with ToMeSD's bipartite mean merge on SDXL",
    )
    registry.add_preset(
        "mixed-grid-attention",
        PRESETS,
        "mixed-grid-attention.yaml",
        "ToMeSD's random grid destinations with ToMA's attention merge on SDXL (stride 2x2, r=0.75)",
    )
