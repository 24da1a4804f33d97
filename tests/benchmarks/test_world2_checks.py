"""benchmarks/world2_checks.py: the confusion check's distances, and its refusal of a gate record of another set."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def checks(load_script):
    return load_script("world2_checks")


def test_distinctness_measures_the_nearest_subject_and_the_class_of_others(checks):
    axes = torch.eye(3)
    embeddings = {  # two views each; a and b lie 60° apart in one class, c stands alone in its own
        "a": torch.stack([axes[0], axes[0]]),
        "b": torch.stack([axes[0] * 0.5 + axes[1] * 0.75**0.5] * 2),
        "c": torch.stack([axes[2], axes[2]]),
    }
    measured = checks.distinctness(embeddings, {"a": "hexagon", "b": "hexagon", "c": "star"})
    assert measured["a"] == pytest.approx({"nearest": 0.5, "class": 0.5})
    assert measured["b"] == pytest.approx({"nearest": 0.5, "class": 0.5})
    assert measured["c"] == {"nearest": 1.0}  # orthogonal to both, and no other star


def test_confusion_names_the_subjects_the_gate_record_lacks(checks, tmp_path):
    record = tmp_path / "cells.json"
    record.write_text(json.dumps({"subject_gap": {"rust_triangle": 0.1}, "complexity_png_bits_per_pixel": {}}))
    with pytest.raises(ValueError, match="no gap for subject.*sky_hexagon.*--set"):
        checks.confusion(str(tmp_path / "no_dino"), checks.load_subjects(None), str(record))
