"""The built-in world: a procedural image domain, its pretrained SDXL-architecture base model, its evaluators and
its personalization subjects, so every command runs offline.

Models are committed under ``lora2/world/assets/{base,clip,dino}`` (ordinary diffusers / transformers directories);
the subject dataset is generated on first use into a versioned cache folder (``$LORA2_CACHE/world`` or
``~/.cache/lora2/world``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from lora2.world.subjects import DATASET_VERSION, write_subjects

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).parent / "assets"

# info() key -> (asset folder, file whose presence marks it ready)
_ASSETS: dict[str, tuple[str, str]] = {
    "base_model": ("base", "model_index.json"),
    "clip_evaluator": ("clip", "config.json"),
    "dino_evaluator": ("dino", "config.json"),
}


def cache_dir() -> Path:
    """Root of the world's generated files: ``$LORA2_CACHE/world`` or ``~/.cache/lora2/world``."""
    return Path(os.environ.get("LORA2_CACHE", Path.home() / ".cache" / "lora2")).expanduser() / "world"


def subjects_dir(materialize: bool = True) -> Path:
    """The world's DreamBooth-layout subject folder, written on first use (atomically) if ``materialize``."""
    target = cache_dir() / f"subjects-v{DATASET_VERSION}"
    if materialize and not (target / "subjects.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix="subjects-", dir=target.parent))
        write_subjects(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
        logger.info("world subjects written to %s", target)
    return target


def info(materialize: bool = True) -> dict:
    """Paths of the world's models and subjects, and which are ready.

    Returns:
        {"base_model", "clip_evaluator", "dino_evaluator", "subjects_dir": str paths,
         "ready": {same keys: bool}, "paths": {same keys: str paths} (the same paths, grouped),
         "version": subject dataset version}.
    """
    result: dict = {}
    ready: dict[str, bool] = {}
    for key, (folder, marker) in _ASSETS.items():
        path = ASSETS_DIR / folder
        result[key] = str(path)
        ready[key] = (path / marker).is_file()
    subjects = subjects_dir(materialize)
    result["subjects_dir"] = str(subjects)
    ready["subjects_dir"] = (subjects / "subjects.json").is_file()
    result["ready"] = ready
    result["paths"] = {key: result[key] for key in ready}
    result["version"] = DATASET_VERSION
    return result
