"""benchmarks/world2_compare.py: the method plan resolves in the bench, the analysis on synthetic numbers, and the
chain after the gate through ``lora2 bench`` with stand-in jobs (tests/eval/fake_jobs.py)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from lora2.eval.bench import bench, resolve_methods

ROOT = Path(__file__).resolve().parents[2]
FAKE = [sys.executable, str(ROOT / "tests" / "eval" / "fake_jobs.py")]
BEST_FIXED = {2: "3e-3", 4: "3e-3", 8: "1e-3", 16: "1e-3", 32: "1e-3", 64: "3e-4", 128: "3e-4"}


@pytest.fixture(scope="module")
def compare(load_script):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    return load_script("world2_compare")


def test_every_planned_method_resolves_with_its_dependencies(compare):
    best_lora2 = dict.fromkeys(compare.TARGETS, "1e-3")
    methods = compare.main_methods(BEST_FIXED, best_lora2)
    resolved = {m.name: m for m in resolve_methods(methods)}
    assert len(resolved) == len(methods) == 7 + 4 * 5 + 2 + len(compare.ABLATIONS)
    assert resolved["iso-lr3e-3-lora2-rt4-lr1e-3"].depends_on == ("lora2-rt4-lr1e-3",)  # fixed-4's rate
    assert resolved["svd-fixed-128-lr3e-4-uniform-lora2-rt64-lr1e-3"].train_args == {"allocation": "uniform"}
    assert resolved["lora2-rt16-lr1e-3-scalesum"].train_args["lambda_scaling"] == "sum"
    assert resolved["adalora-32-16-lr1e-3"].train_args["target_rank"] == 16
    pairs = compare.comparison_pairs(BEST_FIXED, best_lora2)
    assert all(a in resolved and b in resolved for a, b in pairs)
    with pytest.raises(ValueError, match="fixed rank 128"):
        compare.main_methods({4: "1e-3", 64: "1e-3"}, best_lora2)


def test_curve_interpolation_and_the_gap_to_the_fixed_curve(compare):
    assert compare.curve_at([(1.0, 0.5), (4.0, 0.7)], 2.0) == pytest.approx(0.6)  # halfway in log size
    assert compare.curve_at([(1.0, 0.5), (4.0, 0.7)], 8.0) is None
    points = {
        name: {"size_gb": {"mean": size, "se": 0}, **{m: {"mean": score, "se": 0} for m in compare.METRICS}}
        for name, size, score in (("fixed-4", 1.0, 0.5), ("fixed-16", 4.0, 0.7), ("lora2-rt8", 2.0, 0.65))
    }
    gaps = compare.against_fixed_curve(points, ["fixed-4", "fixed-16"], ["lora2-rt8"])
    assert gaps["lora2-rt8"]["minus_fixed_curve"]["dino"] == pytest.approx(0.05)


def test_the_chain_after_the_gate_with_stand_in_jobs(compare, tmp_path, monkeypatch):
    gate = compare.gate
    monkeypatch.setenv("FAKE_CALLS", str(tmp_path / "calls.jsonl"))
    world = tmp_path / "world"
    for name in ("base", "clip", "dino"):
        (world / name).mkdir(parents=True)
    (world / "base" / "model_index.json").write_text("{}")
    fake = {"train_command": [*FAKE, "train"], "eval_command": [*FAKE, "eval"], "gpus": [], "poll_seconds": 0.05,
            "resize_command": [*FAKE, "resize"]}  # fmt: skip
    monkeypatch.setattr(gate, "bench", lambda config: bench(replace(config, **fake)))
    monkeypatch.setattr(compare, "TARGETS", (4, 16))
    monkeypatch.setattr(compare, "ABLATIONS", ("le0",))
    monkeypatch.setattr(gate, "discriminates", lambda result, min_z=3.0: True)
    subjects = ["rust_triangle", "mosaic_star"]
    common = ["--world", str(world), "--subjects", *subjects, "--steps", "2", "--parallel", "2"]
    args = gate._parser().parse_args(["run", "--out", str(tmp_path / "gate"), "--ranks", "4", "16", "64", "128",
                                      "--learning-rates", "1e-3", "3e-3", *common])  # fmt: skip
    args.train_arg, args.eval_arg = [], []  # the stand-ins know no other options
    assert gate.run(args) == 0
    args = compare._parser().parse_args(["run", "--gate", str(tmp_path / "gate"), *common])
    args.train_arg, args.eval_arg = [], []
    monkeypatch.setattr(compare, "LEARNING_RATES", ("1e-3", "3e-3"))
    assert compare.run(args) == 0

    rates = json.loads((tmp_path / "gate" / "world2_compare_rates.json").read_text())
    assert rates == {"4": "1e-3", "16": "1e-3"}  # the stand-in eval's best rate
    out = tmp_path / "compare.json"
    argv = ["analyze", "--gate", str(tmp_path / "gate"), "--json", str(out), "--plot", str(tmp_path / "p.png")]
    assert compare.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["curves"]["lora2"] == ["lora2-rt4-lr1e-3", "lora2-rt16-lr1e-3"]
    assert {t["other"] for t in result["paired"]} >= {"iso-lr1e-3-lora2-rt4-lr1e-3", "lora2-rt16-lr1e-3"}
    assert all(t["pairs"] == 6 and 0 < t["p_holm"] <= 1 for t in result["paired"])  # 2 subjects × 3 seeds
    assert result["points"]["iso-lr1e-3-lora2-rt16-lr1e-3"]["cells"] == 6
    assert (tmp_path / "p.png").stat().st_size > 1000
