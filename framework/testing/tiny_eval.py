"""Tiny feature models for ``tokenreduce eval --model`` without downloads.

``save_tiny_clip`` and ``save_tiny_dino`` write a randomly initialised CLIP (model and processor)
and a ViT standing in for DINO to folders, which ``--clip-model`` and ``--dino-model`` load by
path exactly as they would load real weights. The numbers they give mean nothing; the code path
is the real one.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE = 32


def save_tiny_clip(folder: Path, seed: int = 0) -> Path:
    """A tiny random ``CLIPModel`` + ``CLIPProcessor`` (offline tokenizer) saved to ``folder``."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from tokenreduce.testing.tiny_sdxl import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer(max_length=32)
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    model.save_pretrained(folder)
    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=size)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(folder)
    return folder


def save_tiny_dino(folder: Path, seed: int = 0) -> Path:
    """A tiny random ``ViTModel`` + ``ViTImageProcessor`` (the DINO role) saved to ``folder``."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(
        image_size=IMAGE_SIZE,
        patch_size=8,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(config)
    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    return folder
