"""The strict pydantic base that every component's parameter model inherits (third-party ones too)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator


def plain_numbers(value: Any) -> Any:
    """``value`` with numpy scalars and 0-d numpy arrays or tensors turned into Python numbers
    (recursively through dicts, lists and tuples), so strict validation accepts them."""
    if isinstance(value, dict):
        return {k: plain_numbers(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(plain_numbers(v) for v in value) if type(value) in (list, tuple) else value
    if isinstance(value, np.generic | np.ndarray | torch.Tensor) and value.ndim == 0:
        return value.item()
    return value


class StrictParams(BaseModel):
    """Frozen, strict parameters: unknown fields and silent type coercions are errors.

    Every component declares ``class Params(StrictParams)`` with a ``name: Literal["..."]`` field
    that matches the component's registered name; the config schema is built from these models.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _plain_numbers(cls, data: Any) -> Any:
        return plain_numbers(data) if isinstance(data, dict) else data

    if TYPE_CHECKING:  # declared by each subclass as a ``Literal``; no field on the base at runtime
        name: str = ""


class AdapterParams(StrictParams):
    """Parameters every model adapter has; an adapter's ``Params`` inherits them."""

    size_weighting: bool = Field(
        False,
        description=(
            "Size-weighted (proportional) attention: add log(group size) to each merged key's attention "
            "logit, so a merged token weighs what its group weighed next to unmerged (text) tokens. Needs a "
            "merger that gives group sizes. Costs one extra head dimension (padded to 8) in merged attention."
        ),
    )
