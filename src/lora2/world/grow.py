"""The second world's starting models, grown from the first world's trained ones (issue 19).

Pretrained from scratch in one 10-minute device call, the second world's base drew noise (docs/WORLD.md, "First
version: trained from scratch in one device call"). Its starting point is therefore the first world's base and
evaluators, which took about 20 minutes of GPU training, changed in ways that keep what they compute:

* the UNet gets deeper transformers (``WORLD2_DEPTHS``): every ``Transformer2DModel`` keeps its first
  ``BasicTransformerBlock`` and gains blocks whose residual branches end in zeros (``attn1.to_out``,
  ``attn2.to_out`` and the feed-forward output), so each new block is the identity and the grown UNet computes
  exactly what the first world's computes (Net2Net's function-preserving growth, Chen et al. 2016, in the
  zero-initialised form of ControlNet's added layers) until training moves them;
* the UNet's default sample size doubles (32 latents: 128 px through the same VAE, which is convolutional);
* the CLIP and DINO image towers see 128 px: their patch position embeddings are resized from the 8×8 grid to 16×16
  by bicubic interpolation (as ViT fine-tuning at a higher resolution does, Dosovitskiy et al. 2021, sec. 3.2);
* the VAE, text encoders and tokenizers are the first world's, unchanged.

Pretraining then continues from these (``benchmarks/gpu_world2.sh pretrain``) at 128 px. Everything here runs on
the CPU, deterministically from the committed files and ``seed``.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

logger = logging.getLogger(__name__)

WORLD2_DEPTHS = (1, 4, 4)  # transformer blocks per level (the first level has none): 224 adapted layers
WORLD2_IMAGE_SIZE = 128
ZERO_BRANCHES = ("attn1.to_out.0", "attn2.to_out.0", "ff.net.2")  # a BasicTransformerBlock's residual outputs


def grow_unet(unet: UNet2DConditionModel, depths: tuple[int, ...], sample_size: int, seed: int = 0):
    """``unet`` with ``depths`` transformer blocks per level, computing what ``unet`` computes.

    The first block of every transformer is ``unet``'s; the added ones are initialised at random (``seed``) with
    their residual outputs (``ZERO_BRANCHES``) zero. Raises ValueError if a depth is smaller than ``unet``'s.
    """
    old = tuple(unet.config.transformer_layers_per_block)
    if len(depths) != len(old) or any(new < was for new, was in zip(depths, old)):
        raise ValueError(f"depths {depths} must give each of the {len(old)} levels at least its depth {old}")
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config |= {"transformer_layers_per_block": list(depths), "sample_size": sample_size}
    torch.manual_seed(seed)
    grown = UNet2DConditionModel(**config)
    missing, unexpected = grown.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected, unexpected  # the grown UNet holds every module of the source
    assert all(".transformer_blocks." in key for key in missing), missing  # only the new blocks are missing
    missing = set(missing)
    with torch.no_grad():
        for name, module in grown.named_modules():
            if name.endswith(ZERO_BRANCHES) and f"{name}.weight" in missing:  # a residual output of a new block
                module.weight.zero_()
                module.bias.zero_()
    logger.info("grew the UNet from depths %s to %s (%d new parameters)", old, depths,
                sum(p.numel() for p in grown.parameters()) - sum(p.numel() for p in unet.parameters()))  # fmt: skip
    return grown


def grow_base(source: Path, out_dir: Path, depths: tuple[int, ...] = WORLD2_DEPTHS, seed: int = 0) -> Path:
    """Copy the base pipeline folder ``source`` to ``out_dir`` with its UNet grown (``grow_unet``) to ``depths`` and
    the default resolution doubled; the UNet is saved in fp16 like the rest of the pipeline."""
    source, out_dir = Path(source), Path(out_dir)
    shutil.copytree(source, out_dir)
    unet = UNet2DConditionModel.from_pretrained(source / "unet", torch_dtype=torch.float32)
    grown = grow_unet(unet, depths, 2 * unet.config.sample_size, seed)
    shutil.rmtree(out_dir / "unet")
    grown.to(torch.float16).save_pretrained(out_dir / "unet", safe_serialization=True)
    vae_config = out_dir / "vae" / "config.json"
    config = json.loads(vae_config.read_text())
    config["sample_size"] = WORLD2_IMAGE_SIZE
    vae_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir


def resize_positions(table: torch.Tensor, grid: int) -> torch.Tensor:
    """Position embeddings (1 + g² rows: the class token's, then a g×g patch grid) → 1 + ``grid``² rows, the patch
    grid resized by bicubic interpolation (the class token's row kept)."""
    cls, patches = table[:1], table[1:]  # 1×D, g²×D
    side = int(round(patches.shape[0] ** 0.5))
    assert side * side == patches.shape[0], patches.shape
    image = patches.T.reshape(1, -1, side, side)  # 1×D×g×g
    resized = F.interpolate(image, size=(grid, grid), mode="bicubic", align_corners=False)  # 1×D×G×G
    return torch.cat([cls, resized.reshape(table.shape[1], -1).T])  # (1+G²)×D


def grow_clip(source: Path, out_dir: Path, image_size: int = WORLD2_IMAGE_SIZE) -> Path:
    """The CLIP evaluator folder ``source`` with its image tower at ``image_size`` (``resize_positions``)."""
    model = CLIPModel.from_pretrained(source, torch_dtype=torch.float32)
    config = model.config
    config.vision_config.image_size = image_size
    grown = CLIPModel(config)
    state = model.state_dict()
    key = "vision_model.embeddings.position_embedding.weight"
    state[key] = resize_positions(state[key], image_size // config.vision_config.patch_size)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    missing, unexpected = grown.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
    processor = CLIPProcessor.from_pretrained(source)
    processor.image_processor.size = {"shortest_edge": image_size}
    processor.image_processor.crop_size = {"height": image_size, "width": image_size}
    grown.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def grow_dino(source: Path, out_dir: Path, image_size: int = WORLD2_IMAGE_SIZE) -> Path:
    """The DINO evaluator folder ``source`` at ``image_size`` (``resize_positions``)."""
    model = ViTModel.from_pretrained(source, torch_dtype=torch.float32)
    config = model.config
    config.image_size = image_size
    grown = ViTModel(config, add_pooling_layer=model.pooler is not None)
    state = model.state_dict()
    key = "embeddings.position_embeddings"
    state[key] = resize_positions(state[key][0], image_size // config.patch_size)[None]
    grown.load_state_dict(state)
    processor = ViTImageProcessor.from_pretrained(source)
    processor.size = {"height": image_size, "width": image_size}
    grown.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return Path(out_dir)


def grow_world(source: Path, out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """The second world's starting models from the first world's model folder ``source`` (``base/``, ``clip/``,
    ``dino/``) into ``out_dir``: ``grow_base``, ``grow_clip``, ``grow_dino``. Returns the three folders by name."""
    source, out_dir = Path(source), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return {
        "base": grow_base(source / "base", out_dir / "base", seed=seed),
        "clip": grow_clip(source / "clip", out_dir / "clip"),
        "dino": grow_dino(source / "dino", out_dir / "dino"),
    }
