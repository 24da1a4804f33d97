"""A phone-like photo folder from a DreamBooth subject, for the full-scale run of issue 18's options.

DreamBooth's photos are square; this cuts each into the shapes phones give (3:4 and 4:3, 9:16 and 16:9, 1:1, in turn),
writes a caption per image (``<stem>.txt``, kohya's sidecars: a few comma-separated tags, the class name in some, not
in others) and a mask per image in ``masks/`` (a centred ellipse covering 60 % of each side: DreamBooth subjects sit
near the centre; a stand-in for a real subject mask). Full resolution is kept (no resize).

usage (from the repository root): python benchmarks/photo_folder.py --subject dog --out /data/photos_dog
       [--dreambooth ../shared/datasets/dreambooth]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image, ImageDraw

ASPECTS = (3 / 4, 16 / 9, 1.0, 4 / 3, 9 / 16)  # width / height
TAGS = ("sitting on the floor", "outdoors, daylight", "close-up", "indoors, soft light", "full body")


def cut(photo: Image.Image, aspect: float) -> Image.Image:
    """The largest centred crop of ``photo`` with width / height = ``aspect``."""
    width, height = photo.size
    if width / height > aspect:
        new = round(height * aspect)
        return photo.crop(((width - new) // 2, 0, (width - new) // 2 + new, height))
    new = round(width / aspect)
    return photo.crop((0, (height - new) // 2, width, (height - new) // 2 + new))


def ellipse_mask(size: tuple[int, int], fraction: float = 0.6) -> Image.Image:
    width, height = size
    mask = Image.new("L", size, 0)
    dx, dy = width * (1 - fraction) / 2, height * (1 - fraction) / 2
    ImageDraw.Draw(mask).ellipse((dx, dy, width - dx, height - dy), fill=255)
    return mask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subject", default="dog")
    parser.add_argument("--class-name", default="dog")
    parser.add_argument("--dreambooth", default="../shared/datasets/dreambooth", help="(relative to the repo root)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    source, out = Path(args.dreambooth) / args.subject, Path(args.out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    for index, path in enumerate(photos):
        with Image.open(path) as opened:
            photo = cut(opened.convert("RGB"), ASPECTS[index % len(ASPECTS)])
        photo.save(out / f"IMG_{index:04d}.jpg", quality=95)
        ellipse_mask(photo.size).save(out / "masks" / f"IMG_{index:04d}.png")
        subject = f"my {args.class_name}" if index % 2 == 0 else "the pet"
        (out / f"IMG_{index:04d}.txt").write_text(f"{subject}, {TAGS[index % len(TAGS)]}\n", encoding="utf-8")
        print(f"{out / f'IMG_{index:04d}.jpg'}  {photo.width}x{photo.height}")


if __name__ == "__main__":
    main()
