"""The peft baselines in the benchmark: registered as trainable methods, validated before any job, and their
real training runs evaluated by ``lora2 eval --run``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from lora2.cli import main
from lora2.eval.bench import ADALORA_RANKS, DORA_RANK, BenchConfig, bench, method_registry
from lora2.train.config import TrainConfig
from lora2.train.recipe import train

FAKE = [sys.executable, str(Path(__file__).parent / "fake_jobs.py")]


def _config(out: Path, dreambooth_root: Path, methods: list[str], **overrides) -> BenchConfig:
    values = dict(
        subjects=["toy1"], methods=methods, out=str(out), seeds=[0], data_root=str(dreambooth_root), steps=2,
        base="hub-org/some-model", gpus=[], cpu_jobs=2, poll_seconds=0.05, train_command=[*FAKE, "train"],
        eval_command=[*FAKE, "eval"], resize_command=[*FAKE, "resize"],
    )  # fmt: skip
    return BenchConfig(**{**values, **overrides})


def test_registry_has_trainable_peft_methods():
    registry = method_registry()
    assert registry["dora"].kind == "train" and registry["adalora"].kind == "train"
    assert registry["dora"].train_args == {"adapter_type": "dora", "init_rank": DORA_RANK}
    assert registry["adalora"].train_args == {
        "adapter_type": "adalora",
        "init_rank": ADALORA_RANKS[0],
        "target_rank": ADALORA_RANKS[1],
    }
    assert not [m.name for m in registry.values() if m.kind == "unsupported"]
    for method in ("dora", "adalora"):  # the trainer accepts them at the bench's usual step counts
        TrainConfig.from_dict({"max_train_steps": 300, **registry[method].train_args})


def test_bench_runs_peft_methods(tmp_path, dreambooth_root, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    assert bench(_config(tmp_path / "bench", dreambooth_root, ["dora", "adalora"])) == {"done": 2}
    trains = [json.loads(line) for line in calls.read_text().splitlines() if line.startswith('["train"')]
    flags = {call[call.index("--adapter-type") + 1]: call for call in trains}
    assert set(flags) == {"dora", "adalora"}
    assert flags["adalora"][flags["adalora"].index("--target-rank") + 1] == str(ADALORA_RANKS[1])


def test_interrupted_adalora_cell_restarts_and_dora_resumes(tmp_path, dreambooth_root, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    out = tmp_path / "bench"
    for method in ("dora", "adalora"):  # what a run stopped by --time-limit leaves
        (out / "cells" / "toy1" / method / "seed0" / "run" / "checkpoint-1").mkdir(parents=True)
    assert bench(_config(out, dreambooth_root, ["dora", "adalora"])) == {"done": 2}
    trains = [json.loads(line) for line in calls.read_text().splitlines() if line.startswith('["train"')]
    flags = {call[call.index("--adapter-type") + 1]: call for call in trains}
    assert "--resume" in flags["dora"] and "--overwrite" not in flags["dora"]
    assert "--overwrite" in flags["adalora"] and "--resume" not in flags["adalora"]


def test_bad_training_options_fail_before_any_job(tmp_path, dreambooth_root, monkeypatch):
    calls = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls))
    # tinit = round(0.9 · 2) = 2 steps leaves AdaLoRA no pruning phase in a 2-step run
    with pytest.raises(ValueError, match="method 'adalora'.*no pruning phase"):
        bench(_config(tmp_path / "bench", dreambooth_root, ["fixed-8", "adalora"], train_args=["adalora_tinit=0.9"]))
    with pytest.raises(ValueError, match="method 'fixed-8'"):
        bench(_config(tmp_path / "bench", dreambooth_root, ["fixed-8"], train_args=["adapter_type=lokr"]))
    assert not calls.exists() and not (tmp_path / "bench").exists()


@pytest.mark.parametrize("adapter_type", ["dora", "adalora"])
def test_eval_run_of_a_peft_training_run(adapter_type, tiny_sdxl, dreambooth_root, evaluators, tmp_path):
    run = tmp_path / "run"
    sizes = {"dora": {"init_rank": 4}, "adalora": {"init_rank": 4, "target_rank": 2, "adalora_delta_t": 1}}
    config = TrainConfig.from_dict(dict(
        base=str(tiny_sdxl), instance_data_dir=str(dreambooth_root / "pup"), output_dir=str(run), resolution=32,
        max_train_steps=3, learning_rate=1e-2, sample_steps=1, sample_prompts=["{instance}"], report_to="none",
        device="cpu", adapter_type=adapter_type, **sizes[adapter_type],
    ))  # fmt: skip
    assert train(config).status == "completed"
    dino, clip = evaluators
    argv = ["eval", "--run", str(run), "--num-images", "1", "--max-prompts", "1", "--num-inference-steps", "2",
            "--dino-model", str(dino), "--clip-model", str(clip), "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["lora"].endswith("pytorch_lora_weights.safetensors")
    assert all(-1.0 <= result["summary"][m]["mean"] <= 1.0 for m in ("dino", "clip_i", "clip_t"))
    adapter = result["adapter"]
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    if adapter_type == "dora":
        assert adapter["mean_rank"] == 4 and adapter["num_modules"] == 32
        assert adapter["parameters"] == log[-1]["adapter_params"]  # pairs plus magnitude vectors
    else:
        assert adapter["total_rank"] == 2 * 32 == log[-1]["total_rank"]  # the ranks AdaLoRA kept
        assert adapter["size_gb_fp32"] > 0
