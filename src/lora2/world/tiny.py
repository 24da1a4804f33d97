"""Build a real ``StableDiffusionXLPipeline`` directory with random weights, small enough for CPU tests.

The layout and component classes are SDXL's (UNet2DConditionModel with ``text_time`` added conditioning,
CLIPTextModel + CLIPTextModelWithProjection, two CLIP tokenizers, AutoencoderKL, EulerDiscreteScheduler), so code
written for SDXL runs on it unchanged. The tokenizers are the world's (``lora2.world.tokenizer``). Config overrides
let the same function build the larger pretraining base model; sizes that must agree between components
(cross-attention width, added-embedding width, vocabulary, latent channels, sample sizes) are derived unless given.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from lora2.world.tokenizer import build_tokenizer

logger = logging.getLogger(__name__)

TINY_UNET_CONFIG: dict[str, Any] = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1),
    "attention_head_dim": (2, 4),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "norm_num_groups": 32,
    "in_channels": 4,
    "out_channels": 4,
}

TINY_TEXT_CONFIG: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 37,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "projection_dim": 32,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
}

TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "scaling_factor": 0.13025,
}

# SDXL base 1.0 scheduler settings.
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


def _text_encoder(cls: type, config: dict[str, Any], tokenizer, seed: int) -> torch.nn.Module:
    """A randomly initialised CLIP text encoder whose vocabulary and special ids match ``tokenizer``."""
    full = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **config,
    }
    torch.manual_seed(seed)
    return cls(CLIPTextConfig(**full))


def build_tiny_sdxl(
    path: Path,
    seed: int = 0,
    *,
    image_size: int = 64,
    unet_config: dict[str, Any] | None = None,
    text_config: dict[str, Any] | None = None,
    text_config_2: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
    scheduler_config: dict[str, Any] | None = None,
) -> Path:
    """Write a randomly initialised SDXL pipeline directory loadable by ``StableDiffusionXLPipeline.from_pretrained``.

    Args:
        path: output directory (created).
        seed: seed of every component's random initialisation (same seed, same weights).
        image_size: default image side; sets the VAE ``sample_size`` and the UNet ``sample_size`` (latent side).
        unet_config: overrides of ``TINY_UNET_CONFIG`` (UNet2DConditionModel kwargs).
        text_config: overrides of ``TINY_TEXT_CONFIG`` (CLIPTextConfig kwargs) for both text encoders.
        text_config_2: further overrides for the second text encoder (CLIPTextModelWithProjection) only.
        vae_config: overrides of ``TINY_VAE_CONFIG`` (AutoencoderKL kwargs).
        scheduler_config: overrides of ``SDXL_SCHEDULER_CONFIG`` (EulerDiscreteScheduler kwargs).

    Returns:
        ``path``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(path / "tokenizer")
    tokenizer_2 = build_tokenizer(path / "tokenizer_2", pad_token="!")

    text_1 = {**TINY_TEXT_CONFIG, **(text_config or {})}
    text_2 = {**text_1, **(text_config_2 or {})}
    text_encoder = _text_encoder(CLIPTextModel, text_1, tokenizer, seed)
    text_encoder_2 = _text_encoder(CLIPTextModelWithProjection, text_2, tokenizer_2, seed + 1)

    vae_kwargs = {**TINY_VAE_CONFIG, "sample_size": image_size, **(vae_config or {})}
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(**vae_kwargs)
    vae_scale = 2 ** (len(vae_kwargs["block_out_channels"]) - 1)
    if image_size % vae_scale:
        raise ValueError(f"image_size {image_size} is not a multiple of the VAE downsampling factor {vae_scale}")

    unet_kwargs = {
        **TINY_UNET_CONFIG,
        "sample_size": image_size // vae_scale,
        "in_channels": vae_kwargs["latent_channels"],
        "out_channels": vae_kwargs["latent_channels"],
        "cross_attention_dim": text_1["hidden_size"] + text_2["hidden_size"],
        **(unet_config or {}),
    }
    time_dim = unet_kwargs["addition_time_embed_dim"]
    # text_time conditioning: pooled text embedding (projection_dim) + 6 Fourier-embedded size/crop numbers.
    unet_kwargs.setdefault("projection_class_embeddings_input_dim", text_2["projection_dim"] + 6 * time_dim)
    torch.manual_seed(seed + 3)
    unet = UNet2DConditionModel(**unet_kwargs)

    scheduler = EulerDiscreteScheduler(**{**SDXL_SCHEDULER_CONFIG, **(scheduler_config or {})})
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipe.save_pretrained(path, safe_serialization=True)
    n_params = sum(p.numel() for m in (unet, vae, text_encoder, text_encoder_2) for p in m.parameters())
    logger.info("SDXL pipeline (%d parameters, seed %d) -> %s", n_params, seed, path)
    return path
