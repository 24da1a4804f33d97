"""Base pipelines for training: SDXL-type (SDXL, KOALA) and SD 1.5, their prompt encoding and conditioning."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from torch import nn

from lora2.logs import quiet_pipeline_load

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """The parts of a base pipeline that training uses.

    kind: "sdxl" (two text encoders, pooled embeddings, size/crop conditioning) or "sd15".
    noise_scheduler: a DDPMScheduler built from the pipeline's scheduler config (training noise schedule).
    """

    pipe: DiffusionPipeline
    kind: str
    unet: nn.Module
    vae: nn.Module
    tokenizers: list
    text_encoders: list[nn.Module]
    noise_scheduler: DDPMScheduler

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def world_path(key: str) -> Path | None:
    """Path of a built-in world asset ("base_model", "subjects_dir", "dino_evaluator", "clip_evaluator") once built."""
    from lora2.world import info

    world = info()
    return Path(world[key]) if world["ready"].get(key) else None


def resolve_base(base: str) -> str:
    """The base model to use: the given hub id / folder (checked), else the built-in world model once it is ready.

    A folder must hold a diffusers pipeline (``model_index.json``); a name that looks like a path (absolute, ``./``,
    ``~``, or more than one ``/``) must exist; anything else is taken for a hub id.
    """
    if not base:
        path = world_path("base_model")
        if path is None:
            raise ValueError("no --base given and the built-in world base model is not built; pass --base PATH_OR_ID")
        return str(path)
    path = Path(base).expanduser()
    if path.exists():
        if not (path / "model_index.json").is_file():
            raise ValueError(f"base model folder {base} has no model_index.json (not a diffusers pipeline folder)")
        return str(path)
    if base.startswith(("/", ".", "~")) or base.count("/") > 1:
        raise ValueError(f"base model folder not found: {base}")
    return base


def _load_error(base: str, error: Exception) -> ValueError:
    offline = " (offline: HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ValueError(f"cannot load base model {base!r}{offline}: {first}")


def native_resolution(base: str, revision: str | None = None) -> int:
    """The base model's native image side: UNet sample size × VAE downsampling (1024 for SDXL, 64 for the world)."""
    try:
        unet = UNet2DConditionModel.load_config(base, subfolder="unet", revision=revision)
        vae = AutoencoderKL.load_config(base, subfolder="vae", revision=revision)
    except (OSError, ValueError) as error:
        raise _load_error(base, error) from error
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def load_components(
    base: str, revision: str | None = None, variant: str | None = None, kind: str = "auto"
) -> Components:
    """Load a pipeline (hub id or local folder) in fp32 and pick out its parts; ``kind`` "auto" detects it."""
    try:
        with quiet_pipeline_load():
            pipe = DiffusionPipeline.from_pretrained(
                base, revision=revision, variant=variant, torch_dtype=torch.float32
            )
    except OSError as error:
        raise _load_error(base, error) from error
    pipe.set_progress_bar_config(disable=True)  # samples and class images: the trainer shows its own progress
    detected = "sdxl" if getattr(pipe, "text_encoder_2", None) is not None else "sd15"
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise ValueError(f"base model {base} ({type(pipe).__name__}) is not a UNet/VAE pipeline (SDXL, KOALA, SD 1.5)")
    if kind not in ("auto", detected):
        raise ValueError(f"--model-type {kind} but {base} is a {type(pipe).__name__} ({detected})")
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if detected == "sdxl" else [])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if detected == "sdxl" else [])
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    logger.info("loaded %s (%s) from %s", type(pipe).__name__, detected, base)
    return Components(pipe, detected, pipe.unet, pipe.vae, tokenizers, encoders, noise_scheduler)


def tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's max length: (B, T)."""
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def encode_prompts(components: Components, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text conditioning as diffusers' SDXL/SD training scripts compute it (gradients flow if encoders train).

    SDXL: penultimate hidden states of both encoders concatenated (B, T, D1 + D2) and the pooled projection of the
    second (B, P). SD 1.5: last hidden state (B, T, D) and no pooled output.
    """
    device = components.unet.device
    if components.kind == "sd15":
        ids = tokenize(components.tokenizers[0], prompts).to(device)  # (B, T)
        return components.text_encoders[0](ids)[0], None  # (B, T, D)
    hidden, pooled = [], None
    for tokenizer, encoder in zip(components.tokenizers, components.text_encoders):
        ids = tokenize(tokenizer, prompts).to(device)  # (B, T)
        output = encoder(ids, output_hidden_states=True)
        pooled = output[0]  # (B, P) text_embeds of the projection model (the last encoder)
        hidden.append(output.hidden_states[-2])  # (B, T, D_i)
    return torch.cat(hidden, dim=-1), pooled  # (B, T, ΣD_i), (B, P)


def add_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL micro-conditioning (original size, crop top-left, target size), each (height, width): (6,)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def identifier_positions(tokenizer, prompt: str, identifier: str) -> list[int]:
    """Positions of the identifier's tokens in the tokenized prompt; ``ValueError`` when it is absent."""
    ids = tokenize(tokenizer, [prompt])[0].tolist()
    word = tokenizer(identifier, add_special_tokens=False).input_ids
    for start in range(len(ids) - len(word) + 1):
        if ids[start : start + len(word)] == word:
            return list(range(start, start + len(word)))
    raise ValueError(f"identifier {identifier!r} does not occur (as tokens {word}) in the instance prompt {prompt!r}")


@torch.no_grad()
def latent_distribution(vae: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE posterior, scaled by the VAE's scaling factor: two (B, C, h, w) tensors."""
    dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((dist.mean - shift) * scale).float(), (dist.std * scale).float()
