"""benchmarks/world_defaults.py: folders pooled with the first folder's cell kept, summaries over the right cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora2.eval.report import CellResult


@pytest.fixture(scope="module")
def defaults(load_script):
    return load_script("world_defaults")


def _cell(method: str, seed: int, dino: float, size_gb: float, folder: str) -> CellResult:
    scores = {"dino": dino, "clip_i": dino / 2, "clip_t": 0.4}
    return CellResult("toy", method, seed, "done", scores=scores, size_gb=size_gb, mean_rank=8.0, folder=folder)


def test_a_cell_in_two_folders_counts_once_from_the_first(defaults, monkeypatch):
    folders = {
        "a": [_cell("lora2", 0, 0.5, 1.0, "a"), CellResult("toy", "lora2", 1, "failed", folder="a")],
        "b": [_cell("lora2", 0, 0.9, 1.0, "b"), _cell("lora2", 1, 0.7, 1.0, "b"),
              _cell("lora2-wp1e-4", 0, 0.4, 2.0, "b")],
    }  # fmt: skip
    monkeypatch.setattr(defaults, "collect", lambda folder: folders[str(folder)])
    cells, repeats = defaults.pooled_cells([Path("a"), Path("b")])
    assert [(a.folder, b.folder, b.scores["dino"]) for a, b in repeats] == [("a", "b", 0.9)]
    assert sorted((c.method, c.seed, c.folder) for c in cells) == [("lora2", 0, "a"), ("lora2", 1, "b"),
                                                                   ("lora2-wp1e-4", 0, "b")]  # fmt: skip
    summary = defaults.method_summary(cells, "lora2")
    assert summary["lora2"]["dino"] == pytest.approx(0.6) and summary["lora2"]["cells"] == 2
    assert summary["lora2-wp1e-4"]["size_over_reference"] == pytest.approx(2.0)
