"""The framework names no model: model knowledge lives in the adapter plugins (``plugins/``).

What is checked, honestly: every Python *name* and every string literal that is not a docstring in
``framework/`` (comments and docstrings are prose and may give examples), against the model
families the first-party adapters serve. The modules listed in ``EXEMPT`` still name models, each
for the reason given; the test fails both when a new module names a model and when an exempt one
no longer does (so the list only shrinks).
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from pathlib import Path

FRAMEWORK = Path(__file__).resolve().parents[1] / "framework"
MODEL_NAMES = re.compile(r"flux|sdxl|sd3|qwen|(?<![a-z])wan(?![a-z])", re.IGNORECASE)

EXEMPT = {
    "manager.py": "lists the first-party plugin modules it always registers",
    "cli.py": "the quality proxy commands choose between the SDXL- and Flux-shaped proxy models",
    "demo.py": "runs the embedded SDXL- and Flux-shaped proxy models",
    "bench/components.py": "times ToMA's parts at SDXL and Flux shapes, keyed by their presets",
    "bench/ops.py": "counts kernels on the SDXL and Flux architectures of record (their block classes "
    "and shortened configs)",
    "quality/fidelity.py": "the fidelity protocol's proxy models are SDXL- and Flux-shaped",
    "quality/cli.py": "the proxy training command chooses among the SDXL-, Flux- and Wan-shaped proxies",
    "quality/proxy/latent.py": "defines the latent SDXL-, Flux- and Wan-shaped proxies",
    "quality/proxy/models.py": "defines the SDXL- and Flux-shaped proxy denoisers",
    "quality/proxy/train.py": "trains those proxies with each family's noise schedule",
    "quality/schedule_sweep.py": "sweeps the SDXL and Flux presets' schedules on those proxies",
    "quality/frontier.py": "sweeps the SDXL and Flux presets and baselines on the latent proxies",
    "testing/": "the test kit ships tiny models of each supported family, named after it",
}


def _docstring_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            first = node.body[0] if node.body else None
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                lines.add(first.lineno)
    return lines


def model_names_in(source: str) -> list[str]:
    """Names and non-docstring string literals that name a model."""
    docstrings = _docstring_lines(ast.parse(source))
    return [
        tok.string
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if (tok.type == tokenize.NAME or (tok.type == tokenize.STRING and tok.start[0] not in docstrings))
        and MODEL_NAMES.search(tok.string)
    ]


def test_the_check_sees_names_and_strings_but_not_prose() -> None:
    code = '"""Flux docs."""\nx = 1  # sdxl comment\nsd3_thing = "qwen"\n'
    assert model_names_in(code) == ["sd3_thing", '"qwen"']
    assert model_names_in("swan = 'answer'\nwan = 2\n") == ["wan"]


def test_framework_names_no_model_outside_the_exempt_modules() -> None:
    offenders = set()
    for path in sorted(FRAMEWORK.rglob("*.py")):
        rel = path.relative_to(FRAMEWORK).as_posix()
        if model_names_in(path.read_text(encoding="utf-8")):
            offenders.add(next((key for key in EXEMPT if key.endswith("/") and rel.startswith(key)), rel))
    assert offenders - set(EXEMPT) == set(), "model names in the framework: move them into an adapter plugin"
    assert set(EXEMPT) - offenders == set(), "these modules no longer name a model: drop them from EXEMPT"
