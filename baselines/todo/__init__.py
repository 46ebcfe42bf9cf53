"""ToDo (Smith et al., arXiv 2402.13573) as a plugin: the ``kv_only`` ``downsample`` merger and an SDXL preset.

ToDo does not apply to Flux: its joint attention has no separate self-attention whose keys and
values could be pooled (the merger's ``check`` says so at config validation).
"""

from __future__ import annotations

from tokenreduce.baselines.todo.downsample import DownsampleMerger, downsample_tokens
from tokenreduce.hookspecs import hookimpl

__all__ = ["DownsampleMerger", "downsample_tokens"]


@hookimpl
def tokenreduce_register(registry) -> None:  # noqa: ANN001 - the typed registry is passed by pluggy
    registry.add(DownsampleMerger)
    registry.add_preset(
        "todo-sdxl",
        "tokenreduce.baselines.todo.presets",
        "todo-sdxl.yaml",
        "ToDo on SDXL: self-attention keys/values from the 2x nearest-downsampled 64x64 level (75% fewer)",
    )
