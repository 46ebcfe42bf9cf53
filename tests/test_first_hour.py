"""What a new user meets first: light registry commands, bench without matplotlib, fair
``generate --baseline`` timings, and core dependencies that are what the core imports."""

from __future__ import annotations

import ast
import functools
import io
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from rich.console import Console

import tokenreduce as tr
from tokenreduce import generate as generate_module
from tokenreduce.bench import report
from tokenreduce.bench.runner import BenchSettings, _write_and_show

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("framework", "plugins", "toma_plugin", "baselines")
#: Core dependencies imported only inside functions, and the core feature that needs them.
LAZY_CORE = {
    "safetensors": "`tokenreduce demo` loads the shipped proxy weights",
    "diffusers": "every adapter reads the diffusers model it patches (imported when a model is touched)",
}


# --------------------------------------------------------------------------- registry commands


def test_registry_commands_import_no_diffusers_model_module(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("merger: {name: attention, temprature: 0.1}\n")
    script = f"""
import contextlib, io, sys
from tokenreduce.cli import main
codes = []
with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
    for argv in (["plugins"], ["plugins", "--markdown"], ["schema"], ["validate", {str(bad)!r}]):
        codes.append(main(argv))
print(codes, sorted(m for m in sys.modules if m.startswith("diffusers.models")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[0, 0, 0, 2] []"


# --------------------------------------------------------------------------- bench without matplotlib


def test_bench_writes_its_results_without_matplotlib(tmp_path: Path, monkeypatch) -> None:
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # `import matplotlib...` raises ModuleNotFoundError
    out = io.StringIO()
    record = {"date": "today", "env": {}, "runs": [], "notes": []}
    _write_and_show(record, BenchSettings(output=tmp_path), Console(file=out, width=200))
    assert (tmp_path / "bench.json").is_file() and (tmp_path / "bench.md").is_file()
    assert not (tmp_path / "bench.png").exists()
    assert report.PLOT_SKIPPED in out.getvalue()


def test_bench_plot_failures_other_than_a_missing_matplotlib_still_raise(tmp_path: Path, monkeypatch) -> None:
    def broken(record: Any, path: Path) -> None:
        raise ModuleNotFoundError("No module named 'something_else'", name="something_else")

    monkeypatch.setattr(report, "plot", broken)
    with pytest.raises(ModuleNotFoundError, match="something_else"):
        report.write({"runs": [], "notes": []}, tmp_path)


# --------------------------------------------------------------------------- generate --baseline


class RecordingPipeline:
    """Forwards to a pipeline and logs each call: (tokenreduce active, steps)."""

    def __init__(self, pipe: Any, events: list) -> None:
        self.pipe, self.events = pipe, events

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pipe, name)

    def __call__(self, **kwargs: Any) -> Any:
        self.events.append(("call", tr.get_handle(self) is not None, kwargs["num_inference_steps"]))
        return self.pipe(**kwargs)


def test_generate_baseline_warms_up_both_variants_before_timing(tmp_path: Path, monkeypatch) -> None:
    from tokenreduce.testing.tiny_sdxl import tiny_sdxl_pipeline

    events: list = []
    pipe = RecordingPipeline(tiny_sdxl_pipeline(), events)
    monkeypatch.setattr(generate_module, "load_pipeline", lambda *args: pipe)
    clock = iter(range(1, 100))
    monkeypatch.setattr(generate_module, "perf_counter", lambda: events.append("clock") or next(clock))
    record = generate_module.generate(
        model="tiny",
        config={"adapter": {"name": "sdxl"}, "partitioner": {"name": "tile", "size": 4}},
        prompt="a cat",
        steps=3,
        seed=0,
        height=None,
        width=None,
        device="cpu",
        dtype=None,
        output=tmp_path,
        baseline=True,
        console=Console(file=io.StringIO()),
    )
    warm, timed = record["warmup_steps"], 3
    assert warm == 2
    assert events == [
        ("call", False, warm),
        "clock",
        ("call", False, timed),
        "clock",
        ("call", True, warm),
        "clock",
        ("call", True, timed),
        "clock",
    ]
    assert tr.get_handle(pipe) is None  # removed after the run
    assert record["speedup"] == 1.0  # from the timed calls only (one tick of the fake clock each)


# --------------------------------------------------------------------------- dependencies


def _dist(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imports(paths: list[Path]) -> dict[str, bool]:
    """Third-party top-level module -> whether some file imports it at module level."""
    first_party = {"tokenreduce", "framework", "plugins", "toma_plugin", "baselines", "tests"}
    found: dict[str, bool] = {}
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        lazy = {
            id(node)
            for scope in ast.walk(tree)
            # inside a function, or under `if TYPE_CHECKING:` (never imported at run time)
            if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef)
            or (isinstance(scope, ast.If) and "TYPE_CHECKING" in ast.unparse(scope.test))
            for node in ast.walk(scope)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in first_party or top == "__future__":
                    continue
                found[top] = found.get(top, False) or id(node) not in lazy
    return found


@functools.cache
def _distributions() -> dict[str, list[str]]:
    return packages_distributions()  # scans every installed distribution: once


def _dists_of(module: str) -> set[str]:
    return {_dist(d) for d in _distributions().get(module, [module])}


def test_core_dependencies_are_what_the_package_imports() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_dist(Requirement(r).name) for r in project["dependencies"]}
    extras = {k: {_dist(Requirement(r).name) for r in v} for k, v in project["optional-dependencies"].items()}
    files = [p for d in PACKAGE_DIRS for p in (ROOT / d).rglob("*.py")]
    kit = ROOT / "framework" / "testing"  # the testing kit runs under pytest: the `test` extra's
    package = _imports([p for p in files if not p.is_relative_to(kit)])

    at_import = {m for m, top in package.items() if top}
    assert all(_dists_of(m) & core for m in at_import), "imported at module level but not a core dependency"
    at_import_dists = set().union(*(_dists_of(m) for m in at_import))
    assert core - at_import_dists == set(LAZY_CORE), "a core dependency only optional code imports"
    optional = set().union(*extras.values())
    for module in package.keys() - at_import:
        assert _dists_of(module) & (core | optional), f"{module} is imported but in no dependency list"
    tests = _imports([*(ROOT / "tests").rglob("*.py"), *kit.rglob("*.py")])
    for module in package.keys() | tests.keys():
        assert _dists_of(module) & (core | extras["test"]), f"the `test` extra misses {module}"


# --------------------------------------------------------------------------- README


@pytest.mark.slow  # a fresh interpreter that imports diffusers and transformers, then generates
def test_readme_cpu_quick_start_runs_as_written(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(# CPU quick start\n.*?)```", text, re.S)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "TokenReduceHandle(sdxl" in done.stdout
    assert (tmp_path / "reduced.png").is_file() and (tmp_path / "reference.png").is_file()
