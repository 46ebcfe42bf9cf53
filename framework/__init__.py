"""tokenreduce: plugin-based token reduction for diffusion models.

>>> import tokenreduce as tr
>>> handle = tr.apply(pipe, "toma-sdxl")   # or a path, a mapping, a Config
>>> with handle.disabled(): ...             # the original model, temporarily
>>> handle.remove()                         # exact original restored
"""

from tokenreduce.api import TokenReduceHandle, UnsupportedModelError, apply, disabled, get_handle, remove
from tokenreduce.config import ConfigError, config_model, json_schema, load_config
from tokenreduce.hookspecs import hookimpl
from tokenreduce.interfaces import (
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
from tokenreduce.layout import Layout, Regions
from tokenreduce.manager import get_registry, register_plugin, reset_manager
from tokenreduce.params import StrictParams

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
