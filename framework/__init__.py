"""tokenreduce: plugin-based token reduction for diffusion models.

>>> import framework as tr
>>> handle = tr.apply(pipe, "toma-sdxl")   # or a path, a mapping, a Config
>>> with handle.disabled(): ...             # the original model, temporarily
>>> handle.remove()                         # exact original restored
"""

from framework.api import TokenReduceHandle, UnsupportedModelError, apply, disabled, get_handle, remove
from framework.config import ConfigError, config_model, json_schema, load_config
from framework.hookspecs import hookimpl
from framework.interfaces import (
    Decision,
    MergePlan,
    Merger,
    ModelAdapter,
    Partitioner,
    ReusePolicy,
    SelectContext,
    Selector,
    SiteSpec,
)
from framework.layout import Layout, Regions
from framework.manager import get_registry, register_plugin, reset_manager
from framework.params import StrictParams

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "Decision",
    "Layout",
    "MergePlan",
    "Merger",
    "ModelAdapter",
    "Partitioner",
    "Regions",
    "ReusePolicy",
    "SelectContext",
    "Selector",
    "SiteSpec",
    "StrictParams",
    "TokenReduceHandle",
    "UnsupportedModelError",
    "apply",
    "config_model",
    "disabled",
    "get_handle",
    "get_registry",
    "hookimpl",
    "json_schema",
    "load_config",
    "register_plugin",
    "remove",
    "reset_manager",
]
