"""A hand-written Flux forward with token merging at the specified places (for float64 checks).

Written from the placement spec, not from the adapter: the blocks' math is spelled out here
(modulation, joint attention, RoPE, MLPs, gates, residuals); only the leaf layers (linear, norms,
embeddings) are the model's own modules. Merge and unmerge are dense matrices ``M (B, N', N)``
and ``U (B, N, N')`` taken from a plan, applied with ``@``:

- double-stream block: ``M`` on the normalised, modulated image tokens before Q/K/V; joint
  attention over ``[text; merged image]`` with the RoPE rows of ``positions`` for the image part;
  ``U`` after ``to_out``; gate, residual and MLP at full length;
- single-stream block: ``M`` on the image part of the normalised tokens; attention and MLP on
  ``[text; merged image]``; ``U`` on the image part of ``proj_out``'s output; gate and residual at
  full length.

Opt-in placements:

- ``double_ff``: in a merged double-stream block the image MLP also runs on merged tokens,
  ``x + gate * U ff(M n)`` with ``n`` the normalised, modulated image tokens it receives;
- ``single_run``: each run of consecutive merged single-stream blocks runs whole (attention, MLP,
  gate, residual) on ``[text; M x]`` (``M`` from the run's first block's normalised image tokens),
  and after the run ``x + U (y - M x)`` with ``y`` the run's merged image output.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from tokenreduce.interfaces import MergePlan

#: (kind, block index, normalised image tokens (B, N, C)) -> plan for those tokens
Planner = Callable[[str, int, torch.Tensor], MergePlan]


def dense(
    plan: MergePlan, batch: int, num_tokens: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(M, U)`` of a linear plan, read off by merging/unmerging identity matrices."""
    eye_n = torch.eye(num_tokens, dtype=dtype).expand(batch, num_tokens, num_tokens)
    merge = plan.merge(eye_n.contiguous())  # (B, N', N): row j = weights of merged token j
    keep = merge.shape[1]
    unmerge = plan.unmerge(torch.eye(keep, dtype=dtype).expand(batch, keep, keep).contiguous())
    return merge, unmerge


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotation of ``x (B, S, H, D)``; products in float32 inputs as diffusers does."""
    x0, x1 = x.reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack((-x1, x0), dim=-1).flatten(3)
    return (x.float() * cos[None, :, None] + rotated.float() * sin[None, :, None]).to(x.dtype)


def attention(
    attn, image: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, text: torch.Tensor | None = None
):
    """Flux attention over ``[text; image]`` (text optional), softmax written out."""

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (attn.heads, attn.head_dim))

    q, k, v = heads(attn.to_q(image)), heads(attn.to_k(image)), heads(attn.to_v(image))
    q, k = attn.norm_q(q), attn.norm_k(k)
    if text is not None:
        tq = attn.norm_added_q(heads(attn.add_q_proj(text)))
        tk = attn.norm_added_k(heads(attn.add_k_proj(text)))
        tv = heads(attn.add_v_proj(text))
        q, k, v = torch.cat((tq, q), 1), torch.cat((tk, k), 1), torch.cat((tv, v), 1)
    q, k = rope(q, cos, sin), rope(k, cos, sin)
    weights = (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(attn.head_dim)).softmax(-1)
    out = torch.einsum("bhqk,bkhd->bqhd", weights, v).flatten(2)
    if text is None:
        return out
    t = text.shape[1]
    return attn.to_out[0](out[:, t:]), attn.to_add_out(out[:, :t])


def reference_forward(
    model,
    inputs: dict[str, torch.Tensor],
    merged_double: set[int],
    merged_single: set[int],
    planner: Planner,
    share_by_kind: bool = True,
    double_ff: bool = False,
    single_run: bool = False,
) -> torch.Tensor:
    """The Flux transformer's output with merging in the given blocks (plans from ``planner``)."""
    x = model.x_embedder(inputs["hidden_states"])
    dtype = x.dtype
    timestep = inputs["timestep"].to(dtype) * 1000
    if "guidance" in inputs:
        temb = model.time_text_embed(
            timestep, inputs["guidance"].to(dtype) * 1000, inputs["pooled_projections"]
        )
    else:
        temb = model.time_text_embed(timestep, inputs["pooled_projections"])
    ctx = model.context_embedder(inputs["encoder_hidden_states"])
    t = ctx.shape[1]
    cos, sin = model.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"]), 0))
    batch, n = x.shape[0], x.shape[1]
    plans: dict[object, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def plan_for(kind: str, index: int, tokens: torch.Tensor):
        key = kind if share_by_kind else (kind, index)
        if key not in plans:  # first merged block of the group: plan from ITS tokens
            plan = planner(kind, index, tokens)
            plans[key] = (*dense(plan, batch, n, dtype), plan.positions)
        merge, unmerge, positions = plans[key]
        rows = torch.cat((torch.arange(t), t + positions.cpu()))
        return merge, unmerge, cos[rows], sin[rows]

    for i, block in enumerate(model.transformer_blocks):
        nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
        nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(ctx, emb=temb)
        if i in merged_double:
            merge, unmerge, mcos, msin = plan_for("double", i, nx)
            image_out, text_out = attention(block.attn, merge @ nx, mcos, msin, text=nc)
            image_out = unmerge @ image_out
        else:
            image_out, text_out = attention(block.attn, nx, cos, sin, text=nc)
        x = x + gate_msa[:, None] * image_out
        ff_in = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        if double_ff and i in merged_double:
            x = x + gate_mlp[:, None] * (unmerge @ block.ff(merge @ ff_in))
        else:
            x = x + gate_mlp[:, None] * block.ff(ff_in)
        ctx = ctx + c_gate_msa[:, None] * text_out
        ctx = ctx + c_gate_mlp[:, None] * block.ff_context(
            block.norm2_context(ctx) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
        )

    run_start = None  # (M, U, x before the run) while inside a merged run
    for j, block in enumerate(model.single_transformer_blocks):
        if single_run and j in merged_single:
            if run_start is None:  # the run's first block: plan from its normalised image tokens
                normed, _ = block.norm(torch.cat((ctx, x), 1), emb=temb)
                merge, unmerge, mcos, msin = plan_for("single", j, normed[:, t:])
                run_start = (merge, unmerge, x)
                x = merge @ x
            h = torch.cat((ctx, x), 1)
            normed, gate = block.norm(h, emb=temb)
            mlp = block.act_mlp(block.proj_mlp(normed))
            out = block.proj_out(torch.cat((attention(block.attn, normed, mcos, msin), mlp), 2))
            h = h + gate[:, None] * out
            ctx, x = h[:, :t], h[:, t:]
            if j + 1 not in merged_single:  # the run's last block
                merge, unmerge, before = run_start
                x = before + unmerge @ (x - merge @ before)
                run_start = None
            continue
        h = torch.cat((ctx, x), 1)
        normed, gate = block.norm(h, emb=temb)
        if j in merged_single:
            merge, unmerge, mcos, msin = plan_for("single", j, normed[:, t:])
            normed = torch.cat((normed[:, :t], merge @ normed[:, t:]), 1)
        else:
            mcos, msin = cos, sin
        mlp = block.act_mlp(block.proj_mlp(normed))
        out = block.proj_out(torch.cat((attention(block.attn, normed, mcos, msin), mlp), 2))
        if j in merged_single:
            out = torch.cat((out[:, :t], unmerge @ out[:, t:]), 1)
        h = h + gate[:, None] * out
        ctx, x = h[:, :t], h[:, t:]

    return model.proj_out(model.norm_out(x, temb))
