"""pluggy hook specifications. Used at set-up time only, never on the per-block hot path."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from tokenreduce.registry import Registry

PROJECT = "tokenreduce"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(historic=True)
def tokenreduce_register(registry: Registry) -> None:
    """Register components and presets.

    Implement it in a module named by an entry point of the ``tokenreduce`` group::

        from tokenreduce import hookimpl

        @hookimpl
        def tokenreduce_register(registry):
            registry.add(MySelector)
            registry.add_preset("my-preset", "my_pkg.presets", "my-preset.yaml")

    The hook is historic: a plugin registered after start-up is called at once.
    """
