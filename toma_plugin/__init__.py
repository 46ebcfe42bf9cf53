"""ToMA reference plugins: tile partitioner, facility-location selector, attention merger, step sharing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenreduce.hookspecs import hookimpl
from tokenreduce.toma_plugin.attention_merger import AttentionMerger
from tokenreduce.toma_plugin.facility_location import FacilityLocationSelector, facility_location_greedy
from tokenreduce.toma_plugin.step_sharing import StepSharingPolicy
from tokenreduce.toma_plugin.tile import TilePartitioner

if TYPE_CHECKING:
    from tokenreduce.registry import Registry

__all__ = [
    "AttentionMerger",
    "FacilityLocationSelector",
    "StepSharingPolicy",
    "TilePartitioner",
    "facility_location_greedy",
]


@hookimpl
def tokenreduce_register(registry: Registry) -> None:
    registry.add(TilePartitioner)
    registry.add(FacilityLocationSelector)
    registry.add(AttentionMerger)
    registry.add(StepSharingPolicy)
