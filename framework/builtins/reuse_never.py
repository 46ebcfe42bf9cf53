"""``never`` reuse policy: one plan per block kind, selected at the first step and reused after it."""

from __future__ import annotations

from typing import Literal

from tokenreduce.interfaces import Decision, ReusePolicy
from tokenreduce.params import StrictParams


class NeverPolicy(ReusePolicy):
    name = "never"
    sharing = "kind"

    class Params(StrictParams):
        name: Literal["never"] = "never"

    def decide(self, step: int) -> Decision:
        return Decision.SELECT if step == 0 else Decision.REUSE
