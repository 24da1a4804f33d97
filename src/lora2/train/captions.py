"""Per-image captions: where they are read from, how the identifier gets in, and their per-step augmentation.

Sources (an instance folder uses one of them):

- sidecar files ``<image stem><caption_extension>`` beside each image (kohya's convention, ``--caption-extension
  .txt``); an image without one, or with an empty one, is trained with the instance prompt (kohya's class tokens),
  with one warning naming them; a caption file that is not UTF-8 text is an error naming it;
- ``metadata.jsonl`` in the folder (the ``datasets`` imagefolder convention of diffusers' scripts): one JSON object
  per line, ``{"file_name": "<image name>", "text": "<caption>"}``; a bad line, or a file name that is not an image of
  the folder, is an error naming the line. Images it does not list take the instance prompt, as above.

The identifier: a caption that holds the identifier as a word is kept; else the identifier is placed before the first
occurrence of the class name ("a photo of my dog on the grass" → "a photo of my sks dog on the grass"); a caption
without the class name gets the instance prompt in front as its first tag ("a sks dog, on the grass").

Per step and instance sample (kohya's ``process_caption``): with probability ``caption_dropout_rate`` the caption is
the empty prompt; otherwise with ``shuffle_caption`` its comma-separated tags are shuffled, the first
``keep_tokens`` staying in place, and joined with ", ". Random draws come from the trainer's generator, so a resumed
run draws the same. Class (prior-preservation) samples keep the class prompt.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.jsonl"


def caption_companions(folder: Path, extension: str | None) -> set[str]:
    """Names of the caption files in ``folder`` (data, not stray files, for ``list_images``)."""
    if not folder.is_dir():
        return set()
    names = {p.name for p in folder.iterdir() if extension and p.is_file() and p.name.endswith(extension)}
    return names | ({METADATA_FILE} if (folder / METADATA_FILE).is_file() else set())


def caption_source(folder: Path, extension: str | None) -> str:
    """Where the captions of a folder come from, as the model card says it."""
    if (folder / METADATA_FILE).is_file():
        return METADATA_FILE
    return f"<image name>{extension} files" if extension else "none (the instance prompt)"


def instance_captions(paths: list[Path], config, instance_prompt: str, class_name: str | None) -> list[str] | None:
    """The prompt of each instance image with the identifier in it, or None when the folder has no captions."""
    if config.keep_tokens and not config.shuffle_caption:
        logger.warning("keep_tokens %d has no effect without shuffle_caption (as in kohya)", config.keep_tokens)
    captions = read_captions(paths[0].parent, paths, config.caption_extension)
    if captions is None:
        return None
    return [with_identifier(captions[p.name], config.identifier, class_name, instance_prompt) for p in paths]


def read_captions(folder: Path, images: list[Path], extension: str | None) -> dict[str, str] | None:
    """Raw caption per image name ('' when it has none), or None when the folder has no captions."""
    metadata = folder / METADATA_FILE
    if extension and metadata.is_file():
        raise ValueError(
            f"{folder} holds {METADATA_FILE} and --caption-extension {extension} is set: use one source of captions"
        )
    if metadata.is_file():
        captions = _read_metadata(metadata, {p.name for p in images})
    elif extension:
        captions = {p.name: _read_sidecar(p.with_name(p.stem + extension)) for p in images}
        names = {p.stem + extension for p in images}
        orphans = sorted(p.name for p in folder.iterdir() if p.name.endswith(extension) and p.name not in names)
        if orphans:
            logger.warning("%s: caption file(s) without an image, not used: %s", folder, ", ".join(orphans))
    else:
        return None
    missing = [name for name in (p.name for p in images) if not captions.get(name, "").strip()]
    if missing:
        logger.warning("%d image(s) have no caption and use the instance prompt: %s", len(missing), ", ".join(missing))
    logger.info("captions of %d images from %s", len(images) - len(missing), metadata.name if metadata.is_file()
                else f"*{extension} files")  # fmt: skip
    return {p.name: captions.get(p.name, "") for p in images}


def _read_sidecar(path: Path) -> str:
    if not path.exists():
        return ""
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read caption file {path}: {error}") from error


def _read_metadata(path: Path, names: set[str]) -> dict[str, str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from error
    captions = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON object ({error})") from error
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str) or "text" not in entry:
            raise ValueError(f'{path}:{number}: expected {{"file_name": "...", "text": "..."}}, got {line.strip()!r}')
        if not isinstance(entry["text"], str):
            raise ValueError(f"{path}:{number}: text must be a string, got {entry['text']!r}")
        if entry["file_name"] not in names:
            raise ValueError(f"{path}:{number}: {entry['file_name']!r} is not an image of {path.parent}")
        captions[entry["file_name"]] = entry["text"].strip()
    return captions


def with_identifier(caption: str, identifier: str, class_name: str | None, instance_prompt: str) -> str:
    """The caption with the identifier in it (module docstring: kept, before the class name, or prompt prepended)."""
    if not caption:
        return instance_prompt
    if re.search(rf"(?<!\w){re.escape(identifier)}(?!\w)", caption):
        return caption
    if class_name:
        match = re.search(rf"(?<!\w){re.escape(class_name)}(?!\w)", caption, flags=re.IGNORECASE)
        if match:
            return f"{caption[: match.start()]}{identifier} {caption[match.start() :]}"
    return f"{instance_prompt}, {caption}"


def augment(caption: str, dropout_rate: float, shuffle: bool, keep_tokens: int, generator: torch.Generator) -> str:
    """One step's caption: dropped to '' with probability ``dropout_rate``, else its tags shuffled after the first
    ``keep_tokens`` when ``shuffle`` (kohya's order of draws: dropout, then shuffle)."""
    if dropout_rate > 0 and float(torch.rand((), generator=generator)) < dropout_rate:
        return ""
    if not shuffle:
        return caption
    tags = [tag.strip() for tag in caption.strip().split(",")]
    kept, rest = tags[:keep_tokens], tags[keep_tokens:]
    order = torch.randperm(len(rest), generator=generator).tolist()
    return ", ".join(kept + [rest[i] for i in order])
