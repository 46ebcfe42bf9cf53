"""ToFu (Kim et al., arXiv 2312.01026) as a plugin: the ``tofu`` merger (prune early, MLERP late).

Destinations come from any selector (the presets use ToMeSD's ``tomesd_grid``).
"""

from __future__ import annotations

from tokenreduce.baselines.tofu.merger import TofuMerger, mlerp
from tokenreduce.hookspecs import hookimpl

__all__ = ["TofuMerger", "mlerp"]

PRESETS = "tokenreduce.baselines.tofu.presets"


@hookimpl
def tokenreduce_register(registry) -> None:  # noqa: ANN001 - the typed registry is passed by pluggy
    registry.add(TofuMerger)
    registry.add_preset(
        "tofu-sdxl",
        PRESETS,
        "tofu-sdxl.yaml",
        "ToFu on SDXL: r=0.5 at self-attention of the 64x64 level, prune in the first half, MLERP in the second",
    )
    registry.add_preset(
        "tofu-flux",
        PRESETS,
        "tofu-flux.yaml",
        "ToFu on Flux: r=0.5, 2x2 grid destinations, prune in the first half of the merged blocks, then MLERP",
    )
    registry.add_preset(
        "tofu-wan",
        PRESETS,
        "tofu-wan.yaml",
        "ToFu on Wan: r=0.5 at toma-wan's sites, 2x2 grid destinations per frame, prune then MLERP",
    )
