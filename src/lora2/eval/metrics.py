"""DreamBooth metrics (Ruiz et al., 2023, Sec. 4.1): DINO, CLIP-I and CLIP-T.

- DINO: mean cosine similarity between the ViT CLS embeddings (``last_hidden_state[:, 0]``, self-supervised DINO
  ViT-S/16 by default) of generated and real images, over all (generated, real) pairs.
- CLIP-I: the same with CLIP image embeddings (the projected pooled output).
- CLIP-T: mean cosine similarity between each generated image's CLIP image embedding and the CLIP text embedding
  of its prompt, written without the identifier token (``"a dog in the jungle"``).

All features are L2-normalised, so every score is an average of cosines in [-1, 1]; an image scored against itself
gives 1. Encoders run in fp32 in eval mode under ``torch.no_grad``: scores are deterministic.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open

from lora2.logs import no_load_progress_bars

logger = logging.getLogger(__name__)

DEFAULT_DINO = "facebook/dino-vits16"
DEFAULT_CLIP = "openai/clip-vit-base-patch32"


def _as_rgb(images: Sequence[Image.Image | str | Path]) -> list[Image.Image]:
    out = []
    for image in images:
        if not isinstance(image, Image.Image):
            with Image.open(image) as opened:
                image = opened.convert("RGB")
        out.append(image.convert("RGB"))
    return out


def _features(output) -> torch.Tensor:
    """transformers < 5 returns a tensor from ``get_*_features``; transformers 5 a model output (pooler_output)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _load_error(kind: str, name: str | Path, error: Exception) -> ValueError:
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    offline = " (HF_HUB_OFFLINE is set: only local folders and the hub cache are read)" if hub_offline() else ""
    return ValueError(
        f"cannot load the {kind} evaluator from {str(name)!r}{offline} ({type(error).__name__}: {first}); pass a "
        f"local model folder (--{kind.lower()}-model), or evaluate with the world's base model or a world subject, "
        "whose evaluators are local"
    )


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: loaders read local files only and never retry the network."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no", "off")


def _has_pooler(name: str | Path) -> bool:
    """Whether a local ViT folder's safetensors weights hold ViT's pooler (the world's DINO evaluator, saved by a plain
    ``ViTModel``, does); False for hub ids and folders without safetensors (DINO checkpoints have no pooler)."""
    folder = Path(name)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        keys = list(json.loads(index.read_text())["weight_map"])
    elif (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            keys = list(handle.keys())
    else:
        return False
    return any(key.startswith("pooler.") for key in keys)


class _Encoder:
    """A frozen fp32 model in eval mode with its processor, run in batches."""

    def __init__(self, model: torch.nn.Module, processor, device: str | torch.device = "cpu", batch_size: int = 16):
        self.model = model.to(device=device, dtype=torch.float32).eval()
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size


class DinoEncoder(_Encoder):
    """ViT CLS-token image embeddings (DINO metric), from a hub id or a local ViTModel-like folder."""

    @classmethod
    def from_pretrained(cls, name: str | Path = DEFAULT_DINO, device: str | torch.device = "cpu") -> DinoEncoder:
        """Load ``AutoModel`` + ``AutoImageProcessor`` from ``name`` (hub id or folder)."""
        from transformers import AutoConfig, AutoImageProcessor, AutoModel

        try:
            # the CLS token is read before ViT's pooler; the pooler is built exactly when the checkpoint has one, so
            # that transformers reports no missing or unused weights (the pooler is never run)
            local = {"local_files_only": hub_offline()}  # never a network retry when offline
            config = AutoConfig.from_pretrained(str(name), **local)
            kwargs = {"add_pooling_layer": _has_pooler(name)} if config.model_type == "vit" else {}
            with no_load_progress_bars():
                model = AutoModel.from_pretrained(str(name), **kwargs, **local)
            processor = AutoImageProcessor.from_pretrained(str(name), **local)
        except (OSError, ValueError) as error:
            raise _load_error("DINO", name, error) from error
        return cls(model, processor, device)

    @torch.no_grad()
    def encode(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """L2-normalised CLS embeddings, shape (N, hidden)."""
        images = _as_rgb(images)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor(images=images[start : start + self.batch_size], return_tensors="pt")
            pixels = pixels["pixel_values"].to(self.device, torch.float32)  # (n, 3, H, W)
            hidden = self.model(pixel_values=pixels).last_hidden_state  # (n, 1 + patches, hidden)
            chunks.append(F.normalize(hidden[:, 0].float(), dim=-1).cpu())  # (n, hidden)
        return torch.cat(chunks)


class ClipEncoder(_Encoder):
    """CLIP image and text embeddings (CLIP-I, CLIP-T), from a hub id or a local CLIPModel folder."""

    @classmethod
    def from_pretrained(cls, name: str | Path = DEFAULT_CLIP, device: str | torch.device = "cpu") -> ClipEncoder:
        """Load ``CLIPModel`` + ``CLIPProcessor`` (tokenizer and image processor) from ``name``."""
        from transformers import CLIPModel, CLIPProcessor

        try:
            local = {"local_files_only": hub_offline()}  # never a network retry when offline
            with no_load_progress_bars():
                model = CLIPModel.from_pretrained(str(name), **local)
            processor = CLIPProcessor.from_pretrained(str(name), **local)
        except (OSError, ValueError) as error:
            raise _load_error("CLIP", name, error) from error
        return cls(model, processor, device)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image | str | Path]) -> torch.Tensor:
        """L2-normalised projected image embeddings, shape (N, projection_dim)."""
        images = _as_rgb(images)
        chunks = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.processor.image_processor(
                images=images[start : start + self.batch_size], return_tensors="pt"
            )
            pixels = pixels["pixel_values"].to(self.device, torch.float32)  # (n, 3, H, W)
            features = _features(self.model.get_image_features(pixel_values=pixels))  # (n, projection_dim)
            chunks.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised projected text embeddings, shape (N, projection_dim); texts truncated to the max length."""
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.processor.tokenizer(
                list(texts[start : start + self.batch_size]), padding=True, truncation=True, return_tensors="pt"
            )
            tokens = {key: value.to(self.device) for key, value in tokens.items()}
            features = _features(self.model.get_text_features(**tokens))  # (n, projection_dim)
            chunks.append(F.normalize(features.float(), dim=-1).cpu())
        return torch.cat(chunks)


def mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_j) over all pairs; ``a`` (N, d) and ``b`` (M, d) already L2-normalised."""
    return float((a @ b.T).mean())  # (N, M) -> scalar


def mean_paired_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean of cos(a_i, b_i); ``a`` and ``b`` (N, d) already L2-normalised."""
    return float((a * b).sum(-1).mean())  # (N,) -> scalar


@dataclass
class ReferenceFeatures:
    """Features of a subject's real photos, computed once per subject."""

    dino: torch.Tensor  # (M, d_dino)
    clip: torch.Tensor  # (M, d_clip)


class SubjectScorer:
    """Scores generated images against a subject's real photos and their prompts (DINO, CLIP-I, CLIP-T)."""

    def __init__(self, dino: DinoEncoder, clip: ClipEncoder):
        self.dino = dino
        self.clip = clip

    def reference(self, real_images: Sequence[Image.Image | str | Path]) -> ReferenceFeatures:
        """Encode the real photos of a subject."""
        if not real_images:
            raise ValueError("no real images to compare against")
        return ReferenceFeatures(dino=self.dino.encode(real_images), clip=self.clip.encode_images(real_images))

    def score(
        self, images: Sequence[Image.Image], prompt_without_identifier: str, reference: ReferenceFeatures
    ) -> dict[str, float]:
        """DINO, CLIP-I and CLIP-T of the images generated for one prompt."""
        if not images:
            raise ValueError(f"no generated images for prompt {prompt_without_identifier!r}")
        dino = self.dino.encode(images)  # (N, d_dino)
        clip_image = self.clip.encode_images(images)  # (N, d_clip)
        clip_text = self.clip.encode_texts([prompt_without_identifier])  # (1, d_clip)
        return {
            "dino": mean_pairwise_cosine(dino, reference.dino),
            "clip_i": mean_pairwise_cosine(clip_image, reference.clip),
            "clip_t": mean_paired_cosine(clip_image, clip_text.expand_as(clip_image)),
        }
