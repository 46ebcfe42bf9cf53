"""Public testing kit for plugin authors.

- :mod:`tokenreduce.testing.strategies`: hypothesis strategies (grids, ratios, token batches,
  partitions, component parameters) and pinned edge cases;
- :mod:`tokenreduce.testing.contracts`: contract test mixins every component kind must pass;
- :mod:`tokenreduce.testing.adapter_contract`: the contract every model adapter must pass (ratio 0
  and ``remove`` bit-exact, finite merged outputs, guidance and odd batches, compile, no host sync);
- :mod:`tokenreduce.testing.plugins`: throwaway plugin distributions for discovery tests;
- :mod:`tokenreduce.testing.tiny_sdxl`, :mod:`tokenreduce.testing.tiny_flux`,
  :mod:`tokenreduce.testing.tiny_flux2`, :mod:`tokenreduce.testing.tiny_sd3`,
  :mod:`tokenreduce.testing.tiny_qwenimage`, :mod:`tokenreduce.testing.tiny_wan`: tiny diffusers
  models and their call inputs;
- :mod:`tokenreduce.testing.tiny_eval`: tiny CLIP and DINO-like feature models for ``eval --model``.

Import the submodule you need; this package imports nothing itself (hypothesis and pytest are
test dependencies only).
"""
