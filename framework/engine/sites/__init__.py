"""The site library: block patterns diffusion transformers share, wrapped around sub-module forwards.

An adapter says which sub-modules of which blocks play which part; a site kind installs the
wrappers (on sub-module forwards, never copying a block's forward) and handles the merged
tokens' positions (RoPE rows of their destinations) and the text length.

- :mod:`.joint_stream`: joint text-image attention, image tokens merged (Flux/Flux.2 double-stream,
  SD3/SD3.5, Qwen-Image blocks);
- :mod:`.single_stream`: attention and MLP on ``[text; merged image]`` (Flux/Flux.2 single-stream);
- :mod:`.cross_attention`: self-attention, cross-attention queries and FFN on merged tokens (Wan);
- :mod:`.rope`: rotary tables for merged tokens (destination rows, built once per plan and call);
- :mod:`.grid`: token grids read from per-token ids;
- :mod:`.call`: the per-call context and the denoiser's forward wrapper;
- :mod:`.stack`: :class:`StackedTransformerAdapter`, which an adapter subclasses to declare its stacks.
"""

from tokenreduce.engine.sites.call import CallContext, CallInfo, Site, wrap_denoiser
from tokenreduce.engine.sites.cross_attention import (
    CROSS_ATTENTION_PARTS,
    CallState,
    CrossAttentionBlock,
    RopeArg,
)
from tokenreduce.engine.sites.grid import GridResolver, grid_from_ids
from tokenreduce.engine.sites.rope import JOINT_TEXT_FIRST, NO_ROPE, Rope, merged_rope
from tokenreduce.engine.sites.stack import Stack, StackedTransformerAdapter

__all__ = [
    "CROSS_ATTENTION_PARTS",
    "JOINT_TEXT_FIRST",
    "NO_ROPE",
    "CallContext",
    "CallInfo",
    "CallState",
    "CrossAttentionBlock",
    "GridResolver",
    "Rope",
    "RopeArg",
    "Site",
    "Stack",
    "StackedTransformerAdapter",
    "grid_from_ids",
    "merged_rope",
    "wrap_denoiser",
]
