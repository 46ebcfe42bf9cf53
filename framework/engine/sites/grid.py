"""The ``(H, W)`` image-token grid of a call, for models that give positions as per-token ids.

Order: an explicit grid from the adapter parameters (``H * W == N``); else read from the ids
(``(N, k)``, axis 1 = row, axis 2 = column, raster order) on the host once per distinct ids
tensor (pipelines pass the same tensor at every step); under ``torch.compile`` nothing can be
read from the device, so the grid last read (or prepared) for the same ``N`` is used, else a
``ValueError`` names ``handle.prepare`` (dynamic shapes specialise per prepared size); eager
calls without ids use a square grid when ``N`` is a perfect square, else a ``ValueError`` asks
for an explicit grid.
"""

from __future__ import annotations

import math

import torch

from tokenreduce.engine.runtime import compiled_new_size_message


def grid_from_ids(
    img_ids: torch.Tensor, num_tokens: int, hint: str = "set the adapter's `grid: [H, W]`"
) -> tuple[int, int]:
    """``(H, W)`` of raster-ordered image ids (one device read); ``ValueError`` otherwise."""
    if img_ids.ndim != 2 or img_ids.shape[0] != num_tokens or img_ids.shape[1] < 3:
        raise ValueError(
            f"img_ids of shape {tuple(img_ids.shape)} do not describe {num_tokens} image tokens; {hint}"
        )
    rc = img_ids[:, 1:3].to(device="cpu", dtype=torch.float64)
    rows, cols = rc[:, 0] - rc[:, 0].min(), rc[:, 1] - rc[:, 1].min()
    h, w = int(rows.max()) + 1, int(cols.max()) + 1
    raster = torch.arange(num_tokens, dtype=torch.float64)
    if h * w != num_tokens or not (
        torch.equal(rows, raster.div(w, rounding_mode="floor")) and torch.equal(cols, raster % w)
    ):
        raise ValueError(f"img_ids are not a raster-ordered grid of {num_tokens} tokens; {hint}")
    return h, w


class GridResolver:
    """The ``(H, W)`` image-token grid of a call (see the module docstring for the order)."""

    def __init__(self, explicit: list[int] | None, adapter: str) -> None:
        self.explicit = None if explicit is None else (explicit[0], explicit[1])
        self.adapter = adapter
        self._last: tuple[tuple, tuple[int, int]] | None = None
        self.by_tokens: dict[int, tuple[int, int]] = {}

    @property
    def hint(self) -> str:
        return f"set the {self.adapter} adapter's `grid: [H, W]`"

    def __call__(self, img_ids: torch.Tensor | None, num_tokens: int) -> tuple[int, int]:
        if self.explicit is not None:
            h, w = self.explicit
            if h * w != num_tokens:
                raise ValueError(
                    f"the {self.adapter} adapter's grid {h}x{w} does not match {num_tokens} image tokens"
                )
            return self.explicit
        # Nothing can be read from the device inside a graph, nor from meta tensors (op counting).
        if torch.compiler.is_compiling() or img_ids is None or img_ids.device.type == "meta":
            if torch.compiler.is_compiling():
                num_tokens = int(num_tokens)  # specialise dynamic shapes: layouts are static per size
                if num_tokens not in self.by_tokens:
                    raise ValueError(compiled_new_size_message(f"an image of {num_tokens} tokens"))
            grid = self.by_tokens.get(num_tokens)
            if grid is None:
                side = math.isqrt(num_tokens)
                if side * side != num_tokens:
                    raise ValueError(
                        f"cannot infer the token grid of {num_tokens} image tokens without reading img_ids; "
                        f"{self.hint} (or run one eager call first)"
                    )
                grid = (side, side)
            return grid
        if img_ids.ndim == 3:  # deprecated batched ids; diffusers uses the first
            img_ids = img_ids[0]
        # Inference tensors have no version counter (an in-place edit of one is not noticed).
        version = -1 if img_ids.is_inference() else img_ids._version
        key = (tuple(img_ids.shape), img_ids.device, img_ids.data_ptr(), version)
        if self._last is not None and self._last[0] == key:
            return self._last[1]
        grid = grid_from_ids(img_ids, num_tokens, self.hint)
        self._last = (key, grid)
        self.by_tokens[num_tokens] = grid
        return grid
