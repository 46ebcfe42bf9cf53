"""Step-sharing reuse policy: destinations every few denoising steps, weights more often.

The paper's SDXL setting recomputes destinations every 10 steps and merge weights every 5;
between those steps the cached plan is reused. Sharing across blocks (one plan per block kind,
or one per block) is read by the runtime from ``sharing``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tokenreduce.interfaces import Decision, ReusePolicy
from tokenreduce.params import StrictParams


class StepSharingPolicy(ReusePolicy):
    name = "step_sharing"

    class Params(StrictParams):
        name: Literal["step_sharing"] = "step_sharing"
        destinations_every: int = Field(
            10, ge=1, description="Recompute destinations (and weights) every this many steps."
        )
        weights_every: int = Field(5, ge=1, description="Recompute merge weights every this many steps.")
        sharing: Literal["kind", "block"] = Field(
            "kind", description="'kind': blocks of one kind share a plan; 'block': every block has its own."
        )

    params: Params

    def __init__(self, params: StrictParams | None = None) -> None:
        super().__init__(params)
        self.sharing = self.params.sharing
        self._destinations_every = self.params.destinations_every
        self._weights_every = self.params.weights_every

    @property
    def needs_step(self) -> bool:
        # Destinations every step imply new weights every step: no step index is needed.
        return self._destinations_every > 1

    def decide(self, step: int) -> Decision:
        if step % self._destinations_every == 0:
            return Decision.SELECT
        if step % self._weights_every == 0:
            return Decision.WEIGHTS
        return Decision.REUSE
