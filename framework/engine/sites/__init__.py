"""Site library: wrappers for the block patterns diffusion transformers share.

An adapter says which sub-modules of which blocks play which part; a site kind installs the
wrappers (on sub-module forwards, never copying a block's forward) and handles the merged
tokens' positions (RoPE rows of their destinations).
"""

from tokenreduce.engine.sites.cross_attention import (
    CROSS_ATTENTION_PARTS,
    CallState,
    CrossAttentionBlock,
    RopeArg,
)

__all__ = ["CROSS_ATTENTION_PARTS", "CallState", "CrossAttentionBlock", "RopeArg"]
