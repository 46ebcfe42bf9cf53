"""The typed registry, plugin discovery through entry points, and the hook specifications."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
import torch
from pydantic import BaseModel

import tokenreduce
from tokenreduce import hookimpl, hookspecs
from tokenreduce.config import ConfigError, load_config, resolve
from tokenreduce.interfaces import SelectContext, Selector
from tokenreduce.manager import BUILTIN_SOURCE, DISABLE_AUTOLOAD_ENV
from tokenreduce.params import StrictParams
from tokenreduce.registry import Registry, RegistryError, UnknownComponentError
from tokenreduce.testing.plugins import PluginDistribution, make_plugin_distribution

#: every component named explicitly, from the built-ins, so no other plugin is needed
BUILTIN_CONFIG = {
    "ratio": 0.5,
    "selector": {"name": "random"},
    "merger": {"name": "hard_mean"},
    "partitioner": {"name": "global"},
    "reuse": {"name": "always"},
}

THIRD_PARTY_SOURCE = '''
from typing import Literal

from tokenreduce import Selector, StrictParams, hookimpl


class ThirdPartySelector(Selector):
    """The first valid slots of every region."""

    name = "thirdparty_select"

    class Params(StrictParams):
        name: Literal["thirdparty_select"] = "thirdparty_select"

    def select(self, features, ctx):
        valid = ctx.layout.regions.valid.to(features.device)
        return valid.float().topk(ctx.layout.k, dim=1).indices


@hookimpl
def tokenreduce_register(registry):
    registry.add(ThirdPartySelector)
'''


@pytest.fixture(autouse=True)
def _fresh_manager() -> Iterator[None]:
    """Tests rediscover plugins; leave a clean global manager behind (after env/sys.path are restored)."""
    yield
    tokenreduce.reset_manager()


@pytest.fixture
def install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """Write a plugin distribution into ``tmp_path`` and put it on ``sys.path`` (no pip install)."""
    written: list[PluginDistribution] = []

    def _install(name: str, source: str, **kwargs: str) -> PluginDistribution:
        dist = make_plugin_distribution(tmp_path, name, source, **kwargs)
        monkeypatch.syspath_prepend(str(tmp_path))  # also invalidates the import and metadata caches
        written.append(dist)
        return dist

    yield _install
    for dist in written:
        sys.modules.pop(dist.module, None)


# --------------------------------------------------------------------------- components for the tests


def _selector(name: str, params: type) -> type[Selector]:
    def select(self, features: torch.Tensor, ctx: SelectContext) -> torch.Tensor:
        return torch.zeros(ctx.layout.regions.num_regions, ctx.layout.k, dtype=torch.long)

    return type(f"Sel_{name}", (Selector,), {"name": name, "Params": params, "select": select})


class GoodParams(StrictParams):
    name: Literal["good"] = "good"


class PlainStringName(StrictParams):
    name: str = "plain"


class OtherName(StrictParams):
    name: Literal["other"] = "other"


class NoName(StrictParams):
    value: int = 1


class NotStrict(BaseModel):
    name: Literal["loose"] = "loose"


class _Plugin:
    """A plugin object (no entry point) registering the given classes."""

    def __init__(self, *classes: type) -> None:
        self.classes = classes

    @hookimpl
    def tokenreduce_register(self, registry: Registry) -> None:
        for cls in self.classes:
            registry.add(cls)


# --------------------------------------------------------------------------- registry validation


def test_a_valid_component_is_registered_with_its_source() -> None:
    registry = Registry()
    registry._source = "my-dist 0.3"
    cls = _selector("good", GoodParams)
    assert registry.add(cls) is cls
    assert registry.get("selector", "good") is cls
    assert registry.components["selector"]["good"].source == "my-dist 0.3"


def test_duplicate_names_are_rejected_naming_both_sources() -> None:
    manager = tokenreduce.reset_manager(autoload=False)
    manager.register(_Plugin(_selector("good", GoodParams)), source="first-dist 1.0", name="first")
    with pytest.raises(RegistryError) as info:
        manager.register(_Plugin(_selector("good", GoodParams)), source="second-dist 2.0", name="second")
    message = str(info.value)
    assert "'good'" in message and "first-dist 1.0" in message and "second-dist 2.0" in message


def test_a_plugin_cannot_take_a_builtin_name() -> None:
    manager = tokenreduce.reset_manager(autoload=False)

    class RandomParams(StrictParams):
        name: Literal["random"] = "random"

    with pytest.raises(RegistryError, match=f"intruder 0.1.*{BUILTIN_SOURCE}"):
        manager.register(_Plugin(_selector("random", RandomParams)), source="intruder 0.1", name="intruder")


@pytest.mark.parametrize(
    ("cls", "message"),
    [
        (_selector("plain", PlainStringName), r"needs a field `name: Literal\['plain'\]`"),
        (_selector("nameless", NoName), r"needs a field `name: Literal\['nameless'\]`"),
        (_selector("mine", OtherName), r"\('other',\), expected Literal\['mine'\]"),
        (_selector("loose", NotStrict), "must subclass tokenreduce.StrictParams"),
        (_selector("", GoodParams), "has no string `name`"),
    ],
    ids=["str-name", "no-name-field", "mismatched-literal", "not-strict", "empty-name"],
)
def test_malformed_params_are_rejected(cls: type, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        Registry().add(cls)


@pytest.mark.parametrize(
    "obj",
    [int, object, BaseModel, GoodParams, "a string", type("Loose", (), {"name": "x", "Params": GoodParams})],
)
def test_non_components_are_rejected(obj: object) -> None:
    with pytest.raises(
        RegistryError,
        match="is not a Selector, Merger, Partitioner, ReusePolicy, MergeSchedule or ModelAdapter",
    ):
        Registry().add(obj)  # type: ignore[arg-type]


def test_unknown_names_list_the_valid_ones() -> None:
    registry = tokenreduce.reset_manager(autoload=False).registry
    with pytest.raises(UnknownComponentError) as info:
        registry.get("selector", "no_such_selector")
    message = str(info.value)
    assert "'no_such_selector'" in message
    for name in registry.names("selector"):
        assert name in message


def test_builtins_are_registered_through_the_hook() -> None:
    registry = tokenreduce.reset_manager(autoload=False).registry
    expected = {
        "partitioner": {"global", "stripe"},
        "selector": {"random", "grid"},
        "merger": {"identity", "ideal", "hard_mean"},
        "reuse": {"always", "never", "every_k"},
    }
    for kind, names in expected.items():
        assert names <= set(registry.names(kind))
        assert all(registry.components[kind][n].source == BUILTIN_SOURCE for n in names)


def test_explicit_registration_without_an_entry_point() -> None:
    tokenreduce.reset_manager(autoload=False)
    cls = _selector("good", GoodParams)
    tokenreduce.register_plugin(_Plugin(cls), source="notebook")
    entry = tokenreduce.get_registry().components["selector"]["good"]
    assert entry.cls is cls and entry.source == "notebook"
    config = load_config({**BUILTIN_CONFIG, "selector": {"name": "good"}})
    assert isinstance(resolve(config).selector, cls)


# --------------------------------------------------------------------------- entry points


def test_a_third_party_plugin_is_discovered_and_usable(install, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    dist = install("tokenreduce-thirdparty", THIRD_PARTY_SOURCE, version="1.2.3")
    manager = tokenreduce.reset_manager()
    registry = manager.registry
    assert "thirdparty_select" in registry.names("selector")
    assert registry.components["selector"]["thirdparty_select"].source == "tokenreduce-thirdparty 1.2.3"
    assert manager.sources[dist.module] == "tokenreduce-thirdparty 1.2.3"
    config = tokenreduce.load_config({**BUILTIN_CONFIG, "selector": {"name": "thirdparty_select"}})
    selector = resolve(config).selector
    assert type(selector).__module__ == dist.module and selector.name == "thirdparty_select"
    assert "thirdparty_select" in str(tokenreduce.json_schema())


@pytest.mark.parametrize("value", ["1", "yes"])
def test_disabling_autoload_skips_third_party_plugins(
    install, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    install("tokenreduce-thirdparty", THIRD_PARTY_SOURCE)
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
    registry = tokenreduce.reset_manager().registry
    assert "thirdparty_select" not in registry.names("selector")
    assert {"random", "grid"} <= set(registry.names("selector"))  # built-ins stay
    with pytest.raises(ConfigError, match="unknown selector 'thirdparty_select'; valid selectors: .*random"):
        tokenreduce.load_config({**BUILTIN_CONFIG, "selector": {"name": "thirdparty_select"}})


def test_autoload_value_zero_means_enabled(install, monkeypatch: pytest.MonkeyPatch) -> None:
    install("tokenreduce-thirdparty", THIRD_PARTY_SOURCE)
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "0")
    assert "thirdparty_select" in tokenreduce.reset_manager().registry.names("selector")


def test_a_plugin_that_fails_to_import_is_reported(install, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    install("tokenreduce-broken", "raise ImportError('needs the frobnicate package')\n", entry_point="broken")
    registry = tokenreduce.reset_manager().registry
    assert any(
        "broken" in key and "needs the frobnicate package" in error for key, error in registry.failed.items()
    )
    with pytest.raises(ConfigError, match="failed to load.*needs the frobnicate package"):
        tokenreduce.load_config({**BUILTIN_CONFIG, "selector": {"name": "broken_select"}})


# --------------------------------------------------------------------------- hook specifications


def _hookspecs() -> list:
    return [
        fn
        for _, fn in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(fn, f"{hookspecs.PROJECT}_spec")
    ]


def test_every_hookspec_is_documented() -> None:
    specs = _hookspecs()
    assert specs, "no hook specifications found"
    for spec in specs:
        doc = inspect.getdoc(spec) or ""
        assert len(doc.split()) >= 5, f"hookspec {spec.__name__} needs a docstring"
        for parameter in inspect.signature(spec).parameters:
            assert parameter in doc, f"hookspec {spec.__name__} does not document `{parameter}`"
