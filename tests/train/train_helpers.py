"""Helpers of the trainer tests: image folders and a fast training config."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
from PIL import Image

from lora2.train import recipe
from lora2.train.config import TrainConfig


def write_images(folder: Path, count: int = 3, size: tuple[int, int] = (40, 48), seed: int = 0) -> Path:
    """``count`` random RGB PNGs of ``size`` (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index:02d}.png")
    return folder


def write_photos(folder: Path, seed: int = 0) -> Path:
    """Mixed-aspect photos (3:1, 1:1, 1:3) with .txt captions (one missing, one naming the identifier, one the class)
    and masks (a masks/ file, an alpha channel, one image without): a centred rectangle is learned, the rest not."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = [
        ("wide_a.png", (192, 64), "alpha", "on a bench, sunny, park"),
        ("wide_b.jpg", (200, 70), "file", "dog, grass, running"),
        ("square_a.png", (128, 128), "file", None),
        ("square_b.png", (140, 130), None, "a photo of my dog, indoors"),
        ("tall_a.png", (64, 192), "file", "sks dog sitting, close-up"),
    ]
    for name, (width, height), mask, caption in photos:
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        weights = np.zeros((height, width), dtype=np.uint8)
        weights[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
        Image.fromarray(np.dstack([pixels, weights]) if mask == "alpha" else pixels).save(folder / name)
        if mask == "file":
            Image.fromarray(weights).save(folder / "masks" / (Path(name).stem + ".png"))
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption)
    return folder


def fast_config(base: Path, instance: Path, output_dir: Path, **overrides) -> TrainConfig:
    """A config that trains a few steps at 32 px with 2-step sampling."""
    values = {
        "base": str(base),
        "instance_data_dir": str(instance),
        "class_name": "dog",
        "output_dir": str(output_dir),
        "resolution": 32,
        "max_train_steps": 2,
        "checkpointing_steps": 2,
        "sample_steps": 2,
        "sample_prompts": ["{instance}"],
        "report_to": "none",
        "export_formats": ["diffusers"],
        "device": "cpu",
        **overrides,
    }
    return TrainConfig.from_dict(values)


def build_tiny_sd15(path: Path, seed: int = 0) -> Path:
    """A random tiny StableDiffusionPipeline folder (SD 1.5 layout: one CLIP text encoder, no added conditioning)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lora2.world.tiny import TINY_TEXT_CONFIG, TINY_UNET_CONFIG, TINY_VAE_CONFIG
    from lora2.world.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(path / "tokenizer")
    torch.manual_seed(seed)
    text_config = {
        **TINY_TEXT_CONFIG,
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    vae = AutoencoderKL(**{**TINY_VAE_CONFIG, "sample_size": 64})
    unet_kwargs = {
        k: v for k, v in TINY_UNET_CONFIG.items() if k not in ("addition_embed_type", "addition_time_embed_dim")
    }
    unet = UNet2DConditionModel(**unet_kwargs, sample_size=16, cross_attention_dim=text_config["hidden_size"])
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def train_with_sigterm_at_step(config: TrainConfig, monkeypatch, step: int = 2):
    """``train(config)`` with a SIGTERM arriving during training step ``step`` (the run checkpoints and stops)."""
    calls = {"n": 0}
    real_loss = recipe.diffusion_loss

    def loss_then_sigterm(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(recipe, "diffusion_loss", loss_then_sigterm)
    try:
        return recipe.train(config)
    finally:
        monkeypatch.setattr(recipe, "diffusion_loss", real_loss)
