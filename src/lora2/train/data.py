"""Training images: loading with every fault either handled or named, transforms, and a deterministic order.

Decisions (documented for users):

- Files whose extension is not an image extension (``.DS_Store``; captions when captions are off) are skipped with
  a warning that names each of them; a folder with no image at all is an error. Caption files are data when
  captions are on (``lora2.train.captions``), and so is a ``masks/`` folder (``lora2.train.masks``).
- A file with an image extension that cannot be decoded (corrupt or truncated JPEG, a text file named ``.jpg``)
  is an error naming the file: it is never dropped.
- EXIF orientation is applied (``ImageOps.exif_transpose``); grayscale, palette, CMYK and RGBA/LA images are
  converted to RGB (transparency composited on white); 16-bit and 32-bit integer or float images are rescaled to
  8 bits from their full range (PIL's plain ``convert`` would clip them to white).
- Each image is resized (bicubic) to cover its training size — resolution × resolution, or its aspect-ratio bucket
  (``lora2.train.buckets``) — then cropped to it (centre, or random), its mask (if any) resized and cropped alike.
  Images smaller than that size are upscaled with a warning naming the file (``small_images="upscale"``, the
  default) or rejected (``small_images="error"``).

The sample order is a pure function of (seed, step): epoch ``e`` visits the images in ``randperm(n)`` drawn from a
generator seeded with (seed, e), and process ``p`` of ``w`` takes its slice of every global batch. Exact resume
needs no data-loader state.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def list_images(folder: str | Path, companions: Collection[str] = ()) -> list[Path]:
    """Image files of a folder, sorted; warns about (and names) every other file except the ``companions`` (names of
    files that belong to the data, such as caption files); errors on an empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    entries = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES and p.name not in companions]
    if skipped:
        logger.warning("%s: skipping %d non-image file(s): %s", folder, len(skipped), ", ".join(skipped))
    if not images:
        raise ValueError(f"image folder {folder} holds no images (extensions {', '.join(IMAGE_SUFFIXES)})")
    return images


def to_8bit_rgb(image: Image.Image, path: Path) -> Image.Image:
    """RGB 8-bit from any PIL mode, rescaling high-bit-depth data instead of clipping it."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)  # (H, W)
        if image.mode.startswith("I;16"):
            array = array / 65535.0
        elif image.mode == "I":
            array = array / (65535.0 if array.max() > 255 else 255.0)
        else:  # float images: assume [0, 1] unless the data say otherwise
            high = array.max()
            array = array / (high if high > 1.0 else 1.0)
        gray = Image.fromarray(np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8), mode="L")
        return gray.convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode != "RGB":
        try:
            return image.convert("RGB")
        except (ValueError, OSError) as error:
            raise ValueError(f"{path}: cannot convert image mode {image.mode!r} to RGB ({error})") from error
    return image


def open_upright(path: str | Path, what: str = "image") -> Image.Image:
    """Open an image file fully decoded and upright (EXIF orientation applied), in its own mode; ``ValueError``
    naming the file (as ``what``) when it cannot be decoded."""
    try:
        with Image.open(path) as handle:
            handle.load()
            image = ImageOps.exif_transpose(handle)
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read {what} {path}: {error}") from error
    return image


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully decoded, upright (EXIF) and in 8-bit RGB; ``ValueError`` naming the file otherwise."""
    path = Path(path)
    image = open_upright(path)
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image {path} is empty ({image.width}x{image.height})")
    return to_8bit_rgb(image, path)


@dataclass
class TrainImage:
    """One training image, resized to cover its training size.

    original_size: (height, width) of the file as loaded (SDXL's size conditioning).
    target: (height, width) it is cropped to: (resolution, resolution), or its aspect-ratio bucket.
    mask: loss weights (mode "L", the size of ``image``) for the masked loss, or None.
    """

    path: Path
    image: Image.Image
    original_size: tuple[int, int]
    target: tuple[int, int]
    mask: Image.Image | None = None


def fit(item: TrainImage, target: tuple[int, int], small_images: str | None = "upscale") -> TrainImage:
    """``item`` resized (bicubic; its mask bilinear) to cover ``target`` (height, width): the smallest size holding
    it with the aspect ratio kept. Upscaling warns naming the file (``small_images="upscale"``), is refused
    (``"error"``), or is silent (None: class images re-fitted to a bucket)."""
    width, height = item.image.size
    scale = max(target[0] / height, target[1] / width)
    if scale > 1 and small_images is not None:
        if small_images == "error":
            raise ValueError(
                f"image {item.path} is {width}x{height}, smaller than its training size {target[1]}x{target[0]} "
                "(use --small-images upscale to upscale it)"
            )
        logger.warning("image %s is %dx%d, upscaled to cover %dx%d", item.path, width, height, target[1], target[0])
    size = (max(target[1], round(width * scale)), max(target[0], round(height * scale)))
    image, mask = item.image, item.mask
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
        mask = mask.resize(size, Image.Resampling.BILINEAR) if mask is not None else None
    return TrainImage(item.path, image, item.original_size, target, mask)


def prepare_image(
    path: str | Path, target: int | tuple[int, int], small_images: str = "upscale", mask: Image.Image | None = None
) -> TrainImage:
    """Load an image and fit it to ``target`` (a square side, or (height, width)); small images are upscaled with a
    warning or refused. ``mask``: its loss weights at the file's size (``lora2.train.masks.load_mask``)."""
    image = load_image(path)
    target = (target, target) if isinstance(target, int) else tuple(target)
    return fit(TrainImage(Path(path), image, (image.height, image.width), target, mask), target, small_images)


def crop_and_flip(
    item: TrainImage, center_crop: bool, flip: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, tuple[int, int], torch.Tensor | None]:
    """Crop to ``item.target`` (centre, or random from ``generator``), optional horizontal flip, scaled to [−1, 1].

    Returns the pixels (3, H, W), SDXL's crop_top_left in the resized image, and the mask cropped and flipped alike
    (1, H, W) in [0, 1], or None.
    """
    width, height = item.image.size
    crop_h, crop_w = item.target
    if center_crop:
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
    else:
        top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
    box = (left, top, left + crop_w, top + crop_h)
    image = item.image.crop(box)
    mask = item.mask.crop(box) if item.mask is not None else None
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if mask is not None else None
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (H, W, 3)
    pixels = torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)
    if mask is None:
        return pixels, (top, left), None
    return pixels, (top, left), torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]  # (1, H, W)


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    """The visiting order of one epoch: randperm(n) from a generator seeded with (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_items, generator=generator)  # (n,)


def batch_indices(
    num_items: int, seed: int, micro_step: int, batch_size: int, process: int = 0, world_size: int = 1
) -> list[int]:
    """Item indices of one process's slice of global micro-batch ``micro_step`` (epochs chained without gaps)."""
    start = (micro_step * world_size + process) * batch_size
    indices = []
    cache: dict[int, torch.Tensor] = {}
    for position in range(start, start + batch_size):
        epoch, offset = divmod(position, num_items)
        if epoch not in cache:
            cache[epoch] = epoch_permutation(num_items, seed, epoch)
        indices.append(int(cache[epoch][offset]))
    return indices
