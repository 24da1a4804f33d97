"""Training images: loading with every fault either handled or named, transforms, and a deterministic order.

Decisions (documented for users):

- Files whose extension is not an image extension (captions, ``.DS_Store``) are skipped with a warning that
  names each of them; a folder with no image at all is an error.
- A file with an image extension that cannot be decoded (corrupt or truncated JPEG, a text file named ``.jpg``)
  is an error naming the file: it is never dropped.
- EXIF orientation is applied (``ImageOps.exif_transpose``); grayscale, palette, CMYK and RGBA/LA images are
  converted to RGB (transparency composited on white); 16-bit and 32-bit integer or float images are rescaled to
  8 bits from their full range (PIL's plain ``convert`` would clip them to white).
- Images whose shorter side is below the training resolution are upscaled (bicubic) with a warning naming the file
  (``small_images="upscale"``, the default) or rejected (``small_images="error"``).

The sample order is a pure function of (seed, step): epoch ``e`` visits the images in ``randperm(n)`` drawn from a
generator seeded with (seed, e), and process ``p`` of ``w`` takes its slice of every global batch. Exact resume
needs no data-loader state.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def list_images(folder: str | Path) -> list[Path]:
    """Image files of a folder, sorted; warns about (and names) every other file; errors on an empty folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    entries = sorted(p for p in folder.iterdir() if p.is_file())
    images = [p for p in entries if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [p.name for p in entries if p.suffix.lower() not in IMAGE_SUFFIXES]
    if skipped:
        logger.warning("%s: skipping %d non-image file(s): %s", folder, len(skipped), ", ".join(skipped))
    if not images:
        raise ValueError(f"image folder {folder} holds no images (extensions {', '.join(IMAGE_SUFFIXES)})")
    return images


def _to_8bit_rgb(image: Image.Image, path: Path) -> Image.Image:
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


def load_image(path: str | Path) -> Image.Image:
    """Open an image fully decoded, upright (EXIF) and in 8-bit RGB; ``ValueError`` naming the file otherwise."""
    path = Path(path)
    try:
        with Image.open(path) as handle:
            handle.load()
            image = ImageOps.exif_transpose(handle)
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    if image.width < 1 or image.height < 1:
        raise ValueError(f"image {path} is empty ({image.width}x{image.height})")
    return _to_8bit_rgb(image, path)


@dataclass
class TrainImage:
    """One training image resized so that its shorter side equals the resolution.

    original_size: (height, width) of the file as loaded (SDXL's size conditioning).
    """

    path: Path
    image: Image.Image
    original_size: tuple[int, int]


def prepare_image(path: str | Path, resolution: int, small_images: str = "upscale") -> TrainImage:
    """Load and resize (shorter side → resolution, bicubic); small images are upscaled with a warning or refused."""
    image = load_image(path)
    original_size = (image.height, image.width)
    shorter = min(image.size)
    if shorter < resolution:
        if small_images == "error":
            raise ValueError(
                f"image {path} is {image.width}x{image.height}, smaller than the resolution {resolution} "
                "(use --small-images upscale to upscale it)"
            )
        logger.warning("image %s is %dx%d, upscaled to the resolution %d", path, image.width, image.height, resolution)
    scale = resolution / shorter
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    if size != image.size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    return TrainImage(Path(path), image, original_size)


def crop_and_flip(
    item: TrainImage, resolution: int, center_crop: bool, flip: bool, generator: torch.Generator | None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """Square crop (center, or random from ``generator``), optional horizontal flip, scaled to [−1, 1].

    Returns the pixels (3, resolution, resolution) and SDXL's crop_top_left in the resized image.
    """
    width, height = item.image.size
    if center_crop:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top = int(torch.randint(0, height - resolution + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - resolution + 1, (1,), generator=generator))
    image = item.image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0  # (R, R, 3)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), (top, left)  # (3, R, R)


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
