"""The runtime engine: plan -> merge -> compute -> unmerge, with state per pipeline call."""

from tokenreduce.engine.clock import Clock
from tokenreduce.engine.patch import Patch, PatchSet
from tokenreduce.engine.runtime import Group, Runtime

__all__ = ["Clock", "Group", "Patch", "PatchSet", "Runtime"]
