"""Fixtures: tiny random CLIP/ViT evaluators, a tiny SDXL pipeline, a DreamBooth root and a mixed-rank adapter."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import build_tiny_clip, build_tiny_vit  # noqa: E402

PROMPTS = """Classes

subject_name,class
toy1,toy
pup,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]
"""


def random_image(seed: int, size: int = 40) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(size, size, 3) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def evaluators(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("evaluators")
    return build_tiny_vit(root / "dino"), build_tiny_clip(root / "clip")


@pytest.fixture(scope="session")
def dreambooth_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dreambooth")
    (root / "prompts_and_classes.txt").write_text(PROMPTS)
    for k, name in enumerate(("toy1", "pup")):
        (root / name).mkdir()
        for i in range(3):
            random_image(10 * k + i).save(root / name / f"{i:02d}.png")
    return root


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from lora2.world.tiny import build_tiny_sdxl

    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl") / "pipe", seed=0, image_size=32)


def write_adapter(path: Path, unet_dir: Path, ranks=(2, 5), seed: int = 0) -> Path:
    """A diffusers-format UNet LoRA with alternating ranks on the attention projections of ``unet_dir``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(unet_dir)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    targets = [n for n, m in unet.named_modules() if n.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    for i, name in enumerate(targets):
        layer = unet.get_submodule(name)
        rank = ranks[i % len(ranks)]
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(rank, layer.in_features, generator=generator) * 0.1
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=generator) * 0.1
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_adapter(tiny_sdxl, tmp_path_factory) -> Path:
    return write_adapter(tmp_path_factory.mktemp("adapter") / "pytorch_lora_weights.safetensors", tiny_sdxl / "unet")
