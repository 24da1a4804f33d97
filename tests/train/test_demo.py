"""`lora2 demo` runs offline end to end (2 steps here) and writes adapter, grid, heatmap, samples and metrics."""

from __future__ import annotations

import json

import pytest

from lora2.cli import main
from lora2.train.model import world_path


def test_demo_writes_its_outputs(tmp_path):
    assert main(["demo", "--out", str(tmp_path), "--steps", "2"]) == 0
    run = tmp_path / "run"
    for name in (
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
        "sample_grid.png",
        "rank_heatmap.png",
        "README.md",
    ):
        assert (run / name).is_file(), name
    assert len(list((run / "samples").glob("lora2_*.png"))) == 4
    if world_path("dino_evaluator") and world_path("clip_evaluator"):
        metrics = json.loads((tmp_path / "metrics.json").read_text())
        assert set(metrics) == {"base", "lora2"} and set(metrics["lora2"]) == {"dino", "clip_i", "clip_t"}


def test_demo_names_an_unknown_subject(tmp_path):
    from lora2.demo import demo

    with pytest.raises(ValueError, match="no_such_subject"):
        demo(tmp_path, max_train_steps=1, subject="no_such_subject")
