"""Tiny random models saved from configs (no downloads): CLIP, ViT (DINO stand-in), an SDXL pipeline."""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

ALPHABET = string.ascii_lowercase + string.digits + "!"


def write_tokenizer(path: Path, pad_token: str = "<|endoftext|>"):
    """A character-level CLIP BPE tokenizer (no merges) written to ``path``."""
    from transformers import CLIPTokenizer

    tokens = list(ALPHABET) + [c + "</w>" for c in ALPHABET] + ["<|startoftext|>", "<|endoftext|>"]
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(path, model_max_length=77, pad_token=pad_token)
    tokenizer.save_pretrained(path)
    return tokenizer


def _vocab_size() -> int:
    return 2 * len(ALPHABET) + 2


def build_tiny_clip(path: Path, seed: int = 0) -> Path:
    """A random CLIPModel (32px images) + CLIPProcessor folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=_vocab_size(),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=_vocab_size() - 2,
            eos_token_id=_vocab_size() - 1,
            pad_token_id=_vocab_size() - 1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    tokenizer = write_tokenizer(path.parent / f"{path.name}_tokenizer")
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def build_tiny_vit(path: Path, seed: int = 0) -> Path:
    """A random ViTModel (32px, patch 8) + ViTImageProcessor folder."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8
    )
    ViTModel(config, add_pooling_layer=False).save_pretrained(path)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path
