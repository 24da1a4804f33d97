"""What `lora2 train` does when things go wrong: one line naming the file or value, the right exit code, nothing lost
(issue 14), and the real-scale crash of bf16 prior preservation (issue 16) on a tiny model configured like SDXL's."""

from __future__ import annotations

import json
import os
import signal

import pytest
from train_helpers import fast_config

from lora2.cli import main
from lora2.lockfile import HOST, process_start
from lora2.train import recipe
from lora2.train.recipe import TrainingDiverged, train
from lora2.train.run_folder import LOCK
from lora2.world.tiny import build_tiny_sdxl


def _argv(base, instance_dir, out, *extra) -> list[str]:
    return ["train", "--base", str(base), "--instance-data-dir", str(instance_dir), "--class-name", "dog",
            "--output-dir", str(out), "--resolution", "32", "--max-train-steps", "2", "--sample-steps", "1",
            "--sample-prompts", "{instance}", "--report-to", "none", "--device", "cpu", *extra]  # fmt: skip


@pytest.mark.parametrize("kind", ["missing", "not_a_pipeline", "offline_hub_id"])
def test_bad_base_model_is_one_line(tmp_path, instance_dir, caplog, kind):
    if kind == "missing":
        base, match = tmp_path / "nowhere" / "sdxl", "base model folder not found"
    elif kind == "not_a_pipeline":
        base, match = tmp_path / "folder", "has no model_index.json"
        base.mkdir()
    else:
        base, match = "some-org/some-model", "cannot load base model 'some-org/some-model'"
    assert main(_argv(base, instance_dir, tmp_path / "run")) == 2
    assert match in caplog.text and "Traceback" not in caplog.text


def test_sigterm_exits_143_and_resumes(tiny_base, instance_dir, tmp_path, monkeypatch):
    real_loss = recipe.diffusion_loss

    def loss_then_sigterm(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(recipe, "diffusion_loss", loss_then_sigterm)
    out = tmp_path / "run"
    assert main(_argv(tiny_base, instance_dir, out)) == 143
    monkeypatch.setattr(recipe, "diffusion_loss", real_loss)
    assert (out / "checkpoint-1").is_dir() and not (out / LOCK).exists()
    assert main(_argv(tiny_base, instance_dir, out, "--resume", "latest")) == 0
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_diverging_learning_rate_stops_with_code_3_naming_no_checkpoint(tiny_base, instance_dir, tmp_path, caplog):
    out = tmp_path / "run"
    code = main(
        _argv(tiny_base, instance_dir, out, "--learning-rate", "1e4", "--nu-lr", "1e4", "--max-train-steps", "4")
    )
    assert code == 3
    assert "diverged" in caplog.text and "no checkpoint was written" in caplog.text


def test_divergence_after_a_checkpoint_names_it(tiny_base, instance_dir, tmp_path, monkeypatch):
    real_loss = recipe.diffusion_loss
    calls = {"n": 0}

    def nan_at_second_step(*args, **kwargs):
        calls["n"] += 1
        return real_loss(*args, **kwargs) * (float("nan") if calls["n"] == 2 else 1.0)

    monkeypatch.setattr(recipe, "diffusion_loss", nan_at_second_step)
    with pytest.raises(TrainingDiverged, match="step 2.*the last checkpoint is .*checkpoint-1"):
        train(fast_config(tiny_base, instance_dir, tmp_path / "run", checkpointing_steps=1, max_train_steps=3))


def test_two_trainers_never_share_a_folder(tiny_base, instance_dir, tmp_path, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lora2-run.json").write_text('{"lora2_run": 1, "written": []}')
    (out / LOCK).write_text(json.dumps({"host": HOST, "pids": [[1, process_start(1)]]}))  # pid 1 is alive
    assert main(_argv(tiny_base, instance_dir, out)) == 2
    assert "in use by another lora2 train" in caplog.text
    assert sorted(p.name for p in out.iterdir()) == [".lora2-run.json", LOCK]


def test_bf16_prior_preservation_with_an_fp32_upcast_vae(instance_dir, tmp_path):
    # SDXL's VAE config has force_upcast: the trainer keeps it in fp32 while the UNet and text encoders run in bf16;
    # generating class images must still decode (issue 16: "Input type (BFloat16) and bias type (float)")
    base = build_tiny_sdxl(tmp_path / "base", vae_config={"force_upcast": True})
    config = fast_config(
        base, instance_dir, tmp_path / "run", mixed_precision="bf16", with_prior_preservation=True,
        num_class_images=1, class_generation_steps=1, max_train_steps=1,
    )  # fmt: skip
    result = train(config)
    assert result.status == "completed" and (tmp_path / "run" / "class_images" / "class_00000.png").is_file()
