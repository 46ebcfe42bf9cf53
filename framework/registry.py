"""The typed component registry that plugins fill through the ``tokenreduce_register`` hook."""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Literal, overload

from tokenreduce.interfaces import (
    Component,
    Merger,
    MergeSchedule,
    ModelAdapter,
    Partitioner,
    ReusePolicy,
    Selector,
)
from tokenreduce.params import StrictParams

if TYPE_CHECKING:
    from tokenreduce.archs import Architecture

KINDS: dict[str, type[Component]] = {
    "selector": Selector,
    "merger": Merger,
    "partitioner": Partitioner,
    "reuse": ReusePolicy,
    "schedule": MergeSchedule,
    "adapter": ModelAdapter,
}


class RegistryError(ValueError):
    """A plugin registered something malformed or a name that is taken."""


class UnknownComponentError(KeyError):
    """A config named a component that is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


@dataclass(frozen=True)
class Entry:
    cls: type[Component]
    source: str  # distribution (or "tokenreduce (built-in)", or the registering module)


@dataclass(frozen=True)
class Preset:
    name: str
    package: str
    resource: str
    source: str
    description: str = ""

    def read_text(self) -> str:
        return resources.files(self.package).joinpath(self.resource).read_text(encoding="utf-8")


@dataclass
class Registry:
    """Components by kind and name, plus named presets. Duplicate names are rejected."""

    components: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    presets: dict[str, Preset] = field(default_factory=dict)
    architectures: dict[str, Architecture] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # entry point -> error
    _source: str = "unknown"

    def add(self, cls: type[Component]) -> type[Component]:
        """Register a component class (usable as a decorator)."""
        kind = _kind_of(cls)
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise RegistryError(f"{cls.__qualname__} has no string `name`")
        _check_params(cls, name)
        table = self.components[kind]
        if name in table:
            raise RegistryError(
                f"{kind} {name!r} from {self._source} is already registered by {table[name].source}"
            )
        table[name] = Entry(cls, self._source)
        return cls

    def add_preset(self, name: str, package: str, resource: str, description: str = "") -> None:
        """Register a config file shipped inside ``package`` under a preset name."""
        if name in self.presets:
            raise RegistryError(f"preset {name!r} is already registered by {self.presets[name].source}")
        self.presets[name] = Preset(name, package, resource, self._source, description)

    def add_architecture(self, arch: Architecture) -> None:
        """Register a published denoiser configuration (for ``bench`` and ``explain``)."""
        if arch.name in self.architectures:
            raise RegistryError(f"architecture {arch.name!r} is already registered")
        self.architectures[arch.name] = arch

    @overload
    def get(self, kind: Literal["partitioner"], name: str) -> type[Partitioner]: ...
    @overload
    def get(self, kind: Literal["selector"], name: str) -> type[Selector]: ...
    @overload
    def get(self, kind: Literal["merger"], name: str) -> type[Merger]: ...
    @overload
    def get(self, kind: Literal["reuse"], name: str) -> type[ReusePolicy]: ...
    @overload
    def get(self, kind: Literal["schedule"], name: str) -> type[MergeSchedule]: ...
    @overload
    def get(self, kind: Literal["adapter"], name: str) -> type[ModelAdapter]: ...
    @overload
    def get(self, kind: str, name: str) -> type[Component]: ...
    def get(self, kind: str, name: str) -> type[Component]:
        table = self.components[kind]
        if name not in table:
            valid = ", ".join(sorted(table)) or "(none)"
            hint = ""
            if self.failed:
                hint = "; plugins that failed to load: " + "; ".join(
                    f"{k}: {v}" for k, v in self.failed.items()
                )
            close = difflib.get_close_matches(str(name), list(table), n=1)
            guess = f" (did you mean {close[0]!r}?)" if close else ""
            raise UnknownComponentError(f"unknown {kind} {name!r}{guess}; valid {kind}s: {valid}{hint}")
        return table[name].cls

    def adapter_of(self, config: object) -> type[ModelAdapter] | None:
        """The adapter class a config names (``None`` for ``auto`` or an unknown name)."""
        name = getattr(getattr(config, "adapter", None), "name", None)
        entry = self.components["adapter"].get(name) if isinstance(name, str) else None
        return None if entry is None else entry.cls  # type: ignore[return-value]

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def entries(self) -> list[tuple[str, str, Entry]]:
        return [
            (kind, name, e) for kind, table in self.components.items() for name, e in sorted(table.items())
        ]


def _kind_of(cls: type) -> str:
    for kind, base in KINDS.items():
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    raise RegistryError(
        f"{cls!r} is not a Selector, Merger, Partitioner, ReusePolicy, MergeSchedule or ModelAdapter"
    )


def _check_params(cls: type[Component], name: str) -> None:
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, StrictParams)):
        raise RegistryError(f"{cls.__qualname__}.Params must subclass tokenreduce.StrictParams")
    field_info = params.model_fields.get("name")
    if field_info is None or typing.get_origin(field_info.annotation) is not typing.Literal:
        raise RegistryError(f"{cls.__qualname__}.Params needs a field `name: Literal[{name!r}]`")
    if typing.get_args(field_info.annotation) != (name,):
        raise RegistryError(
            f"{cls.__qualname__}.Params.name is {typing.get_args(field_info.annotation)}, expected Literal[{name!r}]"
        )
