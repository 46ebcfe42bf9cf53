"""Public testing kit for plugin authors.

- :mod:`framework.testing.strategies`: hypothesis strategies (grids, ratios, token batches,
  partitions, component parameters) and pinned edge cases;
- :mod:`framework.testing.contracts`: contract test mixins every component kind must pass;
- :mod:`framework.testing.plugins`: throwaway plugin distributions for discovery tests;
- :mod:`framework.testing.tiny_sdxl`, :mod:`framework.testing.tiny_flux`: tiny diffusers models;
- :mod:`framework.testing.tiny_eval`: tiny CLIP and DINO-like feature models for ``eval --model``.

Import the submodule you need; this package imports nothing itself (hypothesis and pytest are
test dependencies only).
"""
