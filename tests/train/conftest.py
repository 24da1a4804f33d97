"""Fixtures of the trainer tests: one tiny SDXL base pipeline per session and a small image folder."""

from __future__ import annotations

from pathlib import Path

import pytest
from train_helpers import write_images

from lora2.world.tiny import build_tiny_sdxl


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A random tiny StableDiffusionXLPipeline folder (64 px images, 16 px latents)."""
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl") / "base", seed=0)


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("instance") / "dog")
