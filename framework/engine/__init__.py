"""The runtime engine: plan -> merge -> compute -> unmerge, with state per pipeline call."""

from framework.engine.clock import Clock
from framework.engine.patch import Patch, PatchSet
from framework.engine.runtime import Group, Runtime

__all__ = ["Clock", "Group", "Patch", "PatchSet", "Runtime"]
