"""Plugin discovery: built-ins, then ``tokenreduce`` entry points, then explicit registration."""

from __future__ import annotations

import importlib
import os
from importlib import metadata
from types import ModuleType

import pluggy

from tokenreduce import hookspecs
from tokenreduce.registry import Registry

#: Set to any non-empty value (not "0") to skip loading third-party entry points.
DISABLE_AUTOLOAD_ENV = "TOKENREDUCE_DISABLE_PLUGIN_AUTOLOAD"

#: First-party plugin modules, always registered (they are also published as entry points).
BUILTIN_MODULES = (
    "tokenreduce.builtins",
    "tokenreduce.toma_plugin",
    "tokenreduce.plugins.sdxl",
    "tokenreduce.plugins.flux",
    "tokenreduce.plugins.wan",
    "tokenreduce.plugins.generation",
    "tokenreduce.plugins.flux2",
    "tokenreduce.plugins.sd3",
    "tokenreduce.plugins.qwenimage",
    "tokenreduce.baselines.tomesd",
    "tokenreduce.baselines.todo",
    "tokenreduce.baselines.tofu",
)
BUILTIN_SOURCE = "tokenreduce"

_manager: PluginManager | None = None


class PluginManager:
    """Owns the pluggy manager and the registry it fills."""

    def __init__(self, autoload: bool | None = None) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.registry = Registry()
        self.sources: dict[str, str] = {}  # plugin name -> distribution
        # Historic call: every plugin registered from now on is called with the registry at once.
        self.pm.hook.tokenreduce_register.call_historic(kwargs={"registry": self.registry})
        if autoload is None:
            autoload = os.environ.get(DISABLE_AUTOLOAD_ENV, "") in ("", "0")
        self.autoload = autoload
        for module_name in BUILTIN_MODULES:
            try:
                module = importlib.import_module(module_name)
            except Exception as exc:  # a broken install: say so wherever a name is not found
                self.registry.failed[f"{module_name} ({BUILTIN_SOURCE})"] = f"{type(exc).__name__}: {exc}"
                continue
            self.register(module, source=BUILTIN_SOURCE, name=module_name)
        if autoload:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        for ep in metadata.entry_points(group=hookspecs.PROJECT):
            if ep.value in BUILTIN_MODULES or self.pm.has_plugin(ep.value):
                continue
            dist = ep.dist.name if ep.dist is not None else "unknown"
            try:
                plugin = ep.load()
            except Exception as exc:  # keep going; report it when a config names a missing part
                self.registry.failed[f"{ep.name} ({dist})"] = f"{type(exc).__name__}: {exc}"
                continue
            self.register(
                plugin, source=f"{dist} {ep.dist.version if ep.dist else ''}".strip(), name=ep.value
            )

    def register(self, plugin: object, *, source: str | None = None, name: str | None = None) -> None:
        """Register a plugin object (a module or any object with ``tokenreduce_register``)."""
        if name is None:
            name = (
                plugin.__name__ if isinstance(plugin, ModuleType) else f"{type(plugin).__name__}-{id(plugin)}"
            )
        if self.pm.has_plugin(name):
            return
        source = source or name
        self.sources[name] = source
        self.registry._source = source
        try:
            self.pm.register(plugin, name=name)
        finally:
            self.registry._source = "unknown"


def get_manager() -> PluginManager:
    """The process-wide plugin manager (created on first use)."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def get_registry() -> Registry:
    return get_manager().registry


def reset_manager(autoload: bool | None = None) -> PluginManager:
    """Discard the manager and discover plugins again (tests, or after installing a plugin)."""
    global _manager
    _manager = PluginManager(autoload=autoload)
    return _manager


def register_plugin(plugin: object, *, source: str | None = None, name: str | None = None) -> None:
    """Register a plugin object at run time, without an entry point."""
    get_manager().register(plugin, source=source, name=name)
