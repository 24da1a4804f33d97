"""Captions: sidecar files and metadata.jsonl, the identifier put in, dropout and tag shuffling from the generator."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from train_helpers import write_images

from lora2.train.captions import augment, caption_companions, read_captions, with_identifier
from lora2.train.data import list_images


def test_sidecars_are_data_when_captions_are_on_and_named_when_off(tmp_path, caplog):
    folder = write_images(tmp_path / "dog", count=3)
    (folder / "00.txt").write_text("a dog on grass\n")
    (folder / "01.txt").write_text("   ")
    (folder / "orphan.txt").write_text("no image")
    with caplog.at_level(logging.WARNING):
        images = list_images(folder, companions=caption_companions(folder, ".txt"))
        captions = read_captions(folder, images, ".txt")
    assert captions == {"00.png": "a dog on grass", "01.png": "", "02.png": ""}
    assert "skipping" not in caplog.text  # caption files are data, not stray files
    assert "orphan.txt" in caplog.text and "01.png, 02.png" in caplog.text  # named: unused, and captionless
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        list_images(folder)
    assert "00.txt" in caplog.text  # captions off: named as skipped, as before
    assert read_captions(folder, images, None) is None


def test_unreadable_caption_file_is_named(tmp_path):
    folder = write_images(tmp_path / "dog", count=1)
    (folder / "00.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ValueError, match="00.txt"):
        read_captions(folder, list_images(folder, {"00.txt"}), ".txt")


def test_metadata_jsonl(tmp_path):
    folder = write_images(tmp_path / "dog", count=2)
    lines = [{"file_name": "00.png", "text": "a dog, red collar"}, {"file_name": "01.png", "text": ""}]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")
    images = list_images(folder, caption_companions(folder, None))
    assert read_captions(folder, images, None) == {"00.png": "a dog, red collar", "01.png": ""}
    with pytest.raises(ValueError, match="use one source"):
        read_captions(folder, images, ".txt")


@pytest.mark.parametrize(
    "line, message",
    [
        ("not json", "metadata.jsonl:2: not a JSON object"),
        ('{"file_name": "00.png"}', "metadata.jsonl:2: expected"),
        ('{"file_name": "zz.png", "text": "x"}', "'zz.png' is not an image"),
        ('{"file_name": "00.png", "text": 3}', "text must be a string"),
    ],
)
def test_bad_metadata_line_is_named(tmp_path, line, message):
    folder = write_images(tmp_path / "dog", count=1)
    (folder / "metadata.jsonl").write_text('{"file_name": "00.png", "text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        read_captions(folder, list_images(folder, {"metadata.jsonl"}), None)


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a photo of my Dog on the grass", "a photo of my sks Dog on the grass"),
        ("sks dog, running", "sks dog, running"),
        ("on the grass, sunny", "a sks dog, on the grass, sunny"),
        ("hotdog stand", "a sks dog, hotdog stand"),  # the class name as a word only
        ("", "a sks dog"),
    ],
)
def test_identifier_goes_before_the_class_name_else_the_prompt_is_prepended(caption, expected):
    assert with_identifier(caption, "sks", "dog", "a sks dog") == expected


def test_dropout_and_shuffle_follow_kohya_and_the_generator():
    caption = "a sks dog, grass, sunny, park, bench"
    assert augment(caption, 0.0, False, 0, torch.Generator()) == caption
    dropped = [augment(caption, 0.5, False, 0, torch.Generator().manual_seed(s)) for s in range(40)]
    assert set(dropped) == {"", caption}  # dropped to the empty prompt (kohya), or kept whole
    shuffled = [augment(caption, 0.0, True, 1, torch.Generator().manual_seed(s)) for s in range(20)]
    assert all(text.startswith("a sks dog, ") for text in shuffled)  # keep_tokens 1: the first tag stays
    assert all(sorted(text.split(", ")) == sorted(caption.split(", ")) for text in shuffled)
    assert len(set(shuffled)) > 5
    again = [augment(caption, 0.0, True, 1, torch.Generator().manual_seed(s)) for s in range(20)]
    assert again == shuffled  # a function of the generator's state: resumed runs draw the same


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"caption_extension": "txt"}, "caption_extension"),
        ({"caption_extension": ".png"}, "caption_extension"),
        ({"keep_tokens": -1}, "keep_tokens"),
        ({"caption_dropout_rate": 1.0}, "caption_dropout_rate"),
        ({"caption_dropout_rate": -0.1}, "caption_dropout_rate"),
    ],
)
def test_bad_caption_options_are_one_line(bad, message):
    from lora2.train.config import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(bad)
