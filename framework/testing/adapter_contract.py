"""The adapter contract: the properties every model adapter must have, as a pytest mixin.

Subclass :class:`AdapterContract` in a test module and describe a tiny model of the adapter's
family with an :class:`AdapterCase`::

    from tokenreduce.testing.adapter_contract import AdapterCase, AdapterContract

    class TestMyAdapter(AdapterContract):
        case = AdapterCase(
            adapter="mine",                        # the registered adapter name
            model=tiny_mine,                       # () -> a fresh tiny model (eval mode, CPU, float32)
            inputs=tiny_mine_inputs,               # (model, batch=B) -> keyword arguments of one call
        )

or override the ``case`` fixture (it may be parametrised, e.g. over every registered adapter).

Checks (one test method each; the model runs at the case's preset, by default the adapter's
``default_preset``, with ``overrides`` applied and the merge schedule replaced by ``always`` so
that every call merges):

- ``test_the_adapter_serves_the_model``: the adapter matches the model and no other registered
  adapter does, validation (``tokenreduce.api.prepare``) leaves the model untouched, and
  ``apply`` picks the adapter and installs at least one site;
- ``test_ratio_zero_is_bit_exact``: at ratio 0, batches of 1, 2 and 3 give bit-identical outputs
  to the unmodified model (the preset's components must accept ratio 0: choose a preset whose
  ratio is not fixed by its components);
- ``test_remove_restores_the_model``: after merging and ``handle.remove()`` every module is the
  same object with the same attributes (forwards included) as before, and outputs are
  bit-identical again;
- ``test_merged_outputs_are_finite``: at the preset's ratio a classifier-free-guidance batch (2)
  and an odd batch (3) give outputs of the right shape, finite, and different from the
  unmodified model's (merging happened);
- ``test_samples_match_their_runs_alone``: with destinations that do not depend on the data (the
  built-in ``random`` selector, re-seeded for each call), each sample of a batch of 2 and of 3
  gives what it gives alone, within ``tolerance``: the adapter keeps samples apart. (A preset's
  own selector chooses destinations shared by the whole batch, so there a sample's result may
  depend on the others by design; and a greedy selector can flip a near-tie on the rounding
  differences between batched and single calls.) The preset's merger must plan each sample from
  its own tokens (ToMA's attention merge does); set ``independent_samples=False`` for one that
  couples them;
- ``test_compiled_matches_eager`` (``slow``): ``torch.compile(fullgraph=True)`` of the patched
  model (the case's ``compiled`` case when it has one: fewer blocks compile faster) runs in one
  graph over two timesteps and matches eager within ``tolerance``;
- ``test_no_host_sync_on_meta``: after one eager call (which reads what an adapter may read once,
  e.g. a token grid from position ids), the patched model runs on the ``meta`` device, where any
  ``.item()``, ``.tolist()``, ``bool(tensor)`` or copy to the host raises. The step clock is
  driven manually there, as pipelines and CUDA graphs drive it: the bare-denoiser clock reads the
  timestep by design (see :mod:`tokenreduce.engine.clock`).

A batch is split into its samples along the leaves whose leading size is 1 in
``inputs(model, batch=1)`` and 2 in ``inputs(model, batch=2)`` (tensors, and lists such as
per-sample shapes), so input makers need nothing more than a ``batch`` argument.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

import tokenreduce
import tokenreduce.api
from tokenreduce.interfaces import ModelAdapter
from tokenreduce.manager import get_registry

__all__ = [
    "AdapterCase",
    "AdapterContract",
    "model_snapshot",
    "snapshot_differences",
    "output_of",
    "split_batch",
    "to_device",
]

#: batch sizes of the merged-output checks: a classifier-free-guidance batch and an odd one
BATCHES = (2, 3)


def output_of(result: Any) -> torch.Tensor:
    """The denoiser's prediction: a tensor, the first element of a tuple, or a diffusers output's first field."""
    if isinstance(result, torch.Tensor):
        return result
    return result[0]


@dataclass(frozen=True)
class AdapterCase:
    """How to run an adapter on a tiny model of its family."""

    #: the registered adapter name
    adapter: str
    #: ``() -> nn.Module``: a fresh tiny model (eval mode, CPU, float32, seeded weights)
    model: Callable[[], nn.Module]
    #: ``(model, batch=B) -> dict``: keyword arguments of one call (the same values for the same ``B``)
    inputs: Callable[..., Mapping[str, Any]]
    #: the preset to apply (``None``: the adapter's ``default_preset``)
    preset: str | None = None
    #: keyword overrides for ``apply`` (e.g. ``{"adapter": {"name": "mine", "skip": 0}}``)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    #: the call's prediction from the model's return value
    output: Callable[[Any], torch.Tensor] = output_of
    #: the keyword that carries the timestep (varied by the compile check; ``None``: not varied)
    timestep: str | None = "timestep"
    #: whether the preset's merger plans each sample from its own tokens (``False`` for a merger
    #: that couples the samples, e.g. a batch-shared matching: the per-sample check is skipped)
    independent_samples: bool = True
    #: absolute and relative tolerance of the compile and per-sample comparisons
    tolerance: float = 1e-4
    #: the case the compile check runs (``None``: this one); compiling takes seconds per block on a
    #: CPU, so a model with one or two blocks of each kind (and overrides that merge in them) pays
    compiled: AdapterCase | None = None

    def adapter_class(self) -> type[ModelAdapter]:
        return get_registry().get("adapter", self.adapter)

    def preset_name(self) -> str:
        preset = self.preset or self.adapter_class().default_preset
        if preset is None:
            raise ValueError(f"adapter {self.adapter!r} has no default_preset: set the case's `preset`")
        return preset

    def overrides_for(self, **extra: Any) -> dict[str, Any]:
        """``apply`` overrides: every call merges, then the case's overrides, then ``extra``."""
        return {"schedule": {"name": "always"}, **self.overrides, **extra}

    def apply(self, model: nn.Module, **extra: Any) -> Any:
        """``tokenreduce.apply`` with the case's preset and overrides; every call merges."""
        return tokenreduce.apply(model, self.preset_name(), **self.overrides_for(**extra))

    def call(self, model: Callable[..., Any], inputs: Mapping[str, Any]) -> torch.Tensor:
        with torch.no_grad():
            return self.output(model(**inputs))


# --------------------------------------------------------------------------- helpers


def _batched(one: Any, two: Any) -> Any:
    """The structure of ``one`` with ``True`` at leaves whose leading size is 1 in ``one``, 2 in ``two``."""
    if isinstance(one, torch.Tensor):
        return (
            isinstance(two, torch.Tensor)
            and one.dim() > 0
            and one.shape[0] == 1
            and two.shape[0] == 2
            and one.shape[1:] == two.shape[1:]
        )
    if isinstance(one, Mapping):
        return {k: _batched(v, two[k]) for k, v in one.items()}
    if isinstance(one, list | tuple):
        return len(one) == 1 and len(two) == 2
    return False


def split_batch(
    case: AdapterCase, model: nn.Module, batch: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``(inputs of a batch, the inputs of each of its samples alone)``."""
    inputs = dict(case.inputs(model, batch=batch))
    batched = _batched(dict(case.inputs(model, batch=1)), dict(case.inputs(model, batch=2)))
    if not any(_leaves(batched)):
        raise ValueError(
            f"{case.adapter}: no input grows with the batch (inputs(model, batch=1) vs batch=2): "
            "cannot split a batch into its samples"
        )
    return inputs, [_take(inputs, batched, i) for i in range(batch)]


def _take(value: Any, batched: Any, i: int) -> Any:
    """Sample ``i`` of the batched leaves of ``value`` (the others unchanged)."""
    if isinstance(batched, dict):
        return {k: _take(value[k], batched[k], i) for k in value}
    if not batched:
        return value
    if isinstance(value, torch.Tensor):
        return value[i : i + 1]
    return type(value)([value[i]])


def _leaves(tree: Any) -> list[Any]:
    return [x for v in tree.values() for x in _leaves(v)] if isinstance(tree, dict) else [tree]


def to_device(value: Any, device: str | torch.device) -> Any:
    """``value`` with every tensor (in dicts, lists and tuples) moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_device(v, device) for v in value)
    return value


_TENSOR_SLOTS = ("_parameters", "_buffers", "_modules")


@dataclass(frozen=True)
class _Seen:
    """An attribute value and a shallow copy of its entries (a dict's items, a plain object's attributes)."""

    value: Any
    entries: dict[str, Any]


def _shallow(value: Any) -> Any:
    """``value``, or for a dict or a plain object (e.g. an attention processor) a :class:`_Seen`."""
    if isinstance(value, dict):
        return _Seen(value, {str(k): v for k, v in value.items()})
    skip = (nn.Module, torch.Tensor, type, types.FunctionType, types.MethodType, types.BuiltinFunctionType)
    attrs = None if isinstance(value, skip) else getattr(value, "__dict__", None)
    return _Seen(value, dict(attrs)) if isinstance(attrs, dict) else value


def model_snapshot(model: nn.Module) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """Every module by path, with its instance attributes (forwards included), parameters, buffers
    and, one level down, the entries of dict attributes and the attributes of plain objects.

    Compared by :func:`snapshot_differences`: objects by identity, plain values (numbers, strings,
    tuples of them) by equality.
    """
    snap = {}
    for name, module in model.named_modules():
        attrs = {k: _shallow(v) for k, v in module.__dict__.items() if k not in _TENSOR_SLOTS}
        attrs |= {f"{slot}:{k}": v for slot in _TENSOR_SLOTS for k, v in module.__dict__[slot].items()}
        snap[name] = (module, attrs)
    return snap


def snapshot_differences(
    before: dict[str, tuple[nn.Module, dict[str, Any]]], after: dict[str, tuple[nn.Module, dict[str, Any]]]
) -> list[str]:
    """What changed between two :func:`model_snapshot` s of one model, one line each."""
    problems = []
    if list(before) != list(after):
        gone, new = set(before) - set(after), set(after) - set(before)
        problems.append(f"modules changed: missing {sorted(gone)}, added {sorted(new)}")
    for name in before.keys() & after.keys():
        (m0, a0), (m1, a1) = before[name], after[name]
        where = name or "<root>"
        if m0 is not m1:
            problems.append(f"{where}: a different module object")
        else:
            problems += _entry_differences(where, a0, a1)
    return sorted(problems)


def _entry_differences(where: str, a0: dict[str, Any], a1: dict[str, Any]) -> list[str]:
    problems = []
    for key in a0.keys() | a1.keys():
        if key not in a1:
            problems.append(f"{where}.{key}: removed")
            continue
        v1 = a1[key].value if isinstance(a1[key], _Seen) else a1[key]
        if key not in a0:
            problems.append(f"{where}.{key}: added ({type(v1).__name__})")
            continue
        v0 = a0[key].value if isinstance(a0[key], _Seen) else a0[key]
        if v0 is not v1 and not _same_value(v0, v1):
            problems.append(f"{where}.{key}: changed")
        elif isinstance(a0[key], _Seen) and isinstance(a1[key], _Seen):
            problems += _entry_differences(f"{where}.{key}", a0[key].entries, a1[key].entries)
    return problems


def _same_value(a: Any, b: Any) -> bool:
    """Equal plain values (numbers, strings, tuples of them); objects must be identical."""
    plain = (int, float, str, bytes, bool, type(None), tuple, frozenset)
    if isinstance(a, plain) and type(a) is type(b):
        try:
            return bool(a == b)
        except Exception:  # noqa: BLE001 - tuples of tensors: not a plain value
            return False
    return False


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- the contract


class AdapterContract:
    """The adapter contract (see the module docstring): set ``case`` or override the ``case`` fixture."""

    #: the adapter and tiny model under test
    case: ClassVar[AdapterCase | None] = None

    @pytest.fixture(name="case")
    def case_fixture(self) -> AdapterCase:
        if self.case is None:
            pytest.fail(f"{type(self).__name__}: set `case` or override the `case` fixture")
        return self.case

    def test_the_adapter_serves_the_model(self, case: AdapterCase) -> None:
        model = case.model()
        adapter = case.adapter_class()
        assert adapter.matches(model), f"{adapter.__name__}.matches() refuses the case's model"
        registry = get_registry()
        others = [
            name
            for name in registry.names("adapter")
            if name != case.adapter and registry.get("adapter", name).matches(model)
        ]
        assert not others, f"adapters {others} match the model too: apply(model) would pick by name order"
        before = model_snapshot(model)
        tokenreduce.api.prepare(model, case.preset_name(), **case.overrides_for())
        problems = snapshot_differences(before, model_snapshot(model))
        assert not problems, "validation (and sites()) must not modify the model:\n" + "\n".join(problems)
        handle = case.apply(model)
        try:
            assert handle.config.adapter.name == case.adapter
            assert handle.sites, f"{case.preset_name()} merges nowhere in the case's model"
        finally:
            handle.remove()

    @pytest.mark.parametrize("batch", [1, *BATCHES])
    def test_ratio_zero_is_bit_exact(self, case: AdapterCase, batch: int) -> None:
        model = case.model()
        inputs = case.inputs(model, batch=batch)
        want = case.call(model, inputs)
        with case.apply(model, ratio=0.0):
            got = case.call(model, inputs)
        assert torch.equal(got, want), "ratio 0 must reproduce the unmodified model bit for bit"

    def test_remove_restores_the_model(self, case: AdapterCase) -> None:
        model = case.model()
        inputs = case.inputs(model, batch=2)
        want = case.call(model, inputs)  # also lets the model build whatever it caches on a first call
        before = model_snapshot(model)
        handle = case.apply(model)
        merged = case.call(model, inputs)
        handle.remove()
        assert not torch.equal(merged, want), "merging changed nothing: the check below would prove nothing"
        problems = snapshot_differences(before, model_snapshot(model))
        assert not problems, "remove() left the model changed:\n" + "\n".join(problems)
        assert torch.equal(case.call(model, inputs), want), "remove() must restore outputs bit for bit"

    @pytest.mark.parametrize("batch", BATCHES)
    def test_merged_outputs_are_finite(self, case: AdapterCase, batch: int) -> None:
        model = case.model()
        inputs = case.inputs(model, batch=batch)
        want = case.call(model, inputs)
        with case.apply(model):
            got = case.call(model, inputs)
        assert got.shape == want.shape
        assert bool(torch.isfinite(got).all()), "merged outputs must be finite"
        assert not torch.equal(got, want), "merging changed nothing at the preset's ratio"

    @pytest.mark.parametrize("batch", BATCHES)
    def test_samples_match_their_runs_alone(self, case: AdapterCase, batch: int) -> None:
        """With destinations that do not depend on the data (the ``random`` selector, re-seeded for
        each call), every sample of a batch gives what it gives alone: the adapter keeps samples apart."""
        if not case.independent_samples:
            pytest.skip(f"{case.preset_name()}: its merger couples the samples of a batch")
        model = case.model()
        inputs, samples = split_batch(case, model, batch)
        with case.apply(model, selector={"name": "random"}) as handle:
            handle.reset()
            together = case.call(model, inputs)
            alone = []
            for sample in samples:
                handle.reset()  # restarts the selector's random stream
                alone.append(case.call(model, sample))
        assert together.shape[0] == batch
        for i, one in enumerate(alone):
            _assert_close(together[i : i + 1], one, case.tolerance, f"sample {i} of {batch} vs alone")

    @pytest.mark.slow
    @pytest.mark.filterwarnings("ignore:Torchinductor does not support code generation")
    def test_compiled_matches_eager(self, case: AdapterCase) -> None:
        import torch._dynamo

        case = case.compiled or case
        model = case.model()
        inputs = dict(case.inputs(model, batch=2))
        calls = [inputs]
        if case.timestep is not None:
            t = inputs[case.timestep]
            scale = case.adapter_class().timestep_scale
            calls = [{**inputs, case.timestep: torch.full_like(t, f * scale)} for f in (0.9, 0.4)]
        handle = case.apply(model)
        # Eager first: it builds this size's layout and reads what is read once (compiled calls
        # cannot). Every call starts afresh: a compiled bare denoiser cannot read the timestep, so
        # it recomputes its plans where an eager one may reuse them.
        eager = []
        for c in calls:
            handle.reset()
            eager.append(case.call(model, c))
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = torch.compile(model, fullgraph=True)
        try:
            for i, (c, want) in enumerate(zip(calls, eager, strict=True)):
                handle.reset()
                _assert_close(case.call(compiled, c), want, case.tolerance, f"compiled call {i}")
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            assert graphs == 1, f"{graphs} graphs for calls that differ only in the timestep value"
        finally:
            torch._dynamo.reset()

    def test_no_host_sync_on_meta(self, case: AdapterCase) -> None:
        model = case.model()
        inputs = case.inputs(model, batch=2)
        handle = case.apply(model)
        handle.runtime.clock.driver = "manual"
        want = case.call(model, inputs)
        nn.Module.to(model, "meta")  # nn.Module's: diffusers warns about casting on its own `to`
        got = case.call(model, to_device(inputs, "meta"))
        assert got.device.type == "meta" and got.shape == want.shape
