"""The built wheel: one top-level import name, and nothing a user's own folders can shadow.

The wheel is built from a copy of the source (no build isolation, so no download), installed
with ``pip --target`` into a folder put first on ``PYTHONPATH``, and imported by a script that
sits next to folders named like the repository's (``plugins/``, ``framework/``, ``baselines/``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest

import tokenreduce
from tokenreduce.manager import PluginManager

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("pyproject.toml", "README.md", "framework", "plugins", "toma_plugin", "baselines")

SCRIPT = """
import json, sys
import plugins, framework, baselines   # the user's own folders, beside this script
import tokenreduce
from tokenreduce.manager import get_registry

registry = get_registry()
for name in registry.presets:
    registry.presets[name].read_text()  # presets are readable from the installed wheel
print(json.dumps({
    "file": tokenreduce.__file__,
    "user": [plugins.MARK, framework.MARK, baselines.MARK],
    "components": {kind: registry.names(kind) for kind in registry.components},
    "presets": sorted(registry.presets),
    "failed": registry.failed,
}))
"""


def _setuptools_builds_wheels() -> bool:
    major, minor = (int(p) for p in version("setuptools").split(".")[:2])
    return (major, minor) >= (77, 0)  # bdist_wheel built in (70.1), SPDX `license` strings read (77)


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, str]:
    """The built wheel and what the build printed."""
    if not _setuptools_builds_wheels():
        pytest.skip("building the wheel offline needs setuptools>=77 (installed by the `test` extra)")
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(path, src / name)
    out = root / "dist"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
        + ["-w", str(out), str(src)],
        check=True,
        capture_output=True,
        text=True,
    )
    (built,) = out.glob("tokenreduce-*.whl")
    return built, done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(build: tuple[Path, str]) -> Path:
    return build[0]


def test_building_the_wheel_warns_of_nothing(build: tuple[Path, str]) -> None:
    """A deprecated setting or a data folder missing from ``packages`` warns at every install."""
    assert "Warning" not in build[1], build[1]


def test_wheel_holds_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        top = {name.split("/")[0] for name in archive.namelist()}
    assert top == {"tokenreduce", f"tokenreduce-{tokenreduce.__version__}.dist-info"}


def test_installed_wheel_ignores_user_folders_named_like_the_repository(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--target", str(target)]
        + [str(wheel)],
        check=True,
        capture_output=True,
    )
    installed = {p.name for p in target.iterdir()} - {"bin"}  # bin: the console script
    assert installed == {"tokenreduce", f"tokenreduce-{tokenreduce.__version__}.dist-info"}

    project = tmp_path / "project"
    for name in ("plugins", "framework", "baselines"):
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"MARK = {name!r}\n")
    (project / "script.py").write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=str(target), TOKENREDUCE_DISABLE_PLUGIN_AUTOLOAD="1")
    done = subprocess.run(
        [sys.executable, "script.py"], cwd=project, env=env, check=True, capture_output=True, text=True
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])

    assert Path(found["file"]).resolve().is_relative_to(target.resolve())
    assert found["user"] == ["plugins", "framework", "baselines"]
    assert found["failed"] == {}
    registry = PluginManager(autoload=False).registry  # the source tree's, without touching the global one
    assert found["components"] == {kind: registry.names(kind) for kind in registry.components}
    assert found["presets"] == sorted(registry.presets)
