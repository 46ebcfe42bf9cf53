"""Contract test mixins: the properties every partitioner, selector, merger and reuse policy must have.

Subclass the matching mixin in a test module and name the component::

    from tokenreduce.testing.contracts import SelectorContract

    class TestCentralSelector(SelectorContract):
        component = CentralSelector()        # an instance, or the class itself

or override the ``component`` fixture (it may be parametrised)::

    class TestMine(MergerContract):
        @pytest.fixture(name="component", scope="class", params=["a", "b"])
        def component_fixture(self, request):
            return MyMerger(MyMerger.Params(mode=request.param))

A class is built with its ``example_params()`` classmethod when it has one (components whose
``Params`` cannot be built from defaults must provide it), else with ``Params()``.

The mixins drive components through the engine's own helpers (:class:`tokenreduce.layout.Layout`,
:meth:`tokenreduce.engine.Runtime.layout`, :meth:`Runtime.features`, :meth:`Runtime.plan`), so
they test what the engine actually calls. Optional class attributes a merger may declare:

- ``hard = True``: exact hard assignments; ``unmerge(merge(x)) == x`` for ``x`` constant on
  every merge group and ``merge(unmerge(y)) == y`` are checked to float tolerance.
  ``hard = False``: soft assignments, checked at the default parameters to ``soft_tolerance``.
  Without the attribute these two properties are not checked.
- ``linear = False``: opts out of the linearity check (merge/unmerge linear for a fixed plan).
- ``convex = False``: opts out of the convexity check (merged tokens are convex combinations).

Mergers get destinations from ``MergerContract.companion_selector()`` (the built-in ``random``
selector; override it when a merger needs another one) and are tested at site positions 0, 0.5
and 1 (``for_site``). Partitioners are tested on grids from ``min_grid()`` up to 11 more rows
and columns. A ``ValueError`` raised while building a layout (an impossible combination, which
the engine reports before patching) rejects that example rather than failing it.

The tests use hypothesis; load a profile with ``deadline=None`` in your ``conftest.py`` (first
torch calls are slow), as this project's ``tests/conftest.py`` does.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, cast

import pytest
import torch
from hypothesis import example, given, reject
from hypothesis import strategies as st

from tokenreduce.builtins import (
    AlwaysPolicy,
    GlobalPartitioner,
    HardMeanMerger,
    IdentityMerger,
    RandomSelector,
)
from tokenreduce.config import ConfigBase, Resolved
from tokenreduce.engine import Runtime
from tokenreduce.interfaces import (
    Component,
    Decision,
    MergePlan,
    Merger,
    Partitioner,
    ReusePolicy,
    SelectContext,
    Selector,
)
from tokenreduce.layout import Layout, Regions, kept_per_region
from tokenreduce.testing.strategies import (
    EDGE_GRIDS,
    EDGE_SCENARIOS,
    SEEDS,
    Scenario,
    example_params,
    feasible_ratio,
    grids,
    grouped_tokens,
    make_tokens,
    merging_ratio,
    ratios,
    scenarios,
)

T = TypeVar("T")

#: site positions (place among the merged blocks) at which mergers are tested
POSITIONS = (0.0, 0.5, 1.0)

__all__ = [
    "ComponentContract",
    "MergerContract",
    "PartitionerContract",
    "ReusePolicyContract",
    "SelectorContract",
    "build_component",
    "check_regions",
    "layout_or_reject",
    "make_layout",
    "make_runtime",
    "merge_groups",
    "probe_matrix",
    "seeded",
]

# --------------------------------------------------------------------------- engine helpers


def build_component(component: Component | type[Component]) -> Component:
    """An instance: ``component`` itself, or the class built with its example params."""
    if isinstance(component, type):
        return component(example_params(component))
    return component


def make_runtime(
    *,
    partitioner: Partitioner,
    selector: Selector | None = None,
    merger: Merger | None = None,
    reuse: ReusePolicy | None = None,
    ratio: float,
    seed: int = 0,
) -> Runtime:
    """A :class:`Runtime` over these components (no adapter); missing ones are neutral built-ins.

    The default merger is ``identity`` (needs no destinations, so any selector count is accepted).
    """
    resolved = Resolved(
        # model_validate: the component fields exist only on the registry's concrete config models
        config=ConfigBase.model_validate({"ratio": ratio, "seed": seed}),
        selector=selector or RandomSelector(),
        merger=merger or IdentityMerger(),
        partitioner=partitioner,
        reuse=reuse or AlwaysPolicy(),
        adapter=None,
    )
    return Runtime(resolved)


def make_layout(
    partitioner: Partitioner,
    selector: Selector,
    grid: tuple[int, ...],
    ratio: float,
    *,
    merger: Merger | None = None,
) -> Layout:
    """The layout the engine builds for ``grid``; with ``merger``, its destination-count checks apply."""
    return make_runtime(partitioner=partitioner, selector=selector, merger=merger, ratio=ratio).layout(grid)


def layout_or_reject(build: Callable[[], T]) -> T:
    """Run a layout-time step; a ``ValueError`` (an impossible grid/ratio/component combination,
    which the engine reports before patching) rejects the hypothesis example instead of failing."""
    try:
        return build()
    except ValueError as exc:
        assert str(exc), "layout-time errors must say what is wrong"
        reject()


def assume_rank(component: Component, grid: tuple[int, ...]) -> None:
    """Skip the example when ``component`` declares it does not work on grids of this rank."""
    if component.grid_ranks is not None and len(grid) not in component.grid_ranks:
        reject()


def seeded(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded like the runtime's dedicated one."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def check_regions(regions: Regions, grid: tuple[int, ...]) -> None:
    """Assert that ``regions`` is a well-formed partition of ``grid`` (any rank) covering every token once."""
    grid = tuple(grid)
    n = math.prod(grid)
    assert regions.grid == grid
    assert regions.index.dtype == torch.long and regions.valid.dtype == torch.bool
    assert regions.index.dim() == 2 and regions.index.shape == regions.valid.shape
    r, s = regions.index.shape
    assert r >= 1 and s >= 1
    assert regions.sizes == tuple(int(v) for v in regions.valid.sum(dim=1))
    assert bool((regions.index[~regions.valid] == 0).all()), "padding slots must point at token 0"
    taken = regions.index[regions.valid]
    assert sorted(taken.tolist()) == list(range(n)), "every token must be in exactly one valid slot"
    if regions.is_raster:
        assert torch.equal(regions.index[0], torch.arange(n))
    if regions.local_rc is not None:
        assert regions.shape is not None and len(regions.shape) == len(grid), (
            "local_rc needs the full box shape"
        )
        assert regions.local_rc.shape == (r, s, len(grid))
        rc = regions.local_rc
        box = torch.tensor(regions.shape)
        # Grid coordinates of every token, one column per axis.
        strides = torch.tensor([math.prod(grid[i + 1 :]) for i in range(len(grid))])
        for region in range(r):
            mask = regions.valid[region]
            if not bool(mask.any()):
                continue
            local = rc[region, mask]
            assert bool((local >= 0).all() and (local < box).all())
            tokens = regions.index[region, mask]
            coords = (tokens.unsqueeze(-1) // strides) % torch.tensor(grid)
            # A box: grid position minus local position is the same for every slot.
            assert len({tuple(v) for v in (coords - local).tolist()}) == 1


def _shape3(tokens: torch.Tensor) -> tuple[int, int, int]:
    """The ``(B, N, C)`` shape of a token tensor."""
    b, n, c = tokens.shape
    return b, n, c


def probe_matrix(
    fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, int, int], dtype: torch.dtype
) -> torch.Tensor:
    """The ``(B, out, in)`` token-mixing matrix of a linear map ``fn`` on ``(B, in, C)`` tokens.

    Probed with one-hot tokens, ``C`` input tokens at a time (channel ``c`` carries token ``c``).
    """
    b, n, c = shape
    columns = []
    for start in range(0, n, c):
        x = torch.zeros(b, n, c, dtype=dtype)
        width = min(c, n - start)
        x[:, start + torch.arange(width), torch.arange(width)] = 1.0
        columns.append(fn(x)[:, :, :width])
    return torch.cat(columns, dim=2)


def merge_groups(layout: Layout, destinations: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``(N,)`` group ids: each destination its own group (ids in compact order), every other token
    a random destination of its region. Tokens of a region without destinations get fresh ids."""
    gen = torch.Generator().manual_seed(seed)
    regions = layout.regions
    groups = torch.empty(layout.num_tokens, dtype=torch.long)
    offset, fresh = 0, layout.num_destinations
    for r in range(regions.num_regions):
        d = layout.dests[r]
        local = destinations[r, :d].tolist()
        for s in torch.nonzero(regions.valid[r]).flatten().tolist():
            token = int(regions.index[r, s])
            if s in local:
                groups[token] = offset + local.index(s)
            elif d:
                groups[token] = offset + int(torch.randint(d, (1,), generator=gen))
            else:
                groups[token], fresh = fresh, fresh + 1
        offset += d
    return groups


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    err = float((actual.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3g} > {rtol * scale:.3g}"


def _with_examples(
    name: str, values: tuple[Any, ...], **fixed: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Pin ``@example(name=value, **fixed)`` for every value."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        for value in reversed(values):
            fn = example(**{name: value}, **fixed)(fn)
        return fn

    return decorate


def _own_copy(test: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(test)
    def copy(self: Any, *args: Any, **kwargs: Any) -> Any:
        return test(self, *args, **kwargs)

    return copy


# --------------------------------------------------------------------------- base


class ComponentContract:
    """Resolves the component under test from ``component`` (instance or class) or the fixture."""

    #: the component under test: an instance, or a class built with its example params
    component: ClassVar[Component | type[Component] | None] = None
    #: the interface the component must implement
    interface: ClassVar[type[Component]] = Component

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Hypothesis refuses one @given method run by instances of different classes (its
        # differing_executors health check): give every subclass its own thin wrapper.
        for name in dir(cls):
            test = getattr(cls, name)
            if name.startswith("test_") and name not in cls.__dict__ and hasattr(test, "hypothesis"):
                setattr(cls, name, _own_copy(test))

    @pytest.fixture(name="component", scope="class")
    def component_fixture(self) -> Component:
        if self.component is None:
            pytest.fail(f"{type(self).__name__}: set `component` or override the `component` fixture")
        return build_component(self.component)

    def test_implements_its_interface(self, component: Component) -> None:
        assert isinstance(component, self.interface)
        params = component.params
        assert params.name == component.name
        # Params survive a JSON round trip: they can be written in a config file.
        assert type(params).model_validate_json(params.model_dump_json()) == params


# --------------------------------------------------------------------------- partitioner


def _grid_at_least(component: Partitioner, offset: tuple[int, ...]) -> tuple[int, ...]:
    """``min_grid - 1 + offset`` on the trailing axes (the higher rank of the two; missing axes are 1)."""
    minimum = component.min_grid()
    rank = max(len(offset), len(minimum))
    offset = (1,) * (rank - len(offset)) + tuple(offset)
    minimum = (1,) * (rank - len(minimum)) + tuple(minimum)
    return tuple(m - 1 + o for m, o in zip(minimum, offset, strict=True))


def _offsets() -> st.SearchStrategy[tuple[int, ...]]:
    """Grid offsets of rank 2 (images) and rank 3 (frames x rows x cols)."""
    return st.one_of(grids(), grids(rank=3, max_side=8))


class PartitionerContract(ComponentContract):
    """Partitions cover every token exactly once, for any grid at or above ``min_grid``; they are static.

    Grids are drawn as ``min_grid - 1 + offset`` with offsets in ``1..12`` on each side, of rank 2
    and rank 3 (up to 4 frames); a partitioner declaring ``grid_ranks`` gets only those ranks.
    """

    interface = Partitioner

    @given(offset=_offsets())
    @_with_examples("offset", EDGE_GRIDS)
    def test_covers_every_token_once(self, component: Partitioner, offset: tuple[int, ...]) -> None:
        grid = _grid_at_least(component, offset)
        assume_rank(component, grid)
        check_regions(component.partition(grid), grid)

    @given(offset=_offsets())
    def test_same_grid_same_regions(self, component: Partitioner, offset: tuple[int, ...]) -> None:
        grid = _grid_at_least(component, offset)
        assume_rank(component, grid)
        first, second = component.partition(grid), component.partition(grid)
        assert torch.equal(first.index, second.index) and torch.equal(first.valid, second.valid)
        assert first.sizes == second.sizes and first.shape == second.shape
        fresh = type(component)(component.params).partition(grid)
        assert torch.equal(first.index, fresh.index) and torch.equal(first.valid, fresh.valid)

    @given(offset=_offsets(), ratio=ratios(), batch=st.integers(1, 3), seed=SEEDS)
    @example(offset=(1, 1), ratio=0.9, batch=1, seed=0)
    @example(offset=(3, 5, 7), ratio=0.5, batch=2, seed=0)
    def test_runs_through_the_runtime(
        self, component: Partitioner, offset: tuple[int, ...], ratio: float, batch: int, seed: int
    ) -> None:
        grid = _grid_at_least(component, offset)
        assume_rank(component, grid)
        regions = component.partition(grid)
        ratio = feasible_ratio(regions, ratio)
        runtime = make_runtime(
            partitioner=component, selector=RandomSelector(), merger=HardMeanMerger(), ratio=ratio
        )
        layout = runtime.layout(grid)
        n = math.prod(grid)
        assert layout.keep == n - int(ratio * n)
        x = make_tokens((batch, n, 3), seed=seed)
        assert torch.equal(layout.from_regions(layout.to_regions(x)), x)
        plan = runtime.plan(runtime.group("contract", "block"), x, grid)
        merged = plan.merge(x)
        assert merged.shape == (batch, layout.keep, 3)
        assert plan.unmerge(merged).shape == x.shape


# --------------------------------------------------------------------------- selector


class SelectorContract(ComponentContract):
    """Destinations are unique valid slots, ``dests[r]`` per region, deterministic for a seed, batch-shared."""

    interface = Selector

    @staticmethod
    def _layout_and_features(component: Selector, case: Scenario) -> tuple[Layout, torch.Tensor]:
        ratio = feasible_ratio(case.regions(), case.ratio)
        layout = layout_or_reject(lambda: make_layout(case.partitioner, component, case.grid, ratio))
        return layout, Runtime.features(case.tokens(), layout)

    @given(case=scenarios())
    @_with_examples("case", EDGE_SCENARIOS)
    def test_counts_fit_the_regions(self, component: Selector, case: Scenario) -> None:
        regions = case.regions()
        keep = kept_per_region(regions.sizes, feasible_ratio(regions, case.ratio))
        counts = layout_or_reject(lambda: component.count(regions, keep))
        assert len(counts) == regions.num_regions
        assert all(0 <= d <= s for d, s in zip(counts, regions.sizes, strict=True))

    @given(case=scenarios())
    @_with_examples("case", EDGE_SCENARIOS)
    def test_destinations_are_unique_valid_slots(self, component: Selector, case: Scenario) -> None:
        layout, features = self._layout_and_features(component, case)
        local = component.select(features, SelectContext(layout=layout, generator=seeded(case.seed)))
        regions = layout.regions
        assert local.dtype == torch.long and local.device == features.device
        assert local.shape == (regions.num_regions, layout.k)
        for r, d in enumerate(layout.dests):
            chosen = local[r, :d]
            assert bool(((chosen >= 0) & (chosen < regions.slots)).all()), f"region {r}: slot out of range"
            assert len(set(chosen.tolist())) == d, f"region {r}: duplicate destinations"
            assert bool(regions.valid[r, chosen].all()), f"region {r}: a padding slot was chosen"
        raster = layout.global_destinations(local)
        assert len(set(raster.tolist())) == layout.num_destinations

    @given(case=scenarios())
    @_with_examples("case", EDGE_SCENARIOS)
    def test_deterministic_for_a_seed(self, component: Selector, case: Scenario) -> None:
        layout, features = self._layout_and_features(component, case)
        global_state = torch.get_rng_state()
        first = component.select(features, SelectContext(layout=layout, generator=seeded(case.seed)))
        second = component.select(features.clone(), SelectContext(layout=layout, generator=seeded(case.seed)))
        assert torch.equal(first, second)
        # Selection uses the dedicated generator: the sampler's global stream is untouched.
        assert torch.equal(torch.get_rng_state(), global_state)


# --------------------------------------------------------------------------- merger


class MergerContract(ComponentContract):
    """Merge/unmerge shapes and dtypes, finiteness, linearity, convexity and (declared) invertibility.

    Plans are built by the engine (:meth:`Runtime.plan`) with the ``companion_selector`` (the
    built-in ``random`` one by default) at a ratio that removes at least one token.
    """

    interface = Merger
    #: relative tolerance of the invertibility checks for ``hard = False`` mergers
    soft_tolerance: ClassVar[float] = 1e-3
    #: relative tolerance for hard assignments and linearity (weights may be float32)
    tolerance: ClassVar[float] = 1e-5

    def companion_selector(self) -> Selector:
        """The selector that provides destinations (override for mergers that need a particular one)."""
        return RandomSelector()

    def _plan(
        self, component: Merger, case: Scenario, position: float
    ) -> tuple[Runtime, Merger, MergePlan, torch.Tensor]:
        ratio = merging_ratio(case.regions(), case.ratio)
        runtime = make_runtime(
            partitioner=case.partitioner,
            selector=self.companion_selector(),
            merger=component,
            ratio=ratio,
            seed=case.seed,
        )
        group = runtime.group("contract", "block", position)
        layout_or_reject(lambda: runtime.layout(case.grid))
        x = case.tokens()
        return runtime, group.merger, runtime.plan(group, x, case.grid), x

    @given(
        case=scenarios(dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16)),
        position=st.sampled_from(POSITIONS),
    )
    @_with_examples("case", EDGE_SCENARIOS, position=0.0)
    @example(case=EDGE_SCENARIOS[2], position=1.0)
    def test_shapes_dtypes_and_finiteness(self, component: Merger, case: Scenario, position: float) -> None:
        runtime, merger, plan, x = self._plan(component, case, position)
        layout = runtime.layout(case.grid)
        b, n, c = x.shape
        merged = plan.merge(x)
        assert merged.dim() == 3 and merged.shape[0] == b and merged.shape[2] == c
        assert merged.dtype == x.dtype and bool(torch.isfinite(merged).all())
        length = merged.shape[1]
        if layout.keep == n and not merger.kv_only:
            assert length == n  # the runtime's identity at this grid and ratio
        elif merger.kv_only:
            assert 1 <= length <= n
        elif merger.output == "keep":
            assert length == layout.keep
        elif merger.needs_destinations:
            assert length == layout.num_destinations
        else:
            assert 1 <= length <= n
        if plan.positions is not None:
            assert plan.positions.dtype == torch.long and plan.positions.shape == (length,)
            assert bool(((plan.positions >= 0) & (plan.positions < n)).all())
        if not merger.kv_only:
            restored = plan.unmerge(merged)
            assert restored.shape == x.shape and restored.dtype == x.dtype
            assert bool(torch.isfinite(restored).all())

    @staticmethod
    def _sites_where(component: Merger, applies: Callable[[Merger], bool], reason: str) -> list[float]:
        """Site positions whose merger the property applies to (skips the test when there is none)."""
        positions = [p for p in POSITIONS if applies(component.for_site(p))]
        if not positions:
            pytest.skip(f"{component.name}: {reason}")
        return positions

    def test_linear_for_a_fixed_plan(self, component: Merger) -> None:
        positions = self._sites_where(
            component, lambda m: getattr(m, "linear", True), "declares linear = False"
        )

        @given(case=scenarios(), position=st.sampled_from(positions), a=st.sampled_from([1.0, -0.5, 3.0]))
        @_with_examples("case", EDGE_SCENARIOS, position=positions[0], a=3.0)
        def check(case: Scenario, position: float, a: float) -> None:
            _, merger, plan, x = self._plan(component, case, position)
            x1, x2 = case.tokens(seed_offset=1), case.tokens(seed_offset=2)
            _assert_close(
                plan.merge(a * x1 + x2), a * plan.merge(x1) + plan.merge(x2), self.tolerance, "merge"
            )
            if not merger.kv_only:
                shape = _shape3(plan.merge(x))
                y1, y2 = make_tokens(shape, seed=case.seed + 3), make_tokens(shape, seed=case.seed + 4)
                _assert_close(
                    plan.unmerge(a * y1 + y2),
                    a * plan.unmerge(y1) + plan.unmerge(y2),
                    self.tolerance,
                    "unmerge",
                )

        check()

    def test_merged_tokens_are_convex_combinations(self, component: Merger) -> None:
        positions = self._sites_where(
            component, lambda m: getattr(m, "convex", True), "declares convex = False"
        )

        @given(case=scenarios(grid=grids(max_side=8)), position=st.sampled_from(positions))
        @_with_examples("case", EDGE_SCENARIOS[:4], position=positions[0])
        def check(case: Scenario, position: float) -> None:
            _, _, plan, x = self._plan(component, case, position)
            weights = probe_matrix(plan.merge, _shape3(x), x.dtype)  # (B, N', N)
            assert bool((weights >= -self.tolerance).all()), "negative merge weight"
            _assert_close(
                weights.sum(dim=-1), torch.ones_like(weights[..., 0]), self.tolerance, "merge weight sums"
            )

        check()

    def test_invertible_on_merge_groups(self, component: Merger) -> None:
        """For ``hard`` (or soft, ``hard = False``) destination mergers and ``x`` constant on merge groups."""
        positions = self._sites_where(
            component,
            lambda m: getattr(m, "hard", None) is not None and m.output == "destinations" and not m.kv_only,
            "no site merges into destinations with a declared `hard`",
        )

        @given(case=scenarios(), position=st.sampled_from(positions))
        @_with_examples("case", EDGE_SCENARIOS, position=positions[0])
        def check(case: Scenario, position: float) -> None:
            self._check_invertible(component.for_site(position), case)

        check()

    def _check_invertible(self, merger: Merger, case: Scenario) -> None:
        ratio = merging_ratio(case.regions(), case.ratio)
        if ratio == 0.0:
            return  # nothing can merge on this grid: the runtime uses its identity plan
        selector = self.companion_selector()
        layout = layout_or_reject(
            lambda: make_layout(case.partitioner, selector, case.grid, ratio, merger=merger)
        )
        features0 = Runtime.features(case.tokens(), layout)
        destinations = selector.select(features0, SelectContext(layout=layout, generator=seeded(case.seed)))
        groups = merge_groups(layout, destinations, seed=case.seed)
        x = grouped_tokens(groups, batch_size=case.batch_size, seed=case.seed)
        # What the engine passes: no features for mergers that read none, no destinations unless needed.
        reads_features = merger.needs_destinations or getattr(merger, "needs_features", True)
        features = Runtime.features(x, layout) if reads_features else None
        # Merger.plan names the tensors of the common case; a merger that declares it reads no
        # features / destinations gets None, as from the engine (no runtime check can tell).
        plan = merger.plan(
            x,
            cast(torch.Tensor, features),
            cast(torch.Tensor, destinations if merger.needs_destinations else None),
            layout,
        )
        tol = self.tolerance if merger.hard else self.soft_tolerance  # type: ignore[attr-defined]
        merged = plan.merge(x)
        _assert_close(plan.unmerge(merged), x, tol, "unmerge(merge(x)) for x constant on merge groups")
        if plan.positions is not None:
            # Each merged token is the value of its group, which its position's token carries.
            _assert_close(merged, x[:, plan.positions], tol, "merged tokens vs their positions")
        y = make_tokens(_shape3(merged), seed=case.seed + 1)
        _assert_close(plan.merge(plan.unmerge(y)), y, tol, "merge(unmerge(y))")


# --------------------------------------------------------------------------- reuse policy


class ReusePolicyContract(ComponentContract):
    """Decisions are ``Decision`` values, step 0 selects, deterministic; the engine follows the schedule."""

    interface = ReusePolicy

    def test_sharing_mode(self, component: ReusePolicy) -> None:
        assert component.sharing in ("kind", "block")
        assert isinstance(component.needs_step, bool)

    @given(step=st.integers(min_value=0, max_value=500))
    @example(step=0)
    def test_decisions_are_deterministic(self, component: ReusePolicy, step: int) -> None:
        decision = component.decide(step)
        assert isinstance(decision, Decision)
        assert component.decide(step) is decision
        assert type(component)(component.params).decide(step) is decision
        if not component.needs_step:
            assert decision is Decision.SELECT, "a policy without steps must select on every call"

    def test_step_zero_selects(self, component: ReusePolicy) -> None:
        assert component.decide(0) is Decision.SELECT

    @given(
        steps=st.integers(min_value=1, max_value=12),
        passes=st.integers(min_value=1, max_value=2),
        scheduler=st.booleans(),
    )
    @example(steps=12, passes=2, scheduler=False)
    def test_runtime_follows_the_schedule(
        self, component: ReusePolicy, steps: int, passes: int, scheduler: bool
    ) -> None:
        """Two generations of ``steps`` denoising steps with ``passes`` guidance passes each.

        ``scheduler``: the clock is driven like the pipeline hooks do (``reset`` per generation,
        ``end_step`` per step); otherwise it reads the timesteps: equal means another guidance
        pass, larger means a new generation (so the second one starts one higher).
        """
        grid = (4, 4)
        runtime = make_runtime(
            partitioner=GlobalPartitioner(),
            selector=RandomSelector(),
            merger=HardMeanMerger(),
            reuse=component,
            ratio=0.5,
        )
        group = runtime.group("contract", "block")
        clock = runtime.clock
        if scheduler:
            clock.driver = "manual"
        inputs = [make_tokens((1, 16, 4), seed=p) for p in range(passes)]
        last: dict[int, tuple[MergePlan, torch.Tensor | None]] = {}
        for generation in range(2):
            if scheduler:
                clock.reset()
            for step in range(steps):
                expected = component.decide(step) if component.needs_step else Decision.SELECT
                for p in range(passes):
                    clock.begin_call(1000.0 + generation - 10.0 * step)
                    plan = runtime.plan(group, inputs[p], grid)
                    slot = clock.pass_index
                    if component.needs_step:
                        assert slot == p, "guidance passes of one step must keep separate plans"
                    destinations = group.slots[slot].destinations
                    previous = last.get(slot)
                    if previous is None or step == 0 or expected is Decision.SELECT:
                        assert previous is None or (
                            plan is not previous[0] and destinations is not previous[1]
                        )
                    elif expected is Decision.WEIGHTS:
                        assert plan is not previous[0] and destinations is previous[1]
                    else:
                        assert plan is previous[0]
                    last[slot] = (plan, destinations)
                if scheduler:
                    clock.end_step()
