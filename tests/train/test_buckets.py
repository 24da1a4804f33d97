"""Aspect-ratio buckets: the SDXL list, nearest-bucket assignment, cover resize + crop, a batch order of one bucket
per batch that is a pure function of (seed, step)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lora2.train.buckets import bucket_batch_indices, bucket_sizes, epoch_batches, nearest_bucket
from lora2.train.config import TrainConfig
from lora2.train.data import crop_and_flip, prepare_image


def test_sdxl_buckets_at_1024():
    buckets = bucket_sizes(1024)
    assert (1024, 1024) in buckets and (768, 1344) in buckets and (1344, 768) in buckets  # SDXL's 16:9 pair
    assert (512, 2048) in buckets and (2048, 512) in buckets  # 1:4 and 4:1
    for height, width in buckets:
        assert height % 64 == 0 and width % 64 == 0 and height * width <= 1024 * 1024
        assert max(height / width, width / height) <= 4 and (width, height) in buckets
        assert (height + 64) * width > 1024 * 1024 or height * (width + 64) > 1024 * 1024  # no side can grow
    assert nearest_bucket((3024, 4032), buckets) == (896, 1152)  # a 3:4 phone photo, landscape
    assert nearest_bucket((1920, 1080), buckets) == (1344, 768)  # 9:16 portrait
    assert nearest_bucket((500, 500), buckets) == (1024, 1024)


@pytest.mark.parametrize("resolution", [1000, 96, 32])
def test_a_resolution_that_is_not_a_multiple_of_64_is_refused(resolution):
    with pytest.raises(ValueError, match="multiple of 64"):
        bucket_sizes(resolution)
    with pytest.raises(ValueError, match="aspect_buckets needs a resolution that is a multiple of 64"):
        TrainConfig.from_dict({"aspect_buckets": True, "resolution": resolution})


def test_bucket_batches_hold_one_bucket_and_cover_each_epoch():
    bucket_of = [0, 1, 0, 2, 1, 0, 0]  # three buckets of 4, 2 and 1 images
    batches = epoch_batches(bucket_of, 2, seed=3, epoch=0)
    assert len(batches) == 2 + 1 + 1 and all(len(batch) == 2 for batch in batches)
    assert all(len({bucket_of[i] for i in batch}) == 1 for batch in batches)
    assert set(sum(batches, [])) == set(range(7))  # every image once (the lone image fills its batch twice)
    order = [bucket_batch_indices(bucket_of, 3, step, 2) for step in range(8)]
    assert order[:4] == batches and order == [bucket_batch_indices(bucket_of, 3, step, 2) for step in range(8)]
    assert order[4:] != order[:4]  # the next epoch is shuffled anew
    two = [bucket_batch_indices(bucket_of, 3, 0, 2, process=p, world_size=2) for p in range(2)]
    assert two == batches[:2]  # process p takes global batch step·w + p


def test_an_image_covers_its_bucket_and_the_crop_is_recorded(tmp_path):
    pixels = np.zeros((300, 400, 3), dtype=np.uint8)  # 4:3 landscape, a white band in the middle row
    pixels[140:160] = 255
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    bucket = nearest_bucket((300, 400), bucket_sizes(128))
    assert bucket == (128, 128)
    wide = np.zeros((100, 320, 3), dtype=np.uint8)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    target = nearest_bucket((100, 320), bucket_sizes(128))
    assert target == (64, 192)
    item = prepare_image(tmp_path / "wide.png", target)
    assert item.image.size == (205, 64) and item.target == (64, 192) and item.original_size == (100, 320)
    tensor, crop, _ = crop_and_flip(item, center_crop=True, flip=False, generator=None)
    assert tensor.shape == (3, 64, 192) and crop == (0, 6)
