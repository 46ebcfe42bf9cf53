"""Generic building blocks, registered through the same hook as any third-party plugin.

Partitioners ``global`` and ``stripe``; selectors ``random`` and ``grid``; mergers ``identity``
(no reduction, overhead measurement), ``ideal`` (the zero-overhead ceiling) and ``hard_mean``;
reuse policies ``always``, ``never`` and ``every_k``. Any of them combines with any other
plugin's components through the config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from framework.builtins.merge_hard_mean import HardMeanMerger
from framework.builtins.merge_ideal import IdealMerger
from framework.builtins.merge_identity import IdentityMerger
from framework.builtins.partition_global import GlobalPartitioner
from framework.builtins.partition_stripe import StripePartitioner
from framework.builtins.reuse_always import AlwaysPolicy
from framework.builtins.reuse_every_k import EveryKPolicy
from framework.builtins.reuse_never import NeverPolicy
from framework.builtins.select_grid import GridSelector
from framework.builtins.select_random import RandomSelector
from framework.hookspecs import hookimpl

if TYPE_CHECKING:
    from framework.registry import Registry

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
)

__all__ = [
    "COMPONENTS",
    "AlwaysPolicy",
    "EveryKPolicy",
    "GlobalPartitioner",
    "GridSelector",
    "HardMeanMerger",
    "IdealMerger",
    "IdentityMerger",
    "NeverPolicy",
    "RandomSelector",
    "StripePartitioner",
]


@hookimpl
def tokenreduce_register(registry: Registry) -> None:
    for cls in COMPONENTS:
        registry.add(cls)
