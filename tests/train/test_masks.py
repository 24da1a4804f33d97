"""Masked loss: where masks come from, that they follow resize/crop/flip, and the loss ignores what they mask out."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from lora2.train.batches import instance_images
from lora2.train.config import TrainConfig
from lora2.train.data import crop_and_flip
from lora2.train.loss import diffusion_loss
from lora2.train.masks import latent_mask, load_mask


def _half_mask(width: int, height: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255  # the right half is learned
    return mask


def test_masks_from_a_masks_folder_or_the_alpha_channel(tmp_path):
    rgb = np.full((20, 30, 3), 90, dtype=np.uint8)
    Image.fromarray(np.dstack([rgb, _half_mask(30, 20)])).save(tmp_path / "alpha.png")
    Image.fromarray(rgb).save(tmp_path / "plain.jpg")
    assert load_mask(tmp_path / "plain.jpg", (30, 20)) is None
    alpha = load_mask(tmp_path / "alpha.png", (30, 20))
    assert alpha.mode == "L" and np.array_equal(np.asarray(alpha), _half_mask(30, 20))
    (tmp_path / "masks").mkdir()
    Image.fromarray(_half_mask(30, 20)).convert("RGB").save(tmp_path / "masks" / "plain.png")  # same stem
    assert np.array_equal(np.asarray(load_mask(tmp_path / "plain.jpg", (30, 20))), _half_mask(30, 20))
    Image.fromarray(255 - _half_mask(30, 20)).save(tmp_path / "masks" / "alpha.png")  # the folder wins over alpha
    assert np.asarray(load_mask(tmp_path / "alpha.png", (30, 20)))[0, 0] == 255


def test_a_mask_of_another_size_names_both_files(tmp_path):
    Image.new("RGB", (30, 20)).save(tmp_path / "photo.png")
    (tmp_path / "masks").mkdir()
    Image.new("L", (20, 30)).save(tmp_path / "masks" / "photo.png")
    with pytest.raises(ValueError, match=r"masks/photo.png is 20x30 but its image .*photo.png is 30x20"):
        load_mask(tmp_path / "photo.png", (30, 20))


def test_the_mask_follows_the_bucket_resize_crop_and_flip(tmp_path, caplog):
    """An image whose right half is red with the right half masked in (the masked-out half is transparent, so white
    once composited): after fitting a 3:1 image to its bucket, cropping and flipping, the mask still covers the red
    pixels."""
    pixels = np.zeros((100, 320, 3), dtype=np.uint8)
    pixels[:, 160:, 0] = 255
    Image.fromarray(np.dstack([pixels, _half_mask(320, 100)])).save(tmp_path / "wide.png")
    Image.new("RGB", (128, 128)).save(tmp_path / "unmasked.png")
    config = TrainConfig.from_dict({"resolution": 128, "aspect_buckets": True, "masked_loss": True})
    with caplog.at_level(logging.WARNING):
        items = instance_images([tmp_path / "wide.png", tmp_path / "unmasked.png"], config)
    assert "unmasked.png" in caplog.text and items[1].mask is None
    assert items[0].target == (64, 192) and items[0].mask.size == items[0].image.size
    for flip in (False, True):
        image, _, mask = crop_and_flip(items[0], center_crop=True, flip=flip, generator=None)
        red = image[1] < 0  # (64, 192): no green
        assert mask.shape == (1, 64, 192)
        assert ((mask[0] > 0.5) != red).sum() <= 64  # at most the boundary column (bicubic vs bilinear)
        assert (mask[0, :, :90] == 0).all() == (not flip) and (mask[0, :, -90:] == 1).all() == (not flip)
    small = latent_mask(mask, (16, 48))
    assert small.shape == (1, 16, 48) and torch.allclose(small.mean(), mask.mean(), atol=1e-6)  # area averaging


def test_masked_loss_ignores_the_masked_out_region():
    scheduler = DDPMScheduler()
    timesteps = torch.tensor([10, 500])
    target = torch.randn(2, 4, 8, 8)
    prediction = target + 0.1 * torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[..., 4:] = 1.0
    loss = diffusion_loss(prediction, target, timesteps, scheduler, None, mask)
    outside = prediction.clone()
    outside[..., :4] += 5.0  # perturb only where the mask is 0
    assert torch.equal(diffusion_loss(outside, target, timesteps, scheduler, None, mask), loss)
    inside = prediction.clone()
    inside[..., 4:] += 5.0
    assert (diffusion_loss(inside, target, timesteps, scheduler, None, mask) > loss).all()
    plain = diffusion_loss(prediction, target, timesteps, scheduler, 5.0)
    assert torch.equal(diffusion_loss(prediction, target, timesteps, scheduler, 5.0, torch.ones(2, 1, 8, 8)), plain)
    # kohya's weighting: the mean over every position, not renormalised by the mask's area
    unweighted = (prediction - target).square()[..., 4:].sum(dim=(1, 2, 3)) / (4 * 8 * 8)
    assert torch.allclose(loss, unweighted)
