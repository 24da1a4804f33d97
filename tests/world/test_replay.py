"""Reproducible pretraining: a phase's step count is fixed by its budget and recorded; a replay takes the recorded
count, computes the same weights, and stops at the first fingerprint that differs."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from lora2.world.evaluators import train_clip
from lora2.world.replay import PROBE_STEPS, PretrainRecord, ReplayMismatch, fingerprint


def _train(
    record: PretrainRecord, max_steps: int, seconds: float = float("inf"), lr: float = 0.1, step_seconds: float = 0.0
):
    """A toy phase: a linear map fitted by SGD under the plan (each step at least ``step_seconds`` long); returns the
    model and the progress values seen."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    data = torch.randn(64, 4)
    plan = record.phase("toy", max_steps, seconds)
    plan.check_data(data)
    progress = []
    for step, fraction in plan.steps(model.parameters):
        progress.append(fraction)
        time.sleep(step_seconds)
        loss = model(data[step % 64 :][:8]).square().mean()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= lr * p.grad
                p.grad = None
    plan.finish(model.parameters())
    return model, progress


def test_unlimited_phase_runs_max_steps_with_progress_from_the_probe_on():
    record = PretrainRecord()
    _, progress = _train(record, PROBE_STEPS + 10)
    entry = record.phases["toy"]
    assert entry["total_steps"] == PROBE_STEPS + 10
    assert progress[:PROBE_STEPS] == [0.0] * PROBE_STEPS
    assert progress[PROBE_STEPS] == pytest.approx(PROBE_STEPS / (PROBE_STEPS + 10))
    assert {"data_fingerprint", "probe_fingerprint", "final_fingerprint"} <= set(entry)


def test_budget_fixes_the_total_after_the_probe():
    record = PretrainRecord()
    _train(record, 10**9, seconds=0.0)  # no time left after the probe: the phase ends there
    assert record.phases["toy"]["total_steps"] == PROBE_STEPS


def test_replay_takes_the_recorded_total_and_reproduces_the_weights(tmp_path):
    first = PretrainRecord()
    model, _ = _train(first, 10**9, seconds=0.0)
    first.write(tmp_path / "record.json")
    replay = PretrainRecord(tmp_path / "record.json")
    again, _ = _train(replay, 10**9)  # no budget: the record's total, not max_steps
    assert replay.phases["toy"]["total_steps"] == PROBE_STEPS
    assert fingerprint(again.parameters()) == fingerprint(model.parameters())
    assert replay.to_json()["replay_of"] == str(tmp_path / "record.json")


def test_total_is_fixed_once_a_share_of_the_budget_is_spent_and_replays(tmp_path):
    first = PretrainRecord()
    model, progress = _train(first, 10**9, seconds=0.6, step_seconds=0.0005)
    entry = first.phases["toy"]
    fixed_at = entry["fixed_at_step"]
    assert fixed_at > PROBE_STEPS  # 50 steps took less than FIX_FRACTION of the budget
    assert entry["total_steps"] > fixed_at
    assert progress[:fixed_at] == [0.0] * fixed_at and progress[fixed_at] == fixed_at / entry["total_steps"]
    first.write(tmp_path / "record.json")
    replay = PretrainRecord(tmp_path / "record.json")
    again, replayed = _train(replay, 10**9)
    assert replayed == progress
    assert fingerprint(again.parameters()) == fingerprint(model.parameters())


def test_replay_that_computes_otherwise_stops_at_the_probe(tmp_path):
    first = PretrainRecord()
    _train(first, PROBE_STEPS + 5)
    first.write(tmp_path / "record.json")
    with pytest.raises(ReplayMismatch, match=r"'toy'.*after 50 steps"):
        _train(PretrainRecord(tmp_path / "record.json"), PROBE_STEPS + 5, lr=0.2)


def test_replay_of_other_data_stops_before_training(tmp_path):
    record = json.loads(json.dumps({"phases": {"toy": {"total_steps": 3, "data_fingerprint": "0" * 64}}}))
    (tmp_path / "record.json").write_text(json.dumps(record))
    with pytest.raises(ReplayMismatch, match="training data"):
        _train(PretrainRecord(tmp_path / "record.json"), 3)


def test_replay_records_are_checked(tmp_path):
    with pytest.raises(ValueError, match="replay record"):
        PretrainRecord(tmp_path / "absent.json")
    (tmp_path / "record.json").write_text(json.dumps({"phases": {}}))
    with pytest.raises(ValueError, match="no phase 'toy'"):
        _train(PretrainRecord(tmp_path / "record.json"), 3)


def test_evaluator_replay_writes_the_same_weights(tmp_path):
    first = PretrainRecord()
    train_clip(tmp_path / "a", scale="tiny", record=first)
    first.write(tmp_path / "record.json")
    train_clip(tmp_path / "b", scale="tiny", record=PretrainRecord(tmp_path / "record.json"))
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
