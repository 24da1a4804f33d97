"""The training samples of each micro-batch: VAE latents, SDXL time ids, loss masks and prompt embeddings.

A micro-batch is this process's instance samples (square crops, or one aspect-ratio bucket: ``lora2.train.buckets``)
followed by as many class samples, cropped to the same size (a class image re-fitted to the instance bucket).

The latent cache maps (kind, index, flipped, size) to the VAE posterior (mean, std, crop, latent mask) when images are
center-cropped (the VAE is frozen); otherwise images are cropped, flipped and encoded on the fly. The prompt cache maps
a prompt's text (the instance prompt, each caption, the class prompt, '' under caption dropout) to its (embeddings,
pooled) when the text encoders are frozen and captions are not shuffled. Once both caches cover every sample, the VAE
and the text encoders are not needed for training (the recipe moves them off the GPU).

Random state: flips, random crops, the posterior noise and caption dropout/shuffling come from the trainer's own
generator, in sample order.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from lora2.train.buckets import bucket_batch_indices, bucket_sizes, nearest_bucket
from lora2.train.captions import augment
from lora2.train.config import TrainConfig
from lora2.train.data import TrainImage, batch_indices, crop_and_flip, fit, load_image, prepare_image
from lora2.train.distributed import Processes
from lora2.train.masks import latent_mask, load_mask, warn_unmasked
from lora2.train.model import Components, add_time_ids, latent_distribution

logger = logging.getLogger(__name__)

Encoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]


class Sample(NamedTuple):
    """One sample of a micro-batch: ``images[kind][index]`` cropped to ``target`` (height, width)."""

    kind: str
    index: int
    target: tuple[int, int]


def instance_images(paths: list[Path], config: TrainConfig) -> list[TrainImage]:
    """The instance images fitted to their training sizes (square, or the nearest bucket), with their masks."""
    buckets = bucket_sizes(config.resolution) if config.aspect_buckets else None
    images, unmasked = [], []
    for path in paths:
        image = load_image(path)
        mask = load_mask(path, image.size) if config.masked_loss else None
        if config.masked_loss and mask is None:
            unmasked.append(path)
        size = (image.height, image.width)
        target = nearest_bucket(size, buckets) if buckets else (config.resolution, config.resolution)
        images.append(fit(TrainImage(path, image, size, target, mask), target, config.small_images))
    warn_unmasked(unmasked)
    if buckets:
        counts = Counter(item.target for item in images)
        logger.info("aspect-ratio buckets (height x width: images): %s",
                    ", ".join(f"{h}x{w}: {n}" for (h, w), n in sorted(counts.items())))  # fmt: skip
    return images


def prior_images(paths: list[Path], config: TrainConfig) -> list[TrainImage]:
    """Prior-preservation images at the square training size (re-fitted to a bucket when one is drawn)."""
    return [prepare_image(p, config.resolution, config.small_images) for p in paths]


@dataclass
class TrainingData:
    """Micro-batches of instance samples, followed by as many class samples when prior preservation is on.

    captions: the instance images' prompts (identifier in, ``lora2.train.captions``), or None: the instance prompt.
    """

    config: TrainConfig
    components: Components
    images: dict[str, list[TrainImage]]
    prompts: dict[str, str | None]
    generator: torch.Generator
    device: torch.device
    processes: Processes
    encode: Encoder
    captions: list[str] | None = None
    latent_cache: dict[tuple, tuple] = field(default_factory=dict)
    prompt_cache: dict[str, tuple] = field(default_factory=dict)
    refits: dict[tuple, TrainImage] = field(default_factory=dict)

    def __post_init__(self) -> None:
        targets = sorted({item.target for item in self.images["instance"]})
        self.bucket_of = [targets.index(item.target) for item in self.images["instance"]]

    @property
    def training_sizes(self) -> int:
        """How many latent sizes the instance samples come in (1 without aspect-ratio buckets)."""
        return len(set(self.bucket_of))

    @property
    def caches_latents(self) -> bool:
        return self.config.cache_latents and self.config.center_crop

    @property
    def caches_prompts(self) -> bool:
        return not self.config.train_text_encoder and not self.config.shuffle_caption

    @property
    def varies_prompts(self) -> bool:
        """Instance samples are not all trained with the instance prompt (captions, dropout or shuffling)."""
        config = self.config
        return self.captions is not None or config.caption_dropout_rate > 0 or config.shuffle_caption

    def fill_caches(self) -> None:
        config = self.config
        if self.caches_prompts:
            texts = [*(self.captions or [self.prompts["instance"]]), self.prompts["class"]]
            texts += [""] if config.caption_dropout_rate > 0 else []
            with torch.no_grad():
                self.prompt_cache = {text: self.encode([text]) for text in dict.fromkeys(texts) if text is not None}
        if self.caches_latents:
            instance_targets = sorted({item.target for item in self.images["instance"]})
            for kind, items in self.images.items():
                for index, item in enumerate(items):
                    for target in [item.target] if kind == "instance" else instance_targets:
                        for flip in (False, True) if config.random_flip else (False,):
                            self.latent_cache[(kind, index, flip, target)] = self._encode(
                                Sample(kind, index, target), flip
                            )

    def samples(self, micro_step: int) -> list[Sample]:
        """This process's samples: a batch of instance samples (of one bucket), then as many class samples."""
        config, batch = self.config, self.config.train_batch_size
        rank, world = self.processes.rank, self.processes.world_size
        instance = self.images["instance"]
        if config.aspect_buckets:
            indices = bucket_batch_indices(self.bucket_of, config.seed, micro_step, batch, rank, world)
        else:
            indices = batch_indices(len(instance), config.seed, micro_step, batch, rank, world)
        target = instance[indices[0]].target
        samples = [Sample("instance", index, target) for index in indices]
        if self.images["class"]:
            count = len(self.images["class"])
            indices = batch_indices(count, config.seed + 1, micro_step, batch, rank, world)
            samples += [Sample("class", index, target) for index in indices]
        return samples

    def _fitted(self, sample: Sample) -> TrainImage:
        """The image of a sample, fitted to the sample's size (a class image re-fitted to a bucket, once)."""
        item = self.images[sample.kind][sample.index]
        if item.target == sample.target:
            return item
        key = (sample.kind, sample.index, sample.target)
        if key not in self.refits:
            self.refits[key] = fit(item, sample.target, small_images=None)
        return self.refits[key]

    def _encode(self, sample: Sample, flip: bool) -> tuple:
        """(posterior mean, std, crop, latent mask or None) of a sample; a random crop draws from the generator."""
        item = self._fitted(sample)
        pixels, crop, mask = crop_and_flip(item, self.config.center_crop, flip, self.generator)  # (3, H, W)
        mean, std = latent_distribution(self.components.vae, pixels[None])  # (1, C, h, w) each
        return mean, std, crop, latent_mask(mask, mean.shape[-2:])[None] if mask is not None else None

    def latents(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Latents sampled from the VAE posterior (B, C, h, w), SDXL time ids (B, 6) and, with the masked loss, the
        loss weights at the latent size (B, 1, h, w) (ones for class images and images without a mask)."""
        config, latents, time_ids, masks = self.config, [], [], []
        for sample in samples:
            flip = config.random_flip and bool(torch.rand((), generator=self.generator) < 0.5)
            if self.caches_latents:
                mean, std, crop, mask = self.latent_cache[(sample.kind, sample.index, flip, sample.target)]
            else:
                mean, std, crop, mask = self._encode(sample, flip)
            noise = torch.randn(mean.shape, generator=self.generator).to(self.device)  # (1, C, h, w)
            latents.append(mean.to(self.device) + std.to(self.device) * noise)
            original_size = self.images[sample.kind][sample.index].original_size
            time_ids.append(add_time_ids(original_size, crop, sample.target))
            masks.append(mask if mask is not None and sample.kind == "instance" else torch.ones_like(mean[:, :1]))
        weights = torch.cat(masks).to(self.device) if config.masked_loss else None  # (B, 1, h, w)
        return torch.cat(latents), torch.stack(time_ids).to(self.device), weights  # (B, C, h, w), (B, 6)

    def prompt(self, sample: Sample) -> str:
        """The prompt of a sample this step: the class prompt, or the instance caption after dropout/shuffling."""
        config = self.config
        if sample.kind == "class":
            return self.prompts["class"]
        caption = self.captions[sample.index] if self.captions is not None else self.prompts["instance"]
        if config.caption_dropout_rate > 0 or config.shuffle_caption:
            caption = augment(
                caption, config.caption_dropout_rate, config.shuffle_caption, config.keep_tokens, self.generator
            )
        return caption

    def text(self, samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings (B, T, D) and pooled embeddings (B, P) or None, from the cache or the encoders."""
        prompts = [self.prompt(sample) for sample in samples]
        if not self.caches_prompts:
            return self.encode(prompts)
        parts = [self.prompt_cache[prompt] for prompt in prompts]
        pooled = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None  # (B, P)
        return torch.cat([p[0] for p in parts]), pooled  # (B, T, D)
