"""The run folder: ownership (marker + manifest), the lock, the step log (issue 14: nothing lost, nothing written
where it should not be)."""

from __future__ import annotations

import json
import logging
import subprocess

import pytest

from lora2.lockfile import HOST, process_start
from lora2.train.run_folder import LOCK, MARKER, RunFolder, RunFolderError


def test_new_folder_is_marked_and_overwrite_removes_only_the_manifest(tmp_path):
    folder = RunFolder(tmp_path / "run")
    folder.prepare_new(overwrite=False)
    assert folder.owned and folder.manifest() == []
    folder.record("train_config.yaml", "checkpoint-*")
    for name in ("train_config.yaml", "checkpoint-3", "checkpoint-4.tmp", "notes.txt"):
        (folder.root / name).mkdir() if name.startswith("checkpoint") else (folder.root / name).write_text("x")
    with pytest.raises(RunFolderError, match="already holds a run"):
        folder.prepare_new(overwrite=False)
    folder.prepare_new(overwrite=True)
    assert sorted(p.name for p in folder.root.iterdir()) == [MARKER, "notes.txt"]


def test_a_folder_of_other_files_is_refused_and_left_untouched(tmp_path):
    (tmp_path / "photo.jpg").write_bytes(b"jpeg")
    folder = RunFolder(tmp_path)
    for overwrite in (False, True):
        with pytest.raises(RunFolderError, match="did not write.*photo.jpg"):
            folder.prepare_new(overwrite)
    with pytest.raises(RunFolderError, match="no checkpoint to resume"):
        folder.check_resumable_without_checkpoint()
    assert [p.name for p in tmp_path.iterdir()] == ["photo.jpg"]


def test_a_legacy_run_folder_is_recognised(tmp_path):
    # written by lora2 before the marker existed: a training config and layout entries only
    for name in ("train_config.yaml", "log.jsonl", "pytorch_lora_weights.safetensors"):
        (tmp_path / name).write_text("x")
    (tmp_path / "checkpoint-2").mkdir()
    RunFolder(tmp_path).prepare_new(overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == [MARKER]


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path, caplog):
    folder = RunFolder(tmp_path)
    holder = subprocess.Popen(["sleep", "30"])
    try:
        record = {"host": HOST, "pids": [[holder.pid, process_start(holder.pid)]]}
        (tmp_path / LOCK).write_text(json.dumps(record))
        with pytest.raises(RunFolderError, match=f"in use by another lora2 train \\(process \\[{holder.pid}\\]\\)"):
            with folder.locked():
                pass
    finally:
        holder.kill()
        holder.wait()
    with caplog.at_level(logging.WARNING), folder.locked():
        assert json.loads((tmp_path / LOCK).read_text())["pids"][0][0] != holder.pid
    assert "stale lock" in caplog.text and not (tmp_path / LOCK).exists()
    (tmp_path / LOCK).write_text(json.dumps({"pids": [[1, ""]], "host": "another-host"}))
    with pytest.raises(RunFolderError, match="locked by process \\[1\\] on host another-host"):
        with folder.locked():
            pass


def test_torn_last_log_line_is_dropped_and_a_bad_middle_line_named(tmp_path, caplog):
    folder = RunFolder(tmp_path)
    folder.append_log({"step": 0, "ranks": {"a": 2}})
    folder.append_log({"step": 1, "loss": 1.0})
    with open(folder.log_path, "a", encoding="utf-8") as handle:
        handle.write('{"step": 2, "lo')  # a crash mid-write
    with caplog.at_level(logging.WARNING):
        assert [r["step"] for r in folder.read_log()] == [0, 1]
    assert "torn last line" in caplog.text
    folder.truncate_log(1)
    assert folder.rank_history() == ([0, 1], [{"a": 2}, {"a": 2}])
    folder.log_path.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="log.jsonl: line 2"):
        folder.read_log()
