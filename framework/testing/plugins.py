"""Write throwaway plugin distributions for tests: a module plus a ``*.dist-info`` folder.

Put the folder on ``sys.path`` (``monkeypatch.syspath_prepend(tmp_path)``; it also clears the
import caches) and rediscover (``tokenreduce.reset_manager()``): the plugin is then found through
its ``tokenreduce`` entry point exactly like an installed one, without installing anything.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path

from tokenreduce.hookspecs import PROJECT


@dataclass(frozen=True)
class PluginDistribution:
    """What :func:`make_plugin_distribution` wrote."""

    root: Path  # the folder to put on sys.path
    name: str  # distribution name, as reported in plugin listings
    version: str
    module: str  # import name of the plugin module
    entry_point: str  # entry-point name in the ``tokenreduce`` group


def make_plugin_distribution(
    root: Path, name: str, module_source: str, *, version: str = "1.0.0", entry_point: str | None = None
) -> PluginDistribution:
    """Write module ``<name with _>.py`` and its ``dist-info`` (METADATA, entry_points.txt) under ``root``.

    ``module_source`` is dedented; it should define ``tokenreduce_register`` with ``@hookimpl``.
    """
    module = name.replace("-", "_")
    entry = entry_point or module
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(textwrap.dedent(module_source), encoding="utf-8")
    info = root / f"{module}-{version}.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8"
    )
    (info / "entry_points.txt").write_text(f"[{PROJECT}]\n{entry} = {module}\n", encoding="utf-8")
    (info / "top_level.txt").write_text(f"{module}\n", encoding="utf-8")
    return PluginDistribution(root=root, name=name, version=version, module=module, entry_point=entry)
