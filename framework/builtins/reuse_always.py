"""``always`` reuse policy: every block selects anew on every call (no reuse at all)."""

from __future__ import annotations

from typing import Literal

from tokenreduce.interfaces import Decision, ReusePolicy
from tokenreduce.params import StrictParams


class AlwaysPolicy(ReusePolicy):
    name = "always"
    sharing = "block"

    class Params(StrictParams):
        name: Literal["always"] = "always"

    @property
    def needs_step(self) -> bool:
        return False

    def decide(self, step: int) -> Decision:
        return Decision.SELECT
