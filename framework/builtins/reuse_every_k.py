"""``every_k`` reuse policy: select anew every ``k`` denoising steps, reuse the plan in between."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tokenreduce.interfaces import Decision, ReusePolicy
from tokenreduce.params import StrictParams


class EveryKPolicy(ReusePolicy):
    name = "every_k"

    class Params(StrictParams):
        name: Literal["every_k"] = "every_k"
        k: int = Field(5, ge=1, description="Select new destinations and weights every k steps.")
        sharing: Literal["kind", "block"] = Field(
            "kind", description="'kind': blocks of one kind share a plan; 'block': every block has its own."
        )

    params: Params

    def __init__(self, params: StrictParams | None = None) -> None:
        super().__init__(params)
        self.sharing = self.params.sharing
        self._k = self.params.k

    @property
    def needs_step(self) -> bool:
        return self._k > 1  # k = 1 selects on every call: no step index needed

    def decide(self, step: int) -> Decision:
        return Decision.SELECT if step % self._k == 0 else Decision.REUSE
