"""``lora2 world info`` / ``lora2 world subjects`` and ``lora2.world.info``."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from lora2.cli import main
from lora2.world import info


def test_world_info_json(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA2_CACHE", str(tmp_path / "cache"))
    assert main(["world", "info", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    keys = {"base_model", "clip_evaluator", "dino_evaluator", "subjects_dir"}
    assert keys <= set(result) and set(result["ready"]) == keys
    assert result["paths"] == {key: result[key] for key in keys}
    subjects = Path(result["subjects_dir"])
    assert subjects.is_relative_to(tmp_path / "cache") and result["ready"]["subjects_dir"]
    assert (subjects / "subjects.json").is_file() and (subjects / "prompts_and_classes.txt").is_file()
    for key in ("base_model", "clip_evaluator", "dino_evaluator"):
        marker = "model_index.json" if key == "base_model" else "config.json"
        assert result["ready"][key] == (Path(result[key]) / marker).is_file()
    # second call reuses the cache
    mtime = (subjects / "subjects.json").stat().st_mtime_ns
    assert info()["subjects_dir"] == str(subjects) and (subjects / "subjects.json").stat().st_mtime_ns == mtime


def test_world_info_text_and_subjects_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LORA2_CACHE", str(tmp_path / "cache"))
    assert main(["world", "info"]) == 0
    assert "subjects_dir" in capsys.readouterr().out
    out = tmp_path / "subjects"
    assert main(["world", "subjects", "--out", str(out), "--size", "32"]) == 0
    assert len([p for p in out.iterdir() if p.is_dir()]) >= 12
    assert main(["world", "sample", "--out", str(tmp_path / "grid"), "-n", "10", "--size", "16"]) == 0
    assert len((tmp_path / "grid" / "captions.txt").read_text().splitlines()) == 10
    with Image.open(tmp_path / "grid" / "grid.png") as grid:
        assert grid.size == (4 * 16, 3 * 16)
