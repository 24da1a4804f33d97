"""People's photos end to end on the tiny SDXL model: mixed-aspect photos with captions and masks, trained with
aspect-ratio buckets + captions (dropout, shuffling) + masked loss + Prodigy + EMA; resumed bit-exactly."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from train_helpers import fast_config, train_with_sigterm_at_step, write_photos

from lora2.train.config import TrainConfig
from lora2.train.recipe import train
from lora2.train.run_folder import CONFIG_FILE

DREAMBOOTH = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "dreambooth"

PHOTO_OPTIONS = {
    "resolution": 128,
    "aspect_buckets": True,
    "caption_extension": ".txt",
    "caption_dropout_rate": 0.25,
    "shuffle_caption": True,
    "keep_tokens": 1,
    "masked_loss": True,
    "optimizer": "prodigy",
    "learning_rate": 1.0,
    "ema_decay": 0.5,
    "max_train_steps": 4,
    "init_rank": 3,
    "chunk_size": 2,
    "nu_lr": 0.5,
    "random_flip": True,
    "sample_steps": 1,
    "export_formats": ["diffusers", "lora2"],
    "with_prior_preservation": True,  # class images (square) re-fitted to each instance batch's bucket
    "num_class_images": 2,
    "class_generation_steps": 1,
}


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos") / "dog")


@pytest.fixture(scope="module")
def photo_run(tiny_base, photo_dir, tmp_path_factory):
    pytest.importorskip("prodigyopt")
    out = tmp_path_factory.mktemp("photo_run") / "run"
    return train(fast_config(tiny_base, photo_dir, out, **PHOTO_OPTIONS))


def test_photos_train_with_buckets_captions_masks_prodigy_and_ema(photo_run):
    out = photo_run.output_dir
    assert photo_run.status == "completed" and all(np.isfinite(photo_run.losses))
    assert any(rank != 3 for rank in photo_run.ranks.values()), "ν (plain Adam beside Prodigy) should move ranks"
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()[1:]]
    assert all(record["prior"] > 0 for record in records)
    # captions vary the prompt: the unset entropy_weight resolves to off (an explicit one fails, below)
    assert all(record["entropy"] == 0 for record in records)
    assert TrainConfig.from_yaml(out / CONFIG_FILE).entropy_weight == 0.0
    card = (out / "README.md").read_text()
    for line in (
        "- aspect_buckets: True",
        "- caption_extension: .txt",
        "- captions: <image name>.txt files",
        "- caption_dropout_rate: 0.25",
        "- shuffle_caption: True",
        "- keep_tokens: 1",
        "- masked_loss: True",
        "- optimizer: prodigy",
        "- ema_decay: 0.5",
    ):
        assert line in card, line
    assert (out / "checkpoint-4" / "ema.safetensors").is_file()
    # the exported adapter holds the EMA of the weights, truncated to the final ranks, not the live weights
    exported = load_file(out / "lora2_adapter.safetensors")
    ema, live = photo_run.ema_state, photo_run.adapter_state
    assert exported.keys() == ema.keys()
    differs = False
    for key, value in exported.items():
        module, attr = key.rsplit(".", 1)
        rank = photo_run.ranks[module]
        positions = {"lora_A": (slice(0, rank),), "lora_B": (slice(None), slice(0, rank))}.get(attr, ())
        torch.testing.assert_close(value, ema[key][positions], atol=0, rtol=0, msg=key)
        differs |= not torch.equal(live[key][positions], ema[key][positions])
    assert differs, "the EMA should differ from the live weights for this test to mean anything"


def test_photo_run_resumes_bit_exactly(photo_run, tiny_base, photo_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    config = fast_config(tiny_base, photo_dir, out, **PHOTO_OPTIONS)
    interrupted = train_with_sigterm_at_step(config, monkeypatch)
    assert interrupted.status == "interrupted" and interrupted.step == 2
    resumed = train(fast_config(tiny_base, photo_dir, out, resume="latest", **PHOTO_OPTIONS))
    assert resumed.ranks == photo_run.ranks
    assert photo_run.losses == pytest.approx(interrupted.losses + resumed.losses, abs=1e-6)
    for name in ("adapter_state", "ema_state"):
        straight, continued = getattr(photo_run, name), getattr(resumed, name)
        assert continued.keys() == straight.keys() and straight
        for key, value in straight.items():
            torch.testing.assert_close(continued[key], value, atol=1e-6, rtol=0, msg=f"{name} {key}")


@pytest.mark.parametrize("fault", ["mask_size", "caption_bytes", "bucket_resolution", "entropy"])
def test_bad_photo_input_is_one_line_naming_it(tiny_base, photo_dir, tmp_path, fault):
    folder = tmp_path / "dog"
    shutil.copytree(photo_dir, folder)
    options = dict(PHOTO_OPTIONS, optimizer="adamw", learning_rate=1e-4)
    if fault == "mask_size":
        Image.new("L", (10, 10)).save(folder / "masks" / "square_a.png")
        match = r"masks/square_a.png is 10x10 but its image .*square_a.png is 128x128"
    elif fault == "caption_bytes":
        (folder / "tall_a.txt").write_bytes(b"\xff\xfe\xfa")
        match = "cannot read caption file .*tall_a.txt"
    elif fault == "bucket_resolution":
        options["resolution"] = 96
        match = r"aspect_buckets needs a resolution that is a multiple of 64 .*got 96"
    else:
        options["entropy_weight"] = 0.01
        options["with_prior_preservation"] = False
        match = "entropy_weight needs the one instance prompt"
    with pytest.raises(ValueError, match=match):
        train(fast_config(tiny_base, folder, tmp_path / "run", **options))
    assert not (tmp_path / "run" / "checkpoint-1").exists()


@pytest.mark.skipif(not DREAMBOOTH.is_dir(), reason="shared DreamBooth photos absent")
def test_real_photos_cropped_to_mixed_aspects_with_metadata_jsonl(tiny_base, tmp_path, caplog):
    """Three DreamBooth dog photos cut to 3:4, 16:9 and 1:1 (a phone's shapes), captions in metadata.jsonl, masks in
    the alpha channel."""
    folder = tmp_path / "dog"
    folder.mkdir()
    lines = []
    for index, (name, aspect) in enumerate(zip(("00.jpg", "01.jpg", "02.jpg"), (3 / 4, 16 / 9, 1.0))):
        with Image.open(DREAMBOOTH / "dog" / name) as photo:
            photo = photo.convert("RGB")
        side = min(photo.size)
        width, height = (side, round(side / aspect)) if aspect > 1 else (round(side * aspect), side)
        photo = photo.crop((0, 0, width, height)).resize((round(width * 200 / side), round(height * 200 / side)))
        alpha = Image.new("L", photo.size, 0)
        alpha.paste(255, (photo.width // 4, photo.height // 4, 3 * photo.width // 4, 3 * photo.height // 4))
        photo.putalpha(alpha)
        photo.save(folder / f"photo_{index}.png")
        lines.append(json.dumps({"file_name": f"photo_{index}.png", "text": f"a photo of a dog, take {index}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    options = dict(PHOTO_OPTIONS, optimizer="adamw", learning_rate=1e-3, max_train_steps=2, caption_extension=None)
    with caplog.at_level(logging.INFO):
        result = train(fast_config(tiny_base, folder, tmp_path / "run", **options))
    assert result.status == "completed" and all(np.isfinite(result.losses))
    # 3:4 → the square bucket (nearer than 1:3), 16:9 → 64x192 (3:1), 1:1 → square
    assert "aspect-ratio buckets (height x width: images): 64x192: 1, 128x128: 2" in caplog.text
    assert "captions of 3 images from metadata.jsonl" in caplog.text
    assert "- captions: metadata.jsonl" in (tmp_path / "run" / "README.md").read_text()


# --------------------------------------------------------------------------- Weights & Biases


class _StubWandb(types.ModuleType):
    """Records what the trainer gives wandb (the real package is an optional dependency)."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.calls: list[tuple] = []

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))
        return self

    def log(self, values, step=None):
        self.calls.append(("log", dict(values), step))

    def finish(self):
        self.calls.append(("finish",))

    @staticmethod
    def Histogram(values):  # noqa: N802  (wandb's name)
        return ("histogram", list(values))

    @staticmethod
    def Image(image):  # noqa: N802
        return ("image", image.size)


def test_report_to_wandb_logs_every_step_into_the_run_folder(tiny_base, instance_dir, tmp_path, monkeypatch):
    stub = _StubWandb()
    monkeypatch.setitem(sys.modules, "wandb", stub)
    out = tmp_path / "run"
    options = {"report_to": "wandb", "validation_steps": 2, "num_validation_images": 1, "nu_lr": 0.5}
    assert train(fast_config(tiny_base, instance_dir, out, **options)).status == "completed"
    (_, init), *logs, finish = stub.calls
    assert init["dir"] == str(out) and init["project"] == "lora2" and init["config"]["report_to"] == "wandb"
    assert [entry[2] for entry in logs] == [1, 2, 2] and finish == ("finish",)
    assert logs[0][1]["train/loss"] > 0 and logs[0][1]["train/ranks"][0] == "histogram"  # ranks moved at step 1
    assert logs[2][1]["validation/0"][0] == "image"
    assert "wandb" in json.loads((out / ".lora2-run.json").read_text())["written"]


def test_report_to_wandb_offline_writes_its_run_under_the_run_folder(tiny_base, instance_dir, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    assert train(fast_config(tiny_base, instance_dir, out, report_to="wandb")).status == "completed"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))


def test_missing_wandb_is_a_clear_error(tiny_base, instance_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ValueError, match=r"pip install 'lora2\[wandb\]'"):
        train(fast_config(tiny_base, instance_dir, tmp_path / "run", report_to="wandb"))
