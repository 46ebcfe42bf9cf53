"""docs/baselines.md stays in step with the shipped presets and the components' parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenreduce.baselines.todo import DownsampleMerger
from tokenreduce.baselines.tofu import TofuMerger
from tokenreduce.baselines.tomesd import BipartiteMerger, TomesdGridSelector
from tokenreduce.manager import reset_manager

DOC = Path(__file__).resolve().parents[2] / "docs" / "baselines.md"
#: Every preset the baseline plugins ship (the ToMA presets are documented with ToMA).
PRESETS = sorted(name for name in reset_manager().registry.presets if not name.startswith("toma"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_baseline_preset_is_shown_verbatim(preset) -> None:
    text = reset_manager().registry.presets[preset].read_text()
    assert f"# {preset}\n{text.rstrip()}\n```" in DOC.read_text(encoding="utf-8")


@pytest.mark.parametrize("component", [TomesdGridSelector, BipartiteMerger, DownsampleMerger, TofuMerger])
def test_every_parameter_is_documented(component) -> None:
    doc = DOC.read_text(encoding="utf-8")
    for field in component.Params.model_fields:
        if field != "name":
            assert f"`{field}" in doc or f"{field}:" in doc, f"{component.name}.{field} is not documented"
