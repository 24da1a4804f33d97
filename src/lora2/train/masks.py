"""Masked loss (kohya's ``--masked_loss``): a weight per pixel of an instance image, applied to the loss in latents.

Where a mask comes from, in order: ``masks/<image stem>.<any image suffix>`` inside the instance folder (grayscale or
RGB, converted to 8-bit luminance), else the image's alpha channel (PNG/WebP with transparency). White (255) weighs
1, black 0, gray in between. An image without either trains unmasked (weight 1), with a warning naming it. A mask whose
size differs from its image's is an error naming both files (EXIF orientation is applied to both first).

The mask follows the image through resize, crop and flip (``lora2.train.data``), is reduced to the latent size by area
averaging, and multiplies the squared error before its mean (kohya's ``apply_masked_loss``: the loss of a half-masked
image is half as large, not renormalised). Class (prior-preservation) images are never masked.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from lora2.train.data import IMAGE_SUFFIXES, open_upright, to_8bit_rgb

logger = logging.getLogger(__name__)

MASKS_DIR = "masks"


def mask_file(image_path: Path) -> Path | None:
    """The file of ``masks/`` named like the image (same stem, any image suffix); ``ValueError`` if several are."""
    folder = image_path.parent / MASKS_DIR
    if not folder.is_dir():
        return None
    found = sorted(p for p in folder.iterdir() if p.stem == image_path.stem and p.suffix.lower() in IMAGE_SUFFIXES)
    if len(found) > 1:
        raise ValueError(f"{image_path}: several masks match it ({', '.join(p.name for p in found)}); keep one")
    return found[0] if found else None


def load_mask(image_path: Path, image_size: tuple[int, int]) -> Image.Image | None:
    """The mask of an image (mode "L", ``image_size`` (width, height) as loaded), or None when it has none."""
    path = mask_file(image_path)
    if path is not None:
        mask = open_upright(path, "mask")
        source = path
    else:
        mask = open_upright(image_path, "mask")
        source = image_path
        if mask.mode == "P" and "transparency" in mask.info:
            mask = mask.convert("RGBA")
        if mask.mode not in ("RGBA", "LA", "PA"):
            return None
        mask = mask.getchannel("A")
    if mask.size != image_size:
        raise ValueError(
            f"mask {source} is {mask.size[0]}x{mask.size[1]} but its image {image_path} is "
            f"{image_size[0]}x{image_size[1]}: a mask must have its image's size"
        )
    return mask if mask.mode == "L" else to_8bit_rgb(mask, source).convert("L")


def warn_unmasked(paths: list[Path]) -> None:
    if paths:
        logger.warning(
            "--masked-loss: %d image(s) have no mask (no masks/ file, no alpha channel) and train unmasked: %s",
            len(paths), ", ".join(p.name for p in paths),
        )  # fmt: skip


def latent_mask(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel mask (1, H, W) in [0, 1] reduced to the latent size (h, w) by area averaging: (1, h, w)."""
    return F.interpolate(mask[None], size=size, mode="area")[0]  # (1, h, w)
