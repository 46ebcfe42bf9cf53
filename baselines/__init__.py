"""Baseline token-reduction methods as plugins: ToMeSD, ToDo and ToFu (one sub-package each).

Each sub-package registers its components and presets through the ``tokenreduce_register`` hook,
exactly like a third-party plugin. See ``docs/baselines.md`` for the mapping to the papers.
"""
