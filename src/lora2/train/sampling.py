"""Images from the pipeline during a run: prior-preservation class images, validation images, final samples.

All of them run under the run's autocast: the frozen UNet and text encoders may be in half precision while the VAE
stays in fp32 (the SDXL VAE overflows in fp16), and autocast lets the VAE decode half-precision latents.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from lora2.train.config import TrainConfig
from lora2.train.data import IMAGE_SUFFIXES
from lora2.train.model import Components

logger = logging.getLogger(__name__)


@contextmanager
def on_device(modules: list[nn.Module], device: torch.device) -> Iterator[None]:
    """Bring modules parked off the GPU (the VAE, frozen text encoders) to ``device`` for a while."""
    parked = [(module, next(module.parameters()).device) for module in modules]
    for module, _ in parked:
        module.to(device)
    try:
        yield
    finally:
        for module, where in parked:
            module.to(where)


@torch.no_grad()
def generate_class_images(components: Components, config: TrainConfig, prompt: str, folder: Path, autocast) -> None:
    """DreamBooth prior images: keep those in ``folder`` and generate the missing ones with the base pipeline
    (written under a temporary name, then renamed: an interrupted run never leaves half an image)."""
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if config.num_class_images <= len(have):
        return
    logger.info("generating %d class images for %r into %s", config.num_class_images - len(have), prompt, folder)
    for index in tqdm(range(len(have), config.num_class_images), desc="class images"):
        generator = torch.Generator().manual_seed(config.seed + index)
        with autocast:
            image = components.pipe(
                prompt,
                num_inference_steps=config.class_generation_steps,
                height=config.resolution,
                width=config.resolution,
                generator=generator,
            ).images[0]
        path = folder / f"class_{index:05d}.png"
        tmp = folder / f".class_{index:05d}.tmp.png"
        image.save(tmp)
        tmp.replace(path)


@torch.no_grad()
def sample_images(components: Components, config: TrainConfig, prompts: list[str], seed: int, autocast) -> list:
    """One image per prompt from the pipeline as it is (adapters as set), each from ``seed``; RNG untouched."""
    images = []
    with torch.random.fork_rng(devices=[]), autocast:
        for prompt in prompts:
            generator = torch.Generator().manual_seed(seed)
            images.append(
                components.pipe(
                    prompt,
                    num_inference_steps=config.sample_steps,
                    guidance_scale=config.guidance_scale,
                    height=config.resolution,
                    width=config.resolution,
                    generator=generator,
                ).images[0]
            )
    return images
