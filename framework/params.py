"""The strict pydantic base that every component's parameter model inherits (third-party ones too)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictParams(BaseModel):
    """Frozen, strict parameters: unknown fields and silent type coercions are errors.

    Every component declares ``class Params(StrictParams)`` with a ``name: Literal["..."]`` field
    that matches the component's registered name; the config schema is built from these models.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)
