"""Size-weighted (proportional) attention: each key's logit gets ``+ log(size of its group)``.

A merged token that stands for ``s`` source tokens then weighs in every softmax what its ``s``
tokens weighed (exactly as if its key and value were repeated ``s`` times), also next to unmerged
keys such as text tokens.

**Math, no mask.** The head dimension ``d`` is padded to ``d' = d + P`` (``P`` = 8, so ``d'`` stays a
multiple of 8) with ``q' = [q, c, 0..]``, ``k' = [k, b, 0..]``, ``v' = [v, 0..]`` and the attention
run with the scale ``a`` of the original head dimension: ``a q'.k' = a q.k + a c b``, so
``b = log(s) / (a c)`` adds exactly ``log(s)``; the padded output columns are zero and dropped.
The kernels stay the fused ones (flash, memory-efficient, cuDNN): no additive mask is built. ``c``
is 1, exact in every float type, so only ``b`` is rounded (relative error of the model dtype).

**Routes into diffusers' processors** (one per attention module, chosen at install):

- ``dispatch``: processors that call ``dispatch_attention_fn`` (Flux, Flux.2, Qwen-Image, Wan and
  most transformer models). Every function in diffusers' attention backend registry is wrapped
  once per process (a pass-through when no size-weighted call is in flight); the wrapper reads the
  key weights that :meth:`SizeWeighting.call` sets around one attention call. It receives ``q, k,
  v`` after the processor's q/k norms and RoPE, which therefore act on the original head dims.
  Registry functions are the extension point diffusers itself selects kernels by; wrapping them
  keeps every backend (native SDPA, flash, sage, ...) and copies no processor code. A dispatch
  within the call whose keys are not the weighted sequence (e.g. IP-adapter image-prompt keys)
  runs unweighted. The in-flight weights are process state: one size-weighted attention call at
  a time (models run concurrently from several threads would need a lock around their calls).
- ``projections``: ``AttnProcessor2_0`` (SDXL's UNet) calls ``F.scaled_dot_product_attention``
  itself with its default scale ``1/sqrt(head_dim)`` and ``head_dim = key width / heads``. The
  module's ``to_q``, ``to_k``, ``to_v`` (pad each head) and ``to_out[0]`` (drop the padding) are
  wrapped on the instance, and ``q`` is scaled by ``sqrt(d'/d)`` to restore the original scale.
  Needs a module without q/k norms (they would see the padding).
- ``sdpa``: other processors that call ``torch.nn.functional.scaled_dot_product_attention``
  themselves (SD3's joint attention, ``AttnProcessor2_0`` with q/k norms). That function is
  wrapped once per process while any model needs it (a pass-through when no size-weighted call of
  this route is in flight) and pads ``q, k, v`` in its ``(B, H, S, d)`` layout after the norms.
  Each route has its own in-flight slot, so a dispatch backend that itself calls the wrapped
  function is not padded twice.

**Key order.** The weighted keys are ``text_len`` unmerged (size 1) tokens and the merged image
tokens, text first or last as the model's joint attention concatenates them
(:meth:`KeyWeights.of_plan`). An attention mask is unchanged by the padding (it acts on logits).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tokenreduce.engine.patch import PatchSet
from tokenreduce.interfaces import MergePlan

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

Forward = Callable[..., Any]

#: Value of the query's extra column; 1 is exact in every float type.
QUERY_COLUMN = 1.0
#: Head dims are padded to a multiple of this (the fused kernels' alignment).
ALIGN = 8


def padded_dim(head_dim: int) -> int:
    """``d'``: the smallest multiple of :data:`ALIGN` above ``head_dim`` (one free column at least)."""
    return (head_dim // ALIGN + 1) * ALIGN


class KeyWeights:
    """The log group sizes of one attention's keys, in sequence order, and their padded columns.

    ``log_sizes``: ``(B or 1, S_k)`` float32 (0 for unmerged keys). The padded blocks are built on
    first use per dtype, scale and width and kept, so the blocks of a group share them.
    """

    def __init__(self, log_sizes: torch.Tensor) -> None:
        self.log_sizes = log_sizes
        self.length = log_sizes.shape[1]
        self._blocks: dict[tuple, torch.Tensor] = {}

    @classmethod
    def of_plan(cls, plan: MergePlan, text_len: int = 0, text_first: bool = True) -> KeyWeights | None:
        """Weights of the keys ``[text; merged image]`` (``[merged image; text]`` unless
        ``text_first``; ``text_len`` unmerged tokens of size 1), or ``None`` when the plan merges
        nothing (``sizes`` is ``None``): then attention runs unchanged."""
        sizes = plan.sizes
        if sizes is None:
            return None
        logs = sizes.float().clamp_min(torch.finfo(torch.float32).tiny).log()
        if text_len:
            text = logs.new_zeros(logs.shape[0], text_len)
            logs = torch.cat((text, logs) if text_first else (logs, text), dim=1)
        return cls(logs)

    def key_block(self, dtype: torch.dtype, scale: float, width: int) -> torch.Tensor:
        """``(B or 1, S_k, 1, width)``: column 0 holds ``log(s) / (scale * c)``, the rest zeros."""
        key = ("k", dtype, scale, width)
        block = self._blocks.get(key)
        if block is None:
            col = (self.log_sizes / (scale * QUERY_COLUMN)).unsqueeze(-1).unsqueeze(-1)
            block = torch.nn.functional.pad(col, (0, width - 1)).to(dtype)
            self._blocks[key] = block
        return block

    def query_block(self, dtype: torch.dtype, width: int) -> torch.Tensor:
        """``(1, 1, 1, width)``: ``[c, 0, ..]``."""
        key = ("q", dtype, width)
        block = self._blocks.get(key)
        if block is None:
            block = self.log_sizes.new_zeros(1, 1, 1, width, dtype=dtype)
            block[..., 0] = QUERY_COLUMN
            self._blocks[key] = block
        return block


class KeyWeightsCache:
    """The :class:`KeyWeights` of the latest plan (one cache per sharing group): built once per plan
    and key layout (text length and side), shared by the blocks that apply it."""

    __slots__ = ("_by_layout", "_plan")

    def __init__(self) -> None:
        self._plan: MergePlan | None = None
        self._by_layout: dict[tuple[int, bool], KeyWeights | None] = {}

    def get(self, plan: MergePlan, text_len: int = 0, text_first: bool = True) -> KeyWeights | None:
        if self._plan is not plan:
            self._plan, self._by_layout = plan, {}
        key = (text_len, text_first)
        if key not in self._by_layout:
            self._by_layout[key] = KeyWeights.of_plan(plan, text_len, text_first)
        return self._by_layout[key]


# --------------------------------------------------------------------------- the padded attention


def pad_bshd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: KeyWeights,
    scale: float,
    q_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Queries, keys and values ``(B, S, H, d)`` padded to ``d'`` (see the module docstring)."""
    d = q.shape[-1]
    width = padded_dim(d) - d
    if q_factor != 1.0:
        q = q * q_factor
    qb = weights.query_block(q.dtype, width).expand(*q.shape[:-1], width)
    kb = weights.key_block(k.dtype, scale, width).expand(*k.shape[:-1], width)
    q = torch.cat((q, qb), dim=-1)
    k = torch.cat((k, kb), dim=-1)
    v = torch.nn.functional.pad(v, (0, width))
    return q, k, v


# --------------------------------------------------------------------------- route "dispatch"


class _InFlight:
    """The key weights of the size-weighted attention call in flight, per route (``None``: none)."""

    weights: KeyWeights | None = None  # route "dispatch"
    sdpa: KeyWeights | None = None  # route "sdpa"


_IN_FLIGHT = _InFlight()
_MARK = "_tokenreduce_size_weighted"


def _weighted_backend(fn: Callable[..., torch.Tensor], takes_scale: bool) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def backend(**kwargs: Any) -> torch.Tensor:
        weights = _IN_FLIGHT.weights
        if weights is None:
            return fn(**kwargs)
        q, k, v = kwargs["query"], kwargs["key"], kwargs["value"]
        if k.shape[1] != weights.length:  # other keys (e.g. an IP-adapter's): unweighted
            return fn(**kwargs)
        d = q.shape[-1]
        scale = kwargs.get("scale")
        scale = d**-0.5 if scale is None else scale
        if takes_scale:
            q, k, v = pad_bshd(q, k, v, weights, scale)
            kwargs["scale"] = scale
        else:  # the backend scales by 1/sqrt(d'): rescale the real query columns to 1/sqrt(d)
            dp = padded_dim(d)
            q, k, v = pad_bshd(q, k, v, weights, dp**-0.5, q_factor=scale * math.sqrt(dp))
        kwargs.update(query=q, key=k, value=v)
        out = fn(**kwargs)
        if isinstance(out, tuple):  # (out, lse) from backends asked for the log-sum-exp
            return (out[0][..., :d], *out[1:])
        return out[..., :d]

    setattr(backend, _MARK, fn)
    return backend


class _RegistryPatch:
    """Wraps every function of diffusers' attention backend registry while any model needs it.

    One user per patched model, released by ``undo`` (``handle.remove()``). A patched model dropped
    without ``remove`` keeps its user: its wrappers stay as pass-throughs outside weighted calls.
    (Releasing on garbage collection would swap the registry's functions at an arbitrary moment,
    possibly while ``torch.compile`` traces another model through them.)
    """

    users = 0
    originals: dict[Any, Callable[..., Any]] = {}

    def __init__(self) -> None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry as registry

        self.registry = registry
        cls = type(self)
        if cls.users == 0:
            for name, fn in list(registry._backends.items()):
                if getattr(fn, _MARK, None) is None:
                    cls.originals[name] = fn
                    takes_scale = "scale" in registry._supported_arg_names.get(name, ())
                    registry._backends[name] = _weighted_backend(fn, takes_scale)
        cls.users += 1

    def __deepcopy__(self, memo: dict[int, Any]) -> _RegistryPatch:
        # A deep-copied patched model is one more user: its removal must not unwrap the
        # backends the original still needs.
        return type(self)()

    def undo(self) -> None:
        cls = type(self)
        cls.users -= 1
        if cls.users:
            return
        for name, fn in cls.originals.items():
            current = self.registry._backends.get(name)
            if getattr(current, _MARK, None) is fn:  # leave a backend someone re-registered since
                self.registry._backends[name] = fn
        cls.originals.clear()


# --------------------------------------------------------------------------- route "sdpa"


def _weighted_sdpa(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    @functools.wraps(fn)
    def sdpa(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        weights = _IN_FLIGHT.sdpa
        if weights is None or key.shape[-2] != weights.length:  # not weighted, or other keys
            return fn(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **kwargs)
        d = query.shape[-1]
        scale = d**-0.5 if scale is None else scale
        # (B, H, S, d) -> the (B, S, H, d) padding and back (views; the kernels take any strides)
        q, k, v = pad_bshd(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), weights, scale)
        out = fn(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask,
            dropout_p,
            is_causal,
            scale=scale,
            **kwargs,
        )
        return out[..., :d]

    setattr(sdpa, _MARK, fn)
    return sdpa


class _SdpaPatch:
    """Wraps ``torch.nn.functional.scaled_dot_product_attention`` while any model needs it."""

    users = 0
    original: Callable[..., Any] | None = None

    def __init__(self) -> None:
        cls = type(self)
        if cls.users == 0:
            fn = torch.nn.functional.scaled_dot_product_attention
            if getattr(fn, _MARK, None) is None:
                cls.original = fn
                torch.nn.functional.scaled_dot_product_attention = _weighted_sdpa(fn)
        cls.users += 1

    def __deepcopy__(self, memo: dict[int, Any]) -> _SdpaPatch:
        # A deep-copied patched model is one more user: its removal must not unwrap the
        # backends the original still needs.
        return type(self)()

    def undo(self) -> None:
        cls = type(self)
        cls.users -= 1
        original = cls.original
        if cls.users or original is None:
            return
        current = torch.nn.functional.scaled_dot_product_attention
        wrapped: Callable[..., Any] | None = getattr(current, _MARK, None)
        if wrapped is original:  # leave a function someone replaced since
            torch.nn.functional.scaled_dot_product_attention = original
        cls.original = None


def _calls_functional_sdpa(call: Any) -> bool:
    """Whether a processor's ``__call__`` calls ``F.scaled_dot_product_attention`` (looked up at call time)."""
    code = getattr(call, "__code__", None)
    if code is None or "scaled_dot_product_attention" not in code.co_names:
        return False
    return any(v is torch.nn.functional for v in getattr(call, "__globals__", {}).values())


# --------------------------------------------------------------------------- route "projections"


class _ProjectionCell:
    __slots__ = ("heads", "weights")

    def __init__(self, heads: int) -> None:
        self.heads = heads
        self.weights: KeyWeights | None = None


def _pad_heads(x: torch.Tensor, heads: int, block: torch.Tensor | None, factor: float = 1.0) -> torch.Tensor:
    """``(B, N, H*d)`` -> ``(B, N, H*d')`` with ``block`` (or zeros) in each head's extra columns."""
    b, n, _ = x.shape
    xh = x.view(b, n, heads, -1)
    d = xh.shape[-1]
    width = padded_dim(d) - d
    if factor != 1.0:
        xh = xh * factor
    if block is None:
        xh = torch.nn.functional.pad(xh, (0, width))
    else:
        xh = torch.cat((xh, block.expand(b, n, heads, width)), dim=-1)
    return xh.reshape(b, n, heads * (d + width))


def _install_projections(attn: Attention, patches: PatchSet) -> _ProjectionCell:
    cell = _ProjectionCell(attn.heads)
    inner = attn.to_out[0].in_features  # heads x the original head dim

    def head_dim(x: torch.Tensor) -> int:
        return x.shape[-1] // cell.heads

    def wrap_q(original: Forward) -> Forward:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(x, *args, **kwargs)
            w = cell.weights
            if w is None:
                return out
            d = head_dim(out)
            dp = padded_dim(d)
            # AttnProcessor2_0 scales by 1/sqrt(d'): restore 1/sqrt(d) on the real columns.
            return _pad_heads(out, cell.heads, w.query_block(out.dtype, dp - d), math.sqrt(dp / d))

        return forward

    def wrap_k(original: Forward) -> Forward:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(x, *args, **kwargs)
            w = cell.weights
            if w is None:
                return out
            if out.shape[1] != w.length:
                raise ValueError(
                    f"size-weighted attention got {out.shape[1]} keys but weights for {w.length}"
                )
            d = head_dim(out)
            dp = padded_dim(d)
            return _pad_heads(out, cell.heads, w.key_block(out.dtype, dp**-0.5, dp - d))

        return forward

    def wrap_v(original: Forward) -> Forward:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            out = original(x, *args, **kwargs)
            return out if cell.weights is None else _pad_heads(out, cell.heads, None)

        return forward

    def wrap_out(original: Forward) -> Forward:
        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if cell.weights is not None:
                b, n, _ = x.shape
                x = x.view(b, n, cell.heads, -1)[..., : inner // cell.heads].reshape(b, n, inner)
            return original(x, *args, **kwargs)

        return forward

    patches.wrap_forward(attn.to_q, wrap_q)
    patches.wrap_forward(attn.to_k, wrap_k)
    patches.wrap_forward(attn.to_v, wrap_v)
    patches.wrap_forward(attn.to_out[0], wrap_out)
    return cell


# --------------------------------------------------------------------------- public interface


def route(attn: nn.Module) -> str:
    """How size weighting reaches ``attn``'s kernel: ``"dispatch"``, ``"projections"`` or ``"sdpa"``.

    ``ValueError`` naming the processor when none applies.
    """
    processor = getattr(attn, "processor", None)
    call = next((k.__dict__["__call__"] for k in type(processor).__mro__ if "__call__" in k.__dict__), None)
    code = getattr(call, "__code__", None)
    if code is not None and "dispatch_attention_fn" in code.co_names:
        return "dispatch"
    from diffusers.models.attention_processor import AttnProcessor2_0

    norms = getattr(attn, "norm_q", None) is not None or getattr(attn, "norm_k", None) is not None
    if type(processor) is AttnProcessor2_0 and not norms:
        return "projections"
    if _calls_functional_sdpa(call):  # (with q/k norms the projections cannot be padded)
        return "sdpa"
    raise ValueError(
        f"size weighting supports attention processors that call diffusers' dispatch_attention_fn or "
        f"torch's scaled_dot_product_attention, and AttnProcessor2_0; this module uses "
        f"{type(processor).__name__}"
    )


class SizeWeighting:
    """Size-weighted attention for one diffusers attention module.

    Install once (``SizeWeighting(attn, patches)``; the patches are undone with the rest), then
    run each attention call through :meth:`call` with the keys' :class:`KeyWeights` (``None``:
    plain attention). Per call: the same kernels plus three concatenations (or pads) and one slice.
    """

    def __init__(self, attn: nn.Module, patches: PatchSet) -> None:
        self.route = route(attn)
        self._cell: _ProjectionCell | None = None
        if self.route == "dispatch":
            patches.add(_RegistryPatch())
        elif self.route == "sdpa":
            patches.add(_SdpaPatch())
        else:
            self._cell = _install_projections(attn, patches)

    def call(self, weights: KeyWeights | None, fn: Forward, *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with size-weighted attention inside (plain if ``weights`` is None)."""
        if weights is None:
            return fn(*args, **kwargs)
        if self.route == "sdpa":
            _IN_FLIGHT.sdpa = weights
            try:
                return fn(*args, **kwargs)
            finally:
                _IN_FLIGHT.sdpa = None
        cell = self._cell
        if cell is None:
            _IN_FLIGHT.weights = weights
            try:
                return fn(*args, **kwargs)
            finally:
                _IN_FLIGHT.weights = None
        cell.weights = weights
        try:
            return fn(*args, **kwargs)
        finally:
            cell.weights = None
