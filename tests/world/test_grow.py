"""Growing the first world's models into the second's: the grown UNet computes what the first computes, the resized
evaluators load with plain calls, and resizing to the same grid changes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPModel, ViTModel

import lora2.world
from lora2.world.grow import WORLD2_DEPTHS, grow_dino, grow_unet, grow_world, resize_positions

ASSETS = Path(lora2.world.__file__).parent / "assets"


@pytest.fixture(scope="module")
def first_unet():
    return UNet2DConditionModel.from_pretrained(ASSETS / "base" / "unet", torch_dtype=torch.float32).eval()


def _unet_inputs(side: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = 4 * side
    return {
        "sample": torch.randn(2, 4, side, side, generator=g),
        "timestep": torch.tensor([10, 700]),
        "encoder_hidden_states": torch.randn(2, 77, 128, generator=g),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(2, 64, generator=g),
            "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2, dtype=torch.float32),
        },
    }


@pytest.mark.parametrize("side", [16, 32])
def test_grown_unet_computes_what_the_first_computes(first_unet, side):
    grown = grow_unet(first_unet, WORLD2_DEPTHS, 32).eval()
    assert tuple(grown.config.transformer_layers_per_block) == WORLD2_DEPTHS and grown.config.sample_size == 32
    assert sum(p.numel() for p in grown.parameters()) > 1.5 * sum(p.numel() for p in first_unet.parameters())
    inputs = _unet_inputs(side)
    with torch.no_grad():
        torch.testing.assert_close(grown(**inputs).sample, first_unet(**inputs).sample, rtol=0, atol=0)


def test_grown_unet_trains_its_new_blocks(first_unet):
    """The added blocks start as the identity, not frozen: one gradient step moves their zeroed outputs."""
    grown = grow_unet(first_unet, WORLD2_DEPTHS, 32)
    branch = grown.mid_block.attentions[0].transformer_blocks[3].attn1.to_out[0]
    assert not branch.weight.any()
    grown(**_unet_inputs(32)).sample.square().mean().backward()
    assert branch.weight.grad.abs().sum() > 0


def test_growth_never_removes_depth(first_unet):
    with pytest.raises(ValueError, match="at least its depth"):
        grow_unet(first_unet, (1, 1), 32)
    with pytest.raises(ValueError, match="at least its depth"):
        grow_unet(first_unet, (1, 0, 4), 32)


def test_resizing_positions_to_the_same_grid_is_the_identity():
    table = torch.randn(1 + 64, 12)
    torch.testing.assert_close(resize_positions(table, 8), table)
    bigger = resize_positions(table, 16)
    assert bigger.shape == (1 + 256, 12) and torch.equal(bigger[0], table[0])


def test_evaluators_at_the_first_size_are_unchanged(tmp_path):
    source = ViTModel.from_pretrained(ASSETS / "dino").eval()
    size = source.config.image_size
    same = ViTModel.from_pretrained(grow_dino(ASSETS / "dino", tmp_path / "dino", size)).eval()
    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(same(pixel_values=pixels).last_hidden_state,
                                   source(pixel_values=pixels).last_hidden_state)  # fmt: skip


def test_grown_world_loads_with_plain_calls_at_128_px(tmp_path):
    paths = grow_world(ASSETS, tmp_path / "world2")
    pipe = StableDiffusionXLPipeline.from_pretrained(paths["base"], torch_dtype=torch.float32)
    assert pipe.unet.config.sample_size == 32 and pipe.vae.config.sample_size == 128
    names = ("tokenizer", "tokenizer_2", "text_encoder", "text_encoder_2", "scheduler")
    kept = [f for name in names for f in (ASSETS / "base" / name).iterdir()]
    kept += list((ASSETS / "base" / "vae").glob("*.safetensors"))
    for source in kept:
        assert (paths["base"] / source.relative_to(ASSETS / "base")).read_bytes() == source.read_bytes(), source
    clip = CLIPModel.from_pretrained(paths["clip"])
    dino = ViTModel.from_pretrained(paths["dino"])
    assert clip.config.vision_config.image_size == 128 and dino.config.image_size == 128
    processor = json.loads((paths["dino"] / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 128, "width": 128}
    with torch.no_grad():
        assert dino(pixel_values=torch.randn(1, 3, 128, 128)).last_hidden_state.shape[1] == 1 + 16 * 16
        assert clip.get_image_features(pixel_values=torch.randn(1, 3, 128, 128)) is not None
