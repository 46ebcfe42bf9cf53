"""Public hypothesis strategies for token-reduction components (keyword-only, small shapes).

Plugin authors reuse them in their own property tests::

    from hypothesis import given
    from tokenreduce.testing.strategies import grids, ratios, token_batches

    @given(grid=grids(max_side=8), ratio=ratios())
    def test_my_selector(grid, ratio): ...

Tensors are drawn from a seed (plus a "mode" for structured inputs) rather than element by
element: examples stay fast, shrink to seed 0 and can be pinned with ``@example``. Values are
exact in float64 by default; other dtypes are for tolerance checks.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload

import torch
from hypothesis import assume
from hypothesis import strategies as st
from pydantic import ValidationError
from pydantic.fields import FieldInfo

from tokenreduce.builtins import GlobalPartitioner, StripePartitioner
from tokenreduce.interfaces import Component, Partitioner
from tokenreduce.layout import Regions, grid_fits
from tokenreduce.params import StrictParams

T = TypeVar("T")

#: the largest ratio the strategies draw by default (the config allows anything below 1)
LARGEST_RATIO = 0.9
#: grids worth pinning with ``@example``: one token, a single row/column, odd sides, the largest
EDGE_GRIDS: tuple[tuple[int, int], ...] = ((1, 1), (1, 7), (7, 1), (5, 3), (12, 12))
#: structured token patterns ``make_tokens`` knows (see its docstring)
TOKEN_MODES: tuple[str, ...] = ("normal", "constant", "blocks", "clustered", "sparse", "scaled")

SEEDS = st.integers(min_value=0, max_value=2**31 - 1)


def _strategy(value: T | st.SearchStrategy[T]) -> st.SearchStrategy[T]:
    return value if isinstance(value, st.SearchStrategy) else st.just(value)


# --------------------------------------------------------------------------- shapes and ratios


@overload
def grids(
    *, min_side: int = ..., max_side: int = ..., rank: Literal[2] = ..., max_frames: int = ...
) -> st.SearchStrategy[tuple[int, int]]: ...
@overload
def grids(
    *, min_side: int = ..., max_side: int = ..., rank: Literal[3], max_frames: int = ...
) -> st.SearchStrategy[tuple[int, int, int]]: ...
@overload
def grids(
    *, min_side: int = ..., max_side: int = ..., rank: int, max_frames: int = ...
) -> st.SearchStrategy[tuple[int, ...]]: ...
def grids(
    *, min_side: int = 1, max_side: int = 12, rank: int = 2, max_frames: int = 4
) -> st.SearchStrategy[tuple[int, ...]]:
    """Token grids ``(h, w)`` (rank 2) or ``(t, h, w)`` (rank 3, at most ``max_frames`` frames):
    square or not, divisible by anything or not."""
    side = st.integers(min_value=min_side, max_value=max_side)
    if rank == 2:
        return st.tuples(side, side)
    if rank == 3:
        return st.tuples(st.integers(min_value=1, max_value=max_frames), side, side)
    raise ValueError(f"grids of rank 2 or 3 only, got {rank}")


def ratios(*, max_ratio: float = LARGEST_RATIO) -> st.SearchStrategy[float]:
    """Merge ratios in ``[0, max_ratio]``, with both ends drawn often."""
    return st.one_of(
        st.sampled_from([0.0, max_ratio]),
        st.floats(min_value=0.0, max_value=max_ratio, allow_nan=False, allow_infinity=False),
    )


def partitioners(*, max_rows: int = 6) -> st.SearchStrategy[Partitioner]:
    """Built-in partitioners: ``global`` (one raster region) or ``stripe`` (ragged when rows do not divide)."""
    stripe = st.integers(min_value=1, max_value=max_rows).map(
        lambda rows: StripePartitioner(StripePartitioner.Params(rows=rows))
    )
    return st.one_of(st.just(GlobalPartitioner()), stripe)


@st.composite
def regions_for(
    draw: st.DrawFn,
    *,
    partitioner: Partitioner | st.SearchStrategy[Partitioner],
    grid: tuple[int, int] | st.SearchStrategy[tuple[int, int]],
) -> Regions:
    """The regions ``partitioner`` makes on ``grid`` (grids below its ``min_grid`` are rejected)."""
    part = draw(_strategy(partitioner))
    g = tuple(draw(_strategy(grid)))
    assume(grid_fits(g, part.min_grid()))
    return part.partition(g)


@st.composite
def arbitrary_regions(
    draw: st.DrawFn, *, grid: tuple[int, int] | st.SearchStrategy[tuple[int, int]], max_regions: int = 6
) -> Regions:
    """Any partition of the grid: non-contiguous, unequal regions with padding (no ``local_rc``)."""
    h, w = draw(_strategy(grid))
    n = h * w
    order = draw(st.permutations(range(n)))
    count = draw(st.integers(min_value=1, max_value=min(max_regions, n)))
    cuts = sorted(
        draw(st.lists(st.integers(1, max(n - 1, 1)), min_size=count - 1, max_size=count - 1, unique=True))
    )
    bounds = [0, *cuts, n]
    groups = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    slots = max(len(g) for g in groups)
    index = torch.zeros(len(groups), slots, dtype=torch.long)
    valid = torch.zeros(len(groups), slots, dtype=torch.bool)
    for r, g in enumerate(groups):
        index[r, : len(g)] = torch.tensor(g, dtype=torch.long)
        valid[r, : len(g)] = True
    return Regions(grid=(h, w), index=index, valid=valid, sizes=tuple(len(g) for g in groups))


def feasible_ratio(regions: Regions, ratio: float) -> float:
    """``ratio`` lowered, if needed, so that every non-empty region can keep at least one token."""
    n = sum(regions.sizes)
    occupied = sum(1 for s in regions.sizes if s)
    return min(ratio, (n - occupied) / n) if n else 0.0


def merging_ratio(regions: Regions, ratio: float) -> float:
    """A feasible ratio near ``ratio`` that removes at least one token (0 when nothing can be removed)."""
    n = sum(regions.sizes)
    room = n - sum(1 for s in regions.sizes if s)
    if room < 1:
        return 0.0
    removed = min(max(int(ratio * n), 1), room)
    # The half keeps floor(ratio * n) == removed despite rounding.
    return (removed + 0.5) / n


# --------------------------------------------------------------------------- tokens


def make_tokens(
    shape: tuple[int, int, int],
    *,
    seed: int = 0,
    mode: str = "normal",
    dtype: torch.dtype = torch.float64,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A deterministic ``(B, N, C)`` token batch.

    Modes: ``normal`` (standard normal), ``constant`` (one vector per sample everywhere, a
    constant tile), ``blocks`` (constant on 2x2 blocks of ``grid``: spatial redundancy),
    ``clustered`` (copies of a few prototypes), ``sparse`` (about half the tokens exactly zero),
    ``scaled`` (per-token magnitudes from 1e-3 to 1e3).
    """
    b, n, c = shape
    gen = torch.Generator().manual_seed(seed)
    if mode == "normal":
        x = torch.randn(b, n, c, generator=gen, dtype=torch.float64)
    elif mode == "constant":
        x = torch.randn(b, 1, c, generator=gen, dtype=torch.float64).expand(b, n, c)
    elif mode == "blocks":
        h, w = grid if grid is not None else (1, n)
        rows = torch.arange(h).repeat_interleave(w) // 2
        cols = torch.arange(w).repeat(h) // 2
        block = rows * ((w + 1) // 2) + cols
        protos = torch.randn(b, int(block.max()) + 1, c, generator=gen, dtype=torch.float64)
        x = protos[:, block]
    elif mode == "clustered":
        groups = int(torch.randint(1, 5, (1,), generator=gen))
        protos = torch.randn(b, groups, c, generator=gen, dtype=torch.float64)
        x = protos[:, torch.randint(groups, (n,), generator=gen)]
    elif mode == "sparse":
        x = torch.randn(b, n, c, generator=gen, dtype=torch.float64)
        x = x * (torch.rand(b, n, 1, generator=gen, dtype=torch.float64) < 0.5)
    elif mode == "scaled":
        x = torch.randn(b, n, c, generator=gen, dtype=torch.float64)
        x = x * 10.0 ** (6.0 * torch.rand(b, n, 1, generator=gen, dtype=torch.float64) - 3.0)
    else:
        raise ValueError(f"unknown token mode {mode!r}; known: {', '.join(TOKEN_MODES)}")
    return x.contiguous().to(dtype)


@st.composite
def token_batches(
    draw: st.DrawFn,
    *,
    grid: tuple[int, int] | st.SearchStrategy[tuple[int, int]],
    channels: int | st.SearchStrategy[int] | None = None,
    batch_sizes: int | st.SearchStrategy[int] | None = None,
    dtype: torch.dtype = torch.float64,
    modes: Sequence[str] = TOKEN_MODES,
) -> torch.Tensor:
    """``(B, N, C)`` tokens in raster order on ``grid`` (see :func:`make_tokens` for the modes).

    ``channels`` defaults to 1..8 and ``batch_sizes`` to 1..3.
    """
    h, w = draw(_strategy(grid))
    c = draw(_strategy(channels if channels is not None else st.integers(min_value=1, max_value=8)))
    b = draw(_strategy(batch_sizes if batch_sizes is not None else st.integers(min_value=1, max_value=3)))
    return make_tokens(
        (b, h * w, c), seed=draw(SEEDS), mode=draw(st.sampled_from(list(modes))), dtype=dtype, grid=(h, w)
    )


def grouped_tokens(
    groups: torch.Tensor,
    *,
    batch_size: int = 1,
    channels: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """``(B, N, C)`` tokens equal within each group: token ``n`` of sample ``b`` is ``V[b, groups[n]]``.

    The group vectors are orthogonal (when ``channels >= number of groups``, the default) with
    random positive magnitudes, so the most similar group vector of every token is its own.
    """
    count = int(groups.max()) + 1 if groups.numel() else 1
    c = channels if channels is not None else max(count, 4)
    gen = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(batch_size, c, c, generator=gen, dtype=torch.float64)).Q
    if count <= c:
        vectors = basis[:, :count, :]
    else:
        vectors = torch.nn.functional.normalize(
            torch.randn(batch_size, count, c, generator=gen, dtype=torch.float64), dim=-1
        )
    vectors = vectors * (0.5 + 1.5 * torch.rand(batch_size, count, 1, generator=gen, dtype=torch.float64))
    return vectors[:, groups].contiguous().to(dtype)


@st.composite
def clustered_tokens(
    draw: st.DrawFn,
    *,
    groups: torch.Tensor | st.SearchStrategy[torch.Tensor],
    batch_sizes: int | st.SearchStrategy[int] | None = None,
    channels: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Tokens constant on every group of ``groups`` (``(N,)`` group ids): inputs a merge must invert.

    ``batch_sizes`` defaults to 1..3; see :func:`grouped_tokens` for the group vectors.
    """
    ids = draw(_strategy(groups))
    b = draw(_strategy(batch_sizes if batch_sizes is not None else st.integers(min_value=1, max_value=3)))
    return grouped_tokens(ids, batch_size=b, channels=channels, seed=draw(SEEDS), dtype=dtype)


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Scenario:
    """One drawn test case: grid, partition, ratio and the recipe of a token batch."""

    grid: tuple[int, int]
    partitioner: Partitioner
    ratio: float
    batch_size: int = 1
    channels: int = 4
    seed: int = 0
    mode: str = "normal"
    dtype: torch.dtype = torch.float64

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    def regions(self) -> Regions:
        return self.partitioner.partition(self.grid)

    def tokens(self, *, seed_offset: int = 0, dtype: torch.dtype | None = None) -> torch.Tensor:
        shape = (self.batch_size, self.num_tokens, self.channels)
        return make_tokens(
            shape, seed=self.seed + seed_offset, mode=self.mode, dtype=dtype or self.dtype, grid=self.grid
        )


def scenarios(
    *,
    grid: st.SearchStrategy[tuple[int, int]] | None = None,
    partitioner: st.SearchStrategy[Partitioner] | None = None,
    ratio: st.SearchStrategy[float] | None = None,
    batch_sizes: st.SearchStrategy[int] | None = None,
    channels: st.SearchStrategy[int] | None = None,
    dtypes: Sequence[torch.dtype] = (torch.float64,),
    modes: Sequence[str] = TOKEN_MODES,
) -> st.SearchStrategy[Scenario]:
    """Scenarios with small shapes; every field can be replaced by another strategy."""
    return st.builds(
        Scenario,
        grid=grids() if grid is None else grid,
        partitioner=partitioners() if partitioner is None else partitioner,
        ratio=ratios() if ratio is None else ratio,
        batch_size=st.integers(min_value=1, max_value=3) if batch_sizes is None else batch_sizes,
        channels=st.integers(min_value=1, max_value=8) if channels is None else channels,
        seed=SEEDS,
        mode=st.sampled_from(list(modes)),
        dtype=st.sampled_from(list(dtypes)),
    )


def _stripe(rows: int) -> Partitioner:
    return StripePartitioner(StripePartitioner.Params(rows=rows))


#: cases to pin with ``@example(case=...)``: one token, a single row, an odd ragged grid,
#: a constant tile, the largest ratio on the largest grid, a single column of one-row stripes
EDGE_SCENARIOS: tuple[Scenario, ...] = (
    Scenario(grid=(1, 1), partitioner=GlobalPartitioner(), ratio=LARGEST_RATIO),
    Scenario(grid=(1, 7), partitioner=GlobalPartitioner(), ratio=0.5, batch_size=2, channels=1),
    Scenario(grid=(5, 3), partitioner=_stripe(2), ratio=0.5, batch_size=3, channels=3, mode="normal"),
    Scenario(grid=(4, 4), partitioner=_stripe(2), ratio=0.5, batch_size=2, mode="constant"),
    Scenario(
        grid=(12, 12), partitioner=GlobalPartitioner(), ratio=LARGEST_RATIO, batch_size=2, mode="blocks"
    ),
    Scenario(grid=(7, 1), partitioner=_stripe(1), ratio=LARGEST_RATIO, mode="sparse"),
)


# --------------------------------------------------------------------------- parameters


def example_params(component_cls: type[Component]) -> StrictParams:
    """Params to build ``component_cls`` with: its ``example_params()`` classmethod, else the defaults."""
    factory: Callable[[], StrictParams] | None = getattr(component_cls, "example_params", None)
    return factory() if factory is not None else component_cls.Params()


def component_params(component_cls: type[Component]) -> st.SearchStrategy[StrictParams]:
    """Valid ``Params`` of a component: its example/defaults, or fields drawn from their types and bounds.

    Numbers honour ``ge``/``gt``/``le``/``lt`` (unbounded ones stay within 16 of their lower
    bound: small shapes); ``Literal``, ``bool``, ``None`` unions, lists and nested models are
    drawn; anything else keeps its default. A combination the model rejects (cross-field
    validators) falls back to the example params.
    """
    params_cls = component_cls.Params
    base = example_params(component_cls)
    fields = {
        name: _field_strategy(info, getattr(base, name))
        for name, info in params_cls.model_fields.items()
        if name != "name"
    }

    def build(values: dict[str, Any]) -> StrictParams:
        try:
            return params_cls.model_validate({**base.model_dump(), **values})
        except ValidationError:
            return base

    return st.one_of(st.just(base), st.fixed_dictionaries(fields).map(build))


def _field_strategy(info: FieldInfo, default: Any) -> st.SearchStrategy[Any]:
    drawn = _type_strategy(info.annotation, info.metadata)
    return st.just(default) if drawn is None else st.one_of(st.just(default), drawn)


def _bounds(metadata: Sequence[Any]) -> dict[str, Any]:
    bounds: dict[str, Any] = {}
    for item in metadata:
        for attr in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            value = getattr(item, attr, None)
            if value is not None:
                bounds[attr] = value
        if isinstance(item, FieldInfo):
            bounds.update(_bounds(item.metadata))
    return bounds


def _type_strategy(annotation: Any, metadata: Sequence[Any] = ()) -> st.SearchStrategy[Any] | None:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_strategy(args[0], [*metadata, *args[1:]])
    bounds = _bounds(metadata)
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin in (typing.Union, types.UnionType):
        options: list[st.SearchStrategy[Any]] = []
        for a in args:
            option = st.none() if a is type(None) else _type_strategy(a, metadata)
            if option is None:  # a member that cannot be drawn: the field keeps its default
                return None
            options.append(option)
        return st.one_of(options)
    if origin is list:
        item = _type_strategy(args[0]) if args else None
        if item is None:
            return None
        low = bounds.get("min_length", 0)
        return st.lists(item, min_size=low, max_size=bounds.get("max_length", low + 3))
    if annotation is bool:
        return st.booleans()
    if annotation is int:
        low = bounds.get("ge", bounds["gt"] + 1 if "gt" in bounds else 0)
        high = bounds.get("le", bounds["lt"] - 1 if "lt" in bounds else low + 16)
        return st.integers(min_value=low, max_value=high)
    if annotation is float:
        low = bounds.get("ge", bounds.get("gt", 0.0))
        high = bounds.get("le", bounds.get("lt", low + 16.0))
        return st.floats(
            min_value=low,
            max_value=high,
            exclude_min="gt" in bounds,
            exclude_max="lt" in bounds,
            allow_nan=False,
            allow_infinity=False,
        )
    # Free text (paths, ids), nested models and anything else keep their default.
    return None


__all__ = [
    "EDGE_GRIDS",
    "EDGE_SCENARIOS",
    "LARGEST_RATIO",
    "SEEDS",
    "TOKEN_MODES",
    "Scenario",
    "arbitrary_regions",
    "clustered_tokens",
    "component_params",
    "example_params",
    "feasible_ratio",
    "grids",
    "grouped_tokens",
    "make_tokens",
    "merging_ratio",
    "partitioners",
    "ratios",
    "regions_for",
    "scenarios",
    "token_batches",
]
