"""Tiny Flux models for tests and demos: a Flux-shaped transformer, its inputs, and a whole pipeline.

Everything is built from configs with seeded random weights and offline tokenizers: nothing is
downloaded, and a few denoising steps take seconds on a CPU. The transformer has the real
architecture (double-stream then single-stream blocks, joint attention, 3-axis RoPE); only the
widths and depths are small. The default depth (6 double, 7 single blocks) is enough for the Flux
adapter's default filter, which skips the first 5 blocks of each kind.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["tiny_flux_inputs", "tiny_flux_pipeline", "tiny_flux_transformer"]

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_flux_transformer(
    seed: int = 0,
    *,
    num_layers: int = 6,
    num_single_layers: int = 7,
    in_channels: int = 16,
    attention_head_dim: int = 16,
    num_attention_heads: int = 2,
    joint_attention_dim: int = 32,
    pooled_projection_dim: int = 32,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
    guidance_embeds: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A ``FluxTransformer2DModel`` in eval mode with seeded random weights.

    ``axes_dims_rope`` must sum to ``attention_head_dim``. Flux initialises several output
    projections to zero-like values in training set-ups; here every weight is random so that each
    block changes its input (a test can then tell which blocks ran on merged tokens).
    """
    from diffusers import FluxTransformer2DModel

    if sum(axes_dims_rope) != attention_head_dim:
        raise ValueError(
            f"axes_dims_rope {axes_dims_rope} must sum to attention_head_dim {attention_head_dim}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = FluxTransformer2DModel(
            patch_size=1,
            in_channels=in_channels,
            num_layers=num_layers,
            num_single_layers=num_single_layers,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            joint_attention_dim=joint_attention_dim,
            pooled_projection_dim=pooled_projection_dim,
            guidance_embeds=guidance_embeds,
            axes_dims_rope=tuple(axes_dims_rope),
        )
    # Only cast when asked: diffusers warns about casting with `to()` even when nothing changes.
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def image_ids(
    height_tokens: int, width_tokens: int, device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``(H*W, 3)`` Flux image position ids in raster order (axis 1 = row, axis 2 = column)."""
    ids = torch.zeros(height_tokens, width_tokens, 3)
    ids[..., 1] = torch.arange(height_tokens)[:, None]
    ids[..., 2] = torch.arange(width_tokens)[None, :]
    return ids.reshape(height_tokens * width_tokens, 3).to(device=device, dtype=dtype)


def tiny_flux_inputs(
    transformer: Any,
    batch: int = 1,
    height_tokens: int = 8,
    width_tokens: int = 8,
    text_len: int = 7,
    seed: int = 0,
    timestep: float = 0.7,
) -> dict[str, torch.Tensor]:
    """Keyword arguments for ``transformer(**inputs)`` (a guidance scale is included when the model embeds one)."""
    cfg = transformer.config
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    gen = torch.Generator().manual_seed(seed)
    n = height_tokens * width_tokens
    inputs = {
        "hidden_states": torch.randn(batch, n, cfg.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim, generator=gen),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=gen),
        "timestep": torch.full((batch,), timestep),
        "img_ids": image_ids(height_tokens, width_tokens),
        "txt_ids": torch.zeros(text_len, 3),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = torch.full((batch,), 3.5)
    return {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}


# --------------------------------------------------------------------------- pipeline


def _clip_tokenizer(folder: Path) -> Any:
    """A character-level CLIP BPE tokenizer (no merges) written to ``folder`` and loaded from there."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _LETTERS:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _t5_tokenizer() -> Any:
    """A character-level T5 tokenizer built in memory from a ``tokenizers`` Unigram model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    # transformers 5 exports it lazily (an alias of T5Tokenizer), so its stubs lack the name
    from transformers import T5TokenizerFast  # type: ignore[attr-defined,unused-ignore]

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += (
        [("\u2581" + ch, -1.0) for ch in _LETTERS] + [(ch, -2.0) for ch in _LETTERS] + [("\u2581", -3.0)]
    )
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0
    )


def tiny_flux_pipeline(seed: int = 0, **transformer_kwargs: Any) -> Any:
    """A real ``FluxPipeline`` from tiny components (CPU, float32).

    The VAE has 16 latent channels and no downsampling (one block), so the transformer sees
    ``(H/2) x (W/2)`` tokens for an ``H x W`` image (Flux packs 2x2 latent patches): ``height=16,
    width=16`` gives an 8x8 token grid. Call it with a short ``max_sequence_length`` (e.g. 8).
    ``transformer_kwargs`` go to :func:`tiny_flux_transformer`.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    latent_channels = 16
    text_dim = transformer_kwargs.pop("joint_attention_dim", 32)
    pooled_dim = transformer_kwargs.pop("pooled_projection_dim", 32)
    transformer = tiny_flux_transformer(
        seed,
        in_channels=latent_channels * 4,
        joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        **transformer_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",),
            up_block_types=("UpDecoderBlock2D",),
            block_out_channels=(16,),
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=4,
            sample_size=16,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        ).eval()
        clip = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=2 + 2 * len(_LETTERS),
                hidden_size=pooled_dim,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                projection_dim=pooled_dim,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
            )
        ).eval()
        t5 = T5EncoderModel(
            T5Config(
                vocab_size=3 + 2 * len(_LETTERS) + 1,
                d_model=text_dim,
                d_kv=8,
                d_ff=37,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                pad_token_id=0,
                eos_token_id=1,
            )
        ).eval()
    with tempfile.TemporaryDirectory() as folder:
        clip_tokenizer = _clip_tokenizer(Path(folder))
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=clip,
        tokenizer=clip_tokenizer,
        text_encoder_2=t5,
        tokenizer_2=_t5_tokenizer(),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
