"""The training samples of each micro-batch: VAE latents, SDXL time ids and prompt embeddings, cached once.

The latent cache maps (kind, index, flipped) to the VAE posterior (mean, std, crop) when images are center-cropped
(the VAE is frozen); otherwise images are cropped, flipped and encoded on the fly. The prompt cache maps a kind
("instance", "class") to its (embeddings, pooled) when the text encoders are frozen. Once both caches cover every
sample, the VAE and the text encoders are not needed for training (the recipe moves them off the GPU).

Random state: flips, random crops and the posterior noise come from the trainer's own generator, in sample order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from lora2.train.config import TrainConfig
from lora2.train.data import TrainImage, batch_indices, crop_and_flip
from lora2.train.distributed import Processes
from lora2.train.model import Components, add_time_ids, latent_distribution

Encoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class TrainingData:
    """Micro-batches of instance samples, followed by as many class samples when prior preservation is on."""

    config: TrainConfig
    components: Components
    images: dict[str, list[TrainImage]]
    prompts: dict[str, str | None]
    generator: torch.Generator
    device: torch.device
    processes: Processes
    encode: Encoder
    latent_cache: dict[tuple[str, int, bool], tuple] = field(default_factory=dict)
    prompt_cache: dict[str, tuple] = field(default_factory=dict)

    @property
    def caches_latents(self) -> bool:
        return self.config.cache_latents and self.config.center_crop

    @property
    def caches_prompts(self) -> bool:
        return not self.config.train_text_encoder

    def fill_caches(self) -> None:
        config, vae = self.config, self.components.vae
        if self.caches_prompts:
            with torch.no_grad():
                self.prompt_cache = {
                    kind: self.encode([self.prompts[kind]]) for kind in self.images if self.images[kind]
                }
        if self.caches_latents:
            for kind, items in self.images.items():
                for index, item in enumerate(items):
                    for flip in (False, True) if config.random_flip else (False,):
                        pixels, crop = crop_and_flip(item, config.resolution, True, flip, None)  # (3, R, R)
                        mean, std = latent_distribution(vae, pixels[None])  # (1, C, h, w) each
                        self.latent_cache[(kind, index, flip)] = (mean, std, crop)

    def samples(self, micro_step: int) -> list[tuple[str, int]]:
        """(kind, index) of this process's samples: instance samples first, then as many class samples."""
        seeds = {"instance": self.config.seed, "class": self.config.seed + 1}
        rank, world = self.processes.rank, self.processes.world_size
        return [
            (kind, index)
            for kind, items in self.images.items()
            if items
            for index in batch_indices(len(items), seeds[kind], micro_step, self.config.train_batch_size, rank, world)
        ]

    def latents(self, samples: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents sampled from the VAE posterior (B, C, h, w) and SDXL time ids (B, 6)."""
        config, latents, time_ids = self.config, [], []
        for kind, index in samples:
            item = self.images[kind][index]
            flip = config.random_flip and bool(torch.rand((), generator=self.generator) < 0.5)
            if self.latent_cache:
                mean, std, crop = self.latent_cache[(kind, index, flip)]
            else:
                pixels, crop = crop_and_flip(item, config.resolution, config.center_crop, flip, self.generator)
                mean, std = latent_distribution(self.components.vae, pixels[None])  # (1, C, h, w) each
            noise = torch.randn(mean.shape, generator=self.generator).to(self.device)  # (1, C, h, w)
            latents.append(mean.to(self.device) + std.to(self.device) * noise)
            time_ids.append(add_time_ids(item.original_size, crop, (config.resolution, config.resolution)))
        return torch.cat(latents), torch.stack(time_ids).to(self.device)  # (B, C, h, w), (B, 6)

    def text(self, kinds: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings (B, T, D) and pooled embeddings (B, P) or None, from the cache or the encoders."""
        if not self.prompt_cache:
            return self.encode([self.prompts[kind] for kind in kinds])
        parts = [self.prompt_cache[kind] for kind in kinds]
        pooled = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None  # (B, P)
        return torch.cat([p[0] for p in parts]), pooled  # (B, T, D)
