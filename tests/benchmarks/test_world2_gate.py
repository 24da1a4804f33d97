"""benchmarks/world2_gate.py: the plan, the best learning rate, the gate statistics on synthetic numbers, and the
whole chain through `lora2 bench` with stand-in train and eval jobs."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lora2.eval.bench import bench, resolve_methods

ROOT = Path(__file__).resolve().parents[2]
FAKE = [sys.executable, str(ROOT / "tests" / "eval" / "fake_jobs.py")]


@pytest.fixture(scope="module")
def gate(load_script):
    return load_script("world2_gate")


def _synthetic(gap_per_complexity: float, noise: float, seed: int = 0):
    """10 subjects of complexity 1..10 × seeds 1, 2: low-rank DINO, high-rank DINO = low + gap + noise."""
    rng = np.random.default_rng(seed)
    complexity = {f"s{i}": float(i) for i in range(1, 11)}
    low, high = {}, {}
    for subject, c in complexity.items():
        for s in (1, 2):
            low[(subject, s)] = 0.6 - 0.01 * c + rng.normal(0, 0.02)
            high[(subject, s)] = low[(subject, s)] + gap_per_complexity * c + rng.normal(0, noise)
    return low, high, complexity


def test_paired_difference_by_hand(gate):
    low = {("a", 1): 0.5, ("a", 2): 0.4, ("b", 1): 0.6, ("b", 2): 0.5, ("c", 1): 0.9}  # ("c", 1) has no pair
    high = {("a", 1): 0.6, ("a", 2): 0.6, ("b", 1): 0.6, ("b", 2): 0.8}
    stats = gate.paired_difference(low, high)
    diffs = [0.1, 0.2, 0.0, 0.3]
    assert stats["n_pairs"] == 4
    assert stats["paired_diff"] == pytest.approx(0.15)
    assert stats["paired_se"] == pytest.approx(np.std(diffs, ddof=1) / 2)
    assert stats["dino_low"] == pytest.approx(0.5) and stats["dino_high"] == pytest.approx(0.65)
    assert gate.subject_gaps(low, high) == pytest.approx({"a": 0.15, "b": 0.15})
    with pytest.raises(ValueError, match="at least 2 common"):
        gate.paired_difference({("a", 1): 0.5}, {("a", 1): 0.6})


def test_a_discriminating_world_passes_the_gate(gate):
    low, high, complexity = _synthetic(gap_per_complexity=0.01, noise=0.005)
    result = gate.gate_result(low, high, complexity, 4, 64)
    assert list(result) == list(gate.GATE_KEYS) and result["n_pairs"] == 20
    assert result["paired_diff"] > 3 * result["paired_se"]
    assert result["spearman_gap_vs_complexity"] > 0.8
    assert gate.discriminates(result)


def test_a_world_where_rank_does_not_matter_fails_the_gate(gate):
    low, high, complexity = _synthetic(gap_per_complexity=0.0, noise=0.01)
    result = gate.gate_result(low, high, complexity, 4, 64)
    assert abs(result["paired_diff"]) < 3 * result["paired_se"]
    assert not gate.discriminates(result)
    # a large gap that shrinks with complexity fails too: the gap must grow with it
    shrinking = {s: -c for s, c in complexity.items()}
    low, high, _ = _synthetic(gap_per_complexity=0.01, noise=0.0)
    result = gate.gate_result(low, high, shrinking, 4, 64)
    assert result["paired_diff"] > 3 * result["paired_se"] and result["spearman_gap_vs_complexity"] < 0
    assert not gate.discriminates(result)


def test_the_plan_and_the_best_learning_rate(gate):
    sweep = gate.sweep_methods(gate.RANKS, gate.LEARNING_RATES)
    assert len(sweep) == 7 * 3 and "fixed-2-lr3e-4" in sweep and "fixed-128-lr3e-3" in sweep
    methods = {m.name: m for m in resolve_methods(sweep)}  # every name is a method the bench runs
    assert methods["fixed-2-lr3e-4"].train_args == {"rank_mode": "fixed", "init_rank": 2, "max_rank": 512,
                                                      "learning_rate": 3e-4}  # fmt: skip
    with pytest.raises(ValueError, match="must not repeat"):
        gate.sweep_methods((4, 4), ("1e-3",))

    subjects = ["a", "b"]
    dino = {("a", "3e-4"): 0.5, ("b", "3e-4"): 0.5, ("a", "1e-3"): 0.7, ("b", "1e-3"): 0.4,  # 1e-3: mean 0.55
            ("a", "3e-3"): 0.6, ("b", "3e-3"): 0.5}  # fmt: skip  # 3e-3: mean 0.55, a tie: the smaller rate wins
    scores = {(s, f"fixed-4-lr{lr}", 0): v for (s, lr), v in dino.items()}
    rates = ("3e-4", "1e-3", "3e-3")
    scores |= {(s, f"fixed-64-lr{lr}", 0): 0.6 if lr == "3e-4" else 0.5 for s in subjects for lr in rates}
    scores[("a", "fixed-4-lr1e-3", 1)] = 0.0  # another seed: not part of the choice
    best = gate.best_learning_rates(scores, (4, 64), rates, subjects)
    assert best == {4: "1e-3", 64: "3e-4"}
    assert gate.confirm_methods(best) == ["fixed-4-lr1e-3", "fixed-64-lr3e-4"]
    del scores[("b", "fixed-64-lr3e-3", 0)]
    with pytest.raises(ValueError, match="lacks 1 cells"):
        gate.best_learning_rates(scores, (4, 64), rates, subjects)


def test_rank_groups_put_the_gate_first(gate):
    assert gate.rank_groups(gate.RANKS) == [(4, 64), (8,), (2, 16, 32, 128)]
    assert gate.rank_groups((64, 4, 32)) == [(4, 64), (32,)]


def test_the_chain_through_the_bench_with_stand_in_jobs(gate, tmp_path, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    world = tmp_path / "world"
    for name in ("base", "clip", "dino"):
        (world / name).mkdir(parents=True)
    (world / "base" / "model_index.json").write_text("{}")
    fake = {"train_command": [*FAKE, "train"], "eval_command": [*FAKE, "eval"], "gpus": [], "poll_seconds": 0.05}
    monkeypatch.setattr(gate, "bench", lambda config: bench(replace(config, **fake)))
    subjects = ["rust_triangle", "bead_circle", "mosaic_star"]
    argv = ["run", "--world", str(world), "--out", str(tmp_path / "gate"), "--ranks", "4", "8", "64",
            "--subjects", *subjects, "--steps", "2", "--parallel", "2"]  # fmt: skip
    args = gate._parser().parse_args(argv)
    args.train_arg, args.eval_arg = [], []  # the stand-ins know no other options
    assert gate.run(args) == 0

    trains = [json.loads(line) for line in calls.read_text().splitlines() if line.startswith('["train"')]
    assert len(trains) == 3 * 3 * 3 + 3 * 2 * 3  # sweep: ranks × rates × subjects; confirmation: ranks × 2 seeds
    ranks = [int(call[call.index("--init-rank") + 1]) for call in trains]
    assert set(ranks[: 2 * 3 * 3 + 2 * 2 * 3]) == {4, 64}  # the gate's pair swept and confirmed before rank 8
    result = json.loads((tmp_path / "gate" / "world2_gate.json").read_text())
    assert list(result) == list(gate.GATE_KEYS)
    # the stand-in eval: 0.5 + 0.001 · rank · len(name) / 10 at the best rate 1e-3
    gaps = {s: 0.001 * (64 - 4) * len(s) / 10 for s in subjects}
    assert result["low_rank"] == 4 and result["high_rank"] == 64 and result["n_pairs"] == 6
    assert result["paired_diff"] == pytest.approx(sum(gaps.values()) / 3)
    details = json.loads((tmp_path / "gate" / "world2_gate_cells.json").read_text())
    assert details["best_learning_rate"] == {"4": "1e-3", "8": "1e-3", "64": "1e-3"}
    assert details["subject_gap"] == pytest.approx(gaps)
    complexity = details["complexity_png_bits_per_pixel"]
    expected_rho = gate.spearman([complexity[s] for s in subjects], [gaps[s] for s in subjects])
    assert result["spearman_gap_vs_complexity"] == pytest.approx(expected_rho)
    assert math.isfinite(result["paired_se"])
    assert gate.run(args) == 0  # a second call finds every cell done and trains nothing
    assert len([line for line in calls.read_text().splitlines() if line.startswith('["train"')]) == len(trains)
    # a diagnostic sweep of one more rate for one rank: its seed-0 cells only, in the same bench folder
    (tmp_path / "gate" / "world2_gate.json").unlink()
    args.sweep_only, args.ranks, args.learning_rates = True, [4], ["1e-2"]
    assert gate.run(args) == 0
    added = [json.loads(line) for line in calls.read_text().splitlines() if line.startswith('["train"')][len(trains) :]
    assert len(added) == len(subjects) and {call[call.index("--seed") + 1] for call in added} == {"0"}
    assert not (tmp_path / "gate" / "world2_gate.json").exists()


def test_no_bench_starts_without_the_time_a_cell_needs(gate, monkeypatch):
    import time

    monkeypatch.setattr(gate, "bench", lambda config: pytest.fail("a bench started without time left"))
    deadline = time.time() + gate.MIN_SECONDS - 5
    assert gate._bench(None, {}, None, ["a"], ["fixed-4-lr1e-3"], (0,), deadline=deadline) == {}


def test_the_multi_subject_folder_captions_each_subject_with_its_own_identifier(gate, tmp_path):
    from lora2.data.dreambooth import load_subject, load_subjects
    from lora2.world.world2 import write_world2_subjects

    root = write_world2_subjects(tmp_path / "subjects", size=32)
    names = ["rust_triangle", "glyph_plaque", "mosaic_star"]
    identifiers = gate.write_multi_subject(root, names, tmp_path / "multi")
    assert identifiers == dict(zip(names, ("sks", "zwx", "qrv")))
    folder = tmp_path / "multi" / gate.MULTI_SUBJECT
    combined = load_subject(folder)  # a subject the bench and the trainer load like any other
    originals = load_subjects(root)
    assert len(combined.image_paths) == sum(len(originals[n].image_paths) for n in names)
    captions = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert sorted(c["file_name"] for c in captions) == [p.name for p in combined.image_paths]
    for caption in captions:
        name = next(n for n in names if caption["file_name"].startswith(f"{n}_"))
        assert caption["text"] == originals[name].instance_prompt(identifiers[name])
        assert " a " not in f" {caption['text'][2:]} "  # "a" is the trainer's identifier: only the article holds it
    assert gate.write_multi_subject(root, names, tmp_path / "multi") == identifiers  # written once
    with pytest.raises(ValueError, match="was written for the subjects"):
        gate.write_multi_subject(root, names[:2], tmp_path / "multi")
    with pytest.raises(ValueError, match="not under"):
        gate.write_multi_subject(root, ["no_such_subject"], tmp_path / "other")
    with pytest.raises(ValueError, match="identifiers"):
        gate.write_multi_subject(root, [f"s{i}" for i in range(len(gate.IDENTIFIERS) + 1)], tmp_path / "more")


def test_the_crowd_trains_thirty_subjects_in_one_folder_of_its_own_dataset(gate, tmp_path, monkeypatch):
    from lora2.data.dreambooth import load_subject
    from lora2.world.world2 import CROWD_DATASET_VERSION, CROWD_SUBJECTS

    seen = {}
    monkeypatch.setattr(gate, "run", lambda args: seen.setdefault("args", args) and 0)
    gate.main(
        ["run", "--crowd", "--world", str(tmp_path), "--out", str(tmp_path / "g"), "--eval-arg", "max_prompts=3"]
    )
    args = seen["args"]
    assert args.multi and args.steps == gate.CROWD["steps"] and "train_batch_size=12" in args.train_arg
    assert args.eval_arg == ["num_images=1", "max_prompts=3"]  # the protocol's evaluation, then the options given
    root = gate._subjects_root(args, tmp_path / "g", args.subject_set)
    assert json.loads((root / "subjects.json").read_text())["version"] == CROWD_DATASET_VERSION
    names = [s.name for s in CROWD_SUBJECTS]
    identifiers = gate.write_multi_subject(root, names, tmp_path / "g" / "multi", gate.CROWD_SUBJECT)
    assert list(identifiers) == names and len(set(identifiers.values())) == 30
    folder = load_subject(tmp_path / "g" / "multi" / gate.CROWD_SUBJECT)  # its own prompts file names the folder
    assert folder.class_name == "object" and len(folder.image_paths) == 150
    with pytest.raises(ValueError, match="holds the subjects of dataset"):
        gate._subjects_root(args, tmp_path / "g")  # the ten need a folder of their own


@pytest.mark.parametrize("subject_set", ["families", "lookalikes", "siblings"])
def test_a_thirty_subject_set_trains_in_one_folder_of_its_own_dataset(gate, tmp_path, monkeypatch, subject_set):
    from lora2.world.world2 import SUBJECT_SETS

    subjects, version = SUBJECT_SETS[subject_set]
    seen = {}
    monkeypatch.setattr(gate, "run", lambda args: seen.setdefault("args", args) and 0)
    gate.main(["run", f"--{subject_set}", "--world", str(tmp_path), "--out", str(tmp_path / "g")])
    args = seen["args"]
    assert args.subject_set == subject_set
    assert args.multi and args.steps == gate.CROWD["steps"] and args.eval_arg == ["num_images=1"]
    root = gate._subjects_root(args, tmp_path / "g", args.subject_set)
    assert json.loads((root / "subjects.json").read_text())["version"] == version
    names = [s.name for s in subjects]
    assert list(gate.write_multi_subject(root, names, tmp_path / "g" / "multi", gate.CROWD_SUBJECT)) == names
    with pytest.raises(SystemExit):
        gate.main(["run", f"--{subject_set}", "--crowd", "--world", str(tmp_path), "--out", str(tmp_path / "h")])


def test_the_multi_subject_gate_end_to_end_on_a_tiny_world(gate, tmp_path):
    """Real jobs (tiny world pretrained on the CPU, two training steps, one image per evaluation): one adapter per
    rank and seed, evaluated per subject with its identifier, decided per (subject, seed)."""
    out = tmp_path / "gate"
    assert gate.main(["run", "--tiny", "--multi", "--out", str(out)]) == 0
    cells = out / "bench" / "cells"
    assert [p.name for p in cells.iterdir()] == [gate.MULTI_SUBJECT]  # one bench subject: the folder of all
    run = cells / gate.MULTI_SUBJECT / "fixed-4-lr1e-3" / "seed1" / "run"
    config = (run / "train_config.yaml").read_text()
    assert "train_batch_size: 4" in config and "identifier: a" in config
    evaluation = json.loads((run / "eval.json").read_text())
    subjects = gate.TINY["subjects"]
    assert list(evaluation["subjects"]) == list(subjects)
    for subject, identifier in zip(subjects, gate.IDENTIFIERS):
        single = json.loads((run / f"eval_{subject}.json").read_text())
        assert single["subject"] == subject and single["identifier"] == identifier
        assert evaluation["subjects"][subject]["summary"] == single["summary"]
    means = [evaluation["subjects"][s]["summary"]["dino"]["mean"] for s in subjects]
    assert evaluation["summary"]["dino"]["mean"] == pytest.approx(sum(means) / len(means))
    scores = gate.multi_scores(out / "bench")
    assert len(scores) == len(subjects) * 2 * 3  # subjects × ranks × seeds 0-2
    result = json.loads((out / "world2_gate.json").read_text())
    assert list(result) == list(gate.GATE_KEYS) and result["n_pairs"] == len(subjects) * 2
