"""``lora2 generate``: images from a base pipeline with a LoRA file loaded by plain ``pipe.load_lora_weights``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from PIL import Image

from lora2.export.api import load_pipeline_lora
from lora2.logs import quiet_pipeline_load
from lora2.train.model import resolve_base

logger = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    """Settings of ``lora2 generate``.

    base: pipeline hub id or folder (default: the built-in world model); lora: adapter file or folder (None: base).
    prompts: one image set per prompt; image j of every prompt uses seed + j (one generator per image).
    out: a ``.png`` file when exactly one image is generated, else a folder receiving ``<prompt>_<image>.png``.
    """

    prompts: list[str] = field(default_factory=list)
    out: str = ""
    base: str = ""
    lora: str | None = None
    seed: int = 0
    num_images: int = 1
    steps: int = 25
    guidance: float = 5.0
    negative_prompt: str | None = None
    height: int | None = None
    width: int | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("give at least one --prompt")
        if not self.out:
            raise ValueError("--out is required (a .png file or a folder)")
        for key in ("num_images", "steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")


def load_pipeline(
    base: str, lora: str | Path | None, device: torch.device, dtype: torch.dtype = torch.float32
) -> DiffusionPipeline:
    """The base pipeline with the adapter loaded through diffusers' own loader, after the file checks of
    ``lora2 inspect`` and a check of every module's name and shape against the pipeline (``load_pipeline_lora``).
    Used by ``lora2 generate`` and ``lora2 eval``."""
    if lora is not None and not Path(lora).exists():
        raise ValueError(f"LoRA file not found: {lora}")
    with quiet_pipeline_load():
        pipe = DiffusionPipeline.from_pretrained(resolve_base(base), torch_dtype=dtype)
    if lora is not None:
        load_pipeline_lora(pipe, lora)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def generate(config: GenerateConfig) -> list[Path]:
    """Generate ``num_images`` images per prompt and write them; returns the written paths."""
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else "cpu")
    if config.device != "auto":
        device = torch.device(config.device)
    pipe = load_pipeline(config.base, config.lora, device)
    images: list[Image.Image] = []
    for prompt in config.prompts:
        for index in range(config.num_images):
            generator = torch.Generator().manual_seed(config.seed + index)
            images += pipe(
                prompt,
                negative_prompt=config.negative_prompt,
                num_inference_steps=config.steps,
                guidance_scale=config.guidance,
                height=config.height,
                width=config.width,
                generator=generator,
            ).images
    out = Path(config.out)
    if len(images) == 1 and out.suffix.lower() == ".png":
        out.parent.mkdir(parents=True, exist_ok=True)
        paths = [out]
    else:
        if out.suffix:
            raise ValueError(f"--out {out}: {len(images)} images need a folder, not a file name")
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"{p:02d}_{i:02d}.png" for p in range(len(config.prompts)) for i in range(config.num_images)]
    for image, path in zip(images, paths):
        image.save(path)
    logger.info("wrote %d image(s) to %s", len(paths), out)
    return paths
