"""Generic building blocks, registered through the same hook as any third-party plugin.

Partitioners ``global`` and ``stripe``; selectors ``random`` and ``grid``; mergers ``identity``
(no reduction, overhead measurement), ``ideal`` (the zero-overhead ceiling) and ``hard_mean``;
reuse policies ``always``, ``never`` and ``every_k``; merge schedules ``always``, ``every``,
``window``, ``timesteps`` and ``steps``. Any of them combines with any other
plugin's components through the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenreduce.builtins.merge_hard_mean import HardMeanMerger
from tokenreduce.builtins.merge_ideal import IdealMerger
from tokenreduce.builtins.merge_identity import IdentityMerger
from tokenreduce.builtins.partition_global import GlobalPartitioner
from tokenreduce.builtins.partition_stripe import StripePartitioner
from tokenreduce.builtins.reuse_always import AlwaysPolicy
from tokenreduce.builtins.reuse_every_k import EveryKPolicy
from tokenreduce.builtins.reuse_never import NeverPolicy
from tokenreduce.builtins.schedules import (
    SCHEDULES,
    AlwaysSchedule,
    EverySchedule,
    StepListSchedule,
    TimestepSchedule,
    WindowSchedule,
)
from tokenreduce.builtins.select_grid import GridSelector
from tokenreduce.builtins.select_random import RandomSelector
from tokenreduce.hookspecs import hookimpl

if TYPE_CHECKING:
    from tokenreduce.registry import Registry

COMPONENTS = (
    GlobalPartitioner,
    StripePartitioner,
    RandomSelector,
    GridSelector,
    IdentityMerger,
    IdealMerger,
    HardMeanMerger,
    AlwaysPolicy,
    NeverPolicy,
    EveryKPolicy,
    *SCHEDULES,
)

__all__ = [
    "COMPONENTS",
    "AlwaysPolicy",
    "AlwaysSchedule",
    "EveryKPolicy",
    "EverySchedule",
    "GlobalPartitioner",
    "GridSelector",
    "HardMeanMerger",
    "IdealMerger",
    "IdentityMerger",
    "NeverPolicy",
    "RandomSelector",
    "StepListSchedule",
    "StripePartitioner",
    "TimestepSchedule",
    "WindowSchedule",
]


@hookimpl
def tokenreduce_register(registry: Registry) -> None:
    for cls in COMPONENTS:
        registry.add(cls)
