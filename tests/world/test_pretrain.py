"""Pretraining at tiny scale on CPU: every phase runs, saves, and plain diffusers/transformers load the results."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

import lora2.world
from lora2.world.evaluators import (
    clip_embed_images,
    clip_embed_texts,
    dino_embed,
    nt_xent,
    pretrain_world,
    random_resized_crop,
)
from lora2.world.pretrain import SCALES, encode_text, time_ids, tokenize


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrained")
    pretrain_world(root, scale="tiny", device="cpu")
    return root


def test_base_is_sdxl_pipeline_in_fp16(world_dir):
    index = json.loads((world_dir / "base" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    unet = json.loads((world_dir / "base" / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time"
    vae = json.loads((world_dir / "base" / "vae" / "config.json").read_text())
    assert vae["scaling_factor"] != pytest.approx(0.13025)  # measured from the trained latents, not the default
    files = list((world_dir / "base").rglob("*.safetensors"))
    assert len(files) == 4
    from safetensors import safe_open

    for file in files:
        with safe_open(file, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())


def test_base_reloads_and_denoises(world_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(world_dir / "base")  # plain call: fp16 files load as fp32
    assert {m.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)} == {torch.float32}
    pipe.set_progress_bar_config(disable=True)
    size = SCALES["tiny"].image_size
    kwargs = dict(num_inference_steps=2, height=size, width=size, output_type="np", guidance_scale=5.0)
    a = pipe("a red striped star on the beach", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe("a red striped star on the beach", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, size, size, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)


def test_training_text_path_matches_pipeline_encode_prompt(world_dir):
    """encode_text (used in training) must be exactly what the SDXL pipeline feeds the UNet at inference."""
    pipe = StableDiffusionXLPipeline.from_pretrained(world_dir / "base", torch_dtype=torch.float32)
    prompts = ["a photo of a small red star on the left on a blue background", "a green ring"]
    with torch.no_grad():
        ours, pooled = encode_text(pipe, tokenize(pipe.tokenizer, prompts), tokenize(pipe.tokenizer_2, prompts))
        ref, _, ref_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(pooled, ref_pooled)
    assert time_ids(64, 2, torch.device("cpu")).tolist()[0] == [64, 64, 0, 0, 64, 64]


def test_tokenize_dedupes_without_changing_ids(world_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(world_dir / "base", torch_dtype=torch.float32)
    captions = ["a red star", "a blue ring", "a red star"]
    direct = pipe.tokenizer(captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(tokenize(pipe.tokenizer, captions), direct.input_ids)


def test_evaluators_load_like_hub_models(world_dir):
    size = SCALES["tiny"].image_size
    images = [Image.fromarray(np.full((size, size, 3), c, dtype=np.uint8)) for c in (10, 200)]
    clip = CLIPModel.from_pretrained(world_dir / "clip")
    processor = CLIPProcessor.from_pretrained(world_dir / "clip")
    assert processor.image_processor.crop_size["height"] == size
    img = clip_embed_images(clip, processor, images)
    txt = clip_embed_texts(clip, processor, ["a red star", "a photo of a small blue ring at night"])
    assert img.shape == txt.shape == (2, clip.config.projection_dim)
    dino = ViTModel.from_pretrained(world_dir / "dino")
    dino_processor = ViTImageProcessor.from_pretrained(world_dir / "dino")
    emb = dino_embed(dino, dino_processor, images)
    assert emb.shape == (2, dino.config.hidden_size)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_nt_xent_prefers_matching_views():
    z = torch.randn(8, 16)
    assert nt_xent(z, z + 0.01 * torch.randn(8, 16)) < nt_xent(z, torch.randn(8, 16))


def test_random_resized_crop_keeps_shape_and_range():
    images = torch.rand(4, 3, 16, 16)
    out = random_resized_crop(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_unknown_scale_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="scale"):
        pretrain_world(tmp_path, scale="huge")


ASSETS = Path(lora2.world.__file__).parent / "assets"


@pytest.mark.skipif(not (ASSETS / "base" / "model_index.json").is_file(), reason="world models not committed")
def test_committed_models_load_with_plain_calls_and_denoise():
    pipe = StableDiffusionXLPipeline.from_pretrained(ASSETS / "base")
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a red star", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    size = sum(f.stat().st_size for f in (ASSETS / "base").rglob("*") if f.is_file())
    assert size <= 30e6
    clip = CLIPModel.from_pretrained(ASSETS / "clip")
    processor = CLIPProcessor.from_pretrained(ASSETS / "clip")
    dino = ViTModel.from_pretrained(ASSETS / "dino")
    dino_processor = ViTImageProcessor.from_pretrained(ASSETS / "dino")
    images = [Image.fromarray((image[0] * 255).round().astype(np.uint8))]
    assert clip_embed_images(clip, processor, images).shape == (1, clip.config.projection_dim)
    assert dino_embed(dino, dino_processor, images).shape == (1, dino.config.hidden_size)
    evaluator_size = sum(f.stat().st_size for d in ("clip", "dino") for f in (ASSETS / d).rglob("*") if f.is_file())
    assert evaluator_size <= 20e6


def test_continuing_a_base_keeps_its_vae_and_trains_the_unet(world_dir, tmp_path):
    from lora2.world.pretrain import pretrain_base

    first = StableDiffusionXLPipeline.from_pretrained(world_dir / "base", torch_dtype=torch.float32)
    out = pretrain_base(tmp_path / "base", device="cpu", scale="tiny", seed=1, init_from=world_dir / "base")
    second = StableDiffusionXLPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert second.vae.config.scaling_factor == first.vae.config.scaling_factor
    for (name, a), b in zip(first.vae.state_dict().items(), second.vae.state_dict().values()):
        assert torch.equal(a, b), name
    moved = [not torch.equal(a, b) for a, b in zip(first.unet.parameters(), second.unet.parameters())]
    assert any(moved)
    for name in ("tokenizer", "tokenizer_2"):
        for source in (world_dir / "base" / name).iterdir():
            assert (out / name / source.name).read_bytes() == source.read_bytes(), source
        assert {f.name for f in (out / name).iterdir()} == {f.name for f in (world_dir / "base" / name).iterdir()}
