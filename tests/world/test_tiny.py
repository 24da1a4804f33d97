"""The tiny SDXL builder writes a directory that plain diffusers loads and runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from lora2.world.tiny import build_tiny_sdxl


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny") / "sdxl", seed=0)


def test_layout_is_sdxl(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    unet = json.loads((tiny_dir / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    assert list((tiny_dir / "unet").glob("*.safetensors"))


def test_loads_and_denoises_two_steps(tiny_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    a = pipe("a red striped star on the beach", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe("a red striped star on the beach", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 64, 64, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    # Pooled output must come from the <|endoftext|> position, which is the highest id of the world vocabulary.
    assert pipe.tokenizer.eos_token_id == len(pipe.tokenizer) - 1
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id


def test_same_seed_same_weights(tiny_dir, tmp_path):
    other = build_tiny_sdxl(tmp_path / "again", seed=0)
    changed = build_tiny_sdxl(tmp_path / "changed", seed=1)
    name = "diffusion_pytorch_model.safetensors"
    ref = load_file(tiny_dir / "unet" / name)
    same = load_file(other / "unet" / name)
    diff = load_file(changed / "unet" / name)
    assert all(torch.equal(ref[k], same[k]) for k in ref)
    assert not all(torch.equal(ref[k], diff[k]) for k in ref)


def test_config_overrides_keep_components_consistent(tmp_path):
    path = build_tiny_sdxl(
        tmp_path / "wide",
        text_config={"hidden_size": 16, "projection_dim": 24, "intermediate_size": 32},
        unet_config={"addition_time_embed_dim": 4},
    )
    unet = json.loads((path / "unet" / "config.json").read_text())
    assert unet["cross_attention_dim"] == 32
    assert unet["projection_class_embeddings_input_dim"] == 24 + 6 * 4
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a star", num_inference_steps=1, height=64, width=64, output_type="np").images
    assert out.shape == (1, 64, 64, 3)
