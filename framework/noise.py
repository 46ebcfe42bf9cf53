"""Counter-based Gaussian noise: the same values (up to float rounding) eager, under
``torch.compile`` and replayed from a CUDA graph.

A ``torch.Generator`` cannot be traced by ``torch.compile`` (a graph break, an error under
``fullgraph=True``), and the compiled RNG draws other values than the eager one. Here each element's
value is a hash of its index, a seed and a draw counter that lives on the device and is advanced
in place, so a captured or compiled step draws new noise at every replay without touching the host.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF
#: Multiplier of a well-mixing 32-bit integer hash; below 2**31, so products stay inside int64.
_MIX = 0x45D9F3B
#: Spreads consecutive draws (and seeds) over the hash's input space.
_GOLDEN = 0x9E3779B1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective hash of 32-bit values held in int64 (every intermediate is non-negative)."""
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    x = (((x >> 16) ^ x) * _MIX) & _MASK32
    return (x >> 16) ^ x


def normal(
    shape: Sequence[int], draws: torch.Tensor, seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal values of ``shape`` on ``draws``' device, then ``draws`` (an int64 scalar
    tensor) advanced by one in place, so the next call draws new values. Box-Muller: each pair of
    hashed uniforms gives two values."""
    n = math.prod(shape)
    pairs = (n + 1) // 2
    key = _mix32((draws * _GOLDEN + (seed & _MASK32)) & _MASK32)
    index = torch.arange(2 * pairs, device=draws.device, dtype=torch.int64)
    # Two draws whose keys share their high bits hash the same inputs in another order: their values
    # are each other's at other positions, which is as good as new for jitter (every position still
    # gets a value unrelated to its previous one).
    bits = _mix32((index ^ key) & _MASK32)
    # float32 rounds the top values up to 2**32, so u1 can be 1.0 (radius 0); never 0: logs stay finite
    u1, u2 = ((bits.to(torch.float32) + 0.5) * (1.0 / 2**32)).view(2, pairs)
    radius, angle = torch.sqrt(-2.0 * torch.log(u1)), (2.0 * math.pi) * u2
    values = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:n]
    draws.add_(1)
    return values.view(*shape).to(dtype)
