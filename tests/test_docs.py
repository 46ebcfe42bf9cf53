"""The plugin guide's example is real code: it registers, validates, runs and passes the contracts."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import tokenreduce
from tokenreduce.testing.contracts import SelectorContract

DOCS = Path(__file__).resolve().parent.parent / "docs"


def _guide_module(tmp_path_factory: pytest.TempPathFactory) -> str:
    text = (DOCS / "writing-a-plugin.md").read_text(encoding="utf-8")
    source = re.search(r"```python\n(# my_tokenreduce_plugin\.py\n.*?)```", text, re.S)
    assert source, "the guide's example module is missing"
    folder = tmp_path_factory.mktemp("guide")
    (folder / "my_tokenreduce_plugin.py").write_text(source.group(1), encoding="utf-8")
    sys.path.insert(0, str(folder))
    return "my_tokenreduce_plugin"


@pytest.fixture(scope="module")
def guide(tmp_path_factory):
    name = _guide_module(tmp_path_factory)
    import importlib

    module = importlib.import_module(name)
    yield module
    sys.path.remove(str(Path(module.__file__).parent))
    sys.modules.pop(name, None)
    tokenreduce.reset_manager()


def test_guide_plugin_registers_and_runs(guide) -> None:
    tokenreduce.reset_manager()
    tokenreduce.register_plugin(guide, source="my-tokenreduce-plugin")
    registry = tokenreduce.get_registry()
    assert "central" in registry.names("selector")
    assert registry.components["selector"]["central"].source == "my-tokenreduce-plugin"

    from tokenreduce.testing.tiny_sdxl import tiny_sdxl_inputs, tiny_sdxl_unet

    unet = tiny_sdxl_unet()
    inputs = tiny_sdxl_inputs(unet)
    with torch.no_grad():
        reference = unet(**inputs).sample
        config = {
            "adapter": {"name": "sdxl"},
            "ratio": 0.5,
            "selector": {"name": "central", "noise": 0.01},
            "partitioner": {"name": "tile", "size": 4},
        }
        handle = tokenreduce.apply(unet, config)
        merged = unet(**inputs).sample
        handle.remove()
        restored = unet(**inputs).sample
    assert torch.isfinite(merged).all() and not torch.equal(merged, reference)
    assert torch.equal(restored, reference)


class TestGuideSelectorContract(SelectorContract):
    """The guide promises its selector passes the public contracts."""

    @pytest.fixture(name="component", scope="class")
    def component_fixture(self, guide):
        return guide.CentralSelector(guide.CentralSelector.Params(noise=0.01))


def test_configuration_reference_is_current() -> None:
    from tokenreduce.manager import PluginManager
    from tokenreduce.reference import markdown_reference

    text = (DOCS / "configuration.md").read_text(encoding="utf-8")
    committed = text.split("<!-- reference:start -->\n", 1)[1].split("<!-- reference:end -->", 1)[0]
    built_in_only = PluginManager(autoload=False).registry
    assert committed == markdown_reference(built_in_only), (
        "docs/configuration.md is stale: regenerate it with `tokenreduce plugins --markdown` "
        "(TOKENREDUCE_DISABLE_PLUGIN_AUTOLOAD=1)"
    )
