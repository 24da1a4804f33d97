"""Training images: every fault either handled correctly or a ValueError naming the file; deterministic order."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from lora2.train.data import (
    batch_indices,
    crop_and_flip,
    list_images,
    load_image,
    prepare_image,
)


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="holds no images"):
        list_images(tmp_path)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        list_images(tmp_path / "nope")


def test_non_image_files_are_skipped_and_named(tmp_path, caplog):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("caption")
    (tmp_path / ".DS_Store").write_bytes(b"\x00")
    with caplog.at_level(logging.WARNING):
        assert [p.name for p in list_images(tmp_path)] == ["a.png"]
    assert "notes.txt" in caplog.text and ".DS_Store" in caplog.text


def test_corrupt_jpeg_names_the_file(tmp_path):
    path = tmp_path / "broken.jpg"
    Image.new("RGB", (64, 64), "red").save(path, quality=90)
    path.write_bytes(path.read_bytes()[:200])  # truncated mid-scan
    with pytest.raises(ValueError, match="broken.jpg"):
        load_image(path)


def test_text_file_with_image_extension_names_the_file(tmp_path):
    path = tmp_path / "fake.png"
    path.write_text("not an image")
    with pytest.raises(ValueError, match="fake.png"):
        load_image(path)


def test_grayscale_becomes_rgb(tmp_path):
    Image.new("L", (6, 4), 77).save(tmp_path / "g.png")
    image = load_image(tmp_path / "g.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (77, 77, 77)


def test_rgba_is_composited_on_white(tmp_path):
    pixels = np.zeros((4, 4, 4), dtype=np.uint8)
    pixels[..., 0] = 200
    pixels[:2, ..., 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png")
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (200, 0, 0) and image.getpixel((0, 3)) == (255, 255, 255)


def test_16bit_is_rescaled_not_clipped(tmp_path):
    values = np.array([[0, 32896, 65535]], dtype=np.uint16)  # 0, ~half, max
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    image = load_image(tmp_path / "deep.png")
    assert [image.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_exif_rotation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), dtype=np.uint8)  # landscape 20x10, left half white
    pixels[:, :10] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(pixels).save(tmp_path / "r.jpg", exif=exif, quality=100)
    image = load_image(tmp_path / "r.jpg")
    assert image.size == (10, 20)  # portrait after transpose
    assert image.getpixel((5, 2))[0] > 200 and image.getpixel((5, 17))[0] < 50  # left half went to the top


def test_small_image_upscaled_with_warning(tmp_path, caplog):
    Image.new("RGB", (20, 30), "blue").save(tmp_path / "small.png")
    with caplog.at_level(logging.WARNING):
        item = prepare_image(tmp_path / "small.png", 32)
    assert "small.png" in caplog.text and "upscaled" in caplog.text
    assert min(item.image.size) == 32 and item.original_size == (30, 20)


def test_small_image_error_mode_names_the_file(tmp_path):
    Image.new("RGB", (20, 30)).save(tmp_path / "small.png")
    with pytest.raises(ValueError, match="small.png"):
        prepare_image(tmp_path / "small.png", 32, small_images="error")


def test_crop_and_flip():
    pixels = np.zeros((32, 48, 3), dtype=np.uint8)
    pixels[:, :24] = 255  # left half white
    from lora2.train.data import TrainImage

    item = TrainImage(None, Image.fromarray(pixels), (32, 48), (32, 32))
    tensor, crop, mask = crop_and_flip(item, center_crop=True, flip=False, generator=None)
    assert tensor.shape == (3, 32, 32) and crop == (0, 8) and mask is None
    assert tensor.min() == -1 and tensor.max() == 1
    flipped, _, _ = crop_and_flip(item, center_crop=True, flip=True, generator=None)
    assert torch.equal(flipped, tensor.flip(-1))
    generator = torch.Generator().manual_seed(0)
    _, random_crop, _ = crop_and_flip(item, center_crop=False, flip=False, generator=generator)
    assert random_crop[0] == 0 and 0 <= random_crop[1] <= 16


def test_batch_order_covers_every_epoch_and_splits_processes():
    order = [batch_indices(5, 3, step, 1) for step in range(10)]
    assert sorted(i for (i,) in order[:5]) == list(range(5)) and sorted(i for (i,) in order[5:]) == list(range(5))
    assert order == [batch_indices(5, 3, step, 1) for step in range(10)]  # a pure function of (seed, step)
    two = [batch_indices(4, 0, 0, 2, process=p, world_size=2) for p in range(2)]
    assert sorted(two[0] + two[1]) == [0, 1, 2, 3]
