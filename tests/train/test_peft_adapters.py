"""The peft baselines of ``lora2 train`` (``adapter_type`` dora / adalora) on the tiny SDXL pipeline (CPU)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from peft import PeftModel
from peft.tuners.adalora import AdaLoraModel
from safetensors.torch import load_file
from train_helpers import fast_config, train_with_sigterm_at_step

from lora2.cli import main
from lora2.eval.evaluate import adapter_summary
from lora2.train.adapters import backend_class
from lora2.train.config import TrainConfig
from lora2.train.recipe import train

NUM_LAYERS = 32  # to_q/k/v/out.0 of the tiny UNet's 8 attention blocks


def _dora_config(tiny_base, instance_dir, out, **overrides):
    values = dict(adapter_type="dora", init_rank=4, learning_rate=1e-2, max_train_steps=3, checkpointing_steps=3)
    return fast_config(tiny_base, instance_dir, out, **{**values, **overrides})


def _adalora_config(tiny_base, instance_dir, out, **overrides):
    # tinit = 1, tfinal = 1: step 1 at init_rank 4, budget pruning at steps 2..3, final masks from step 3 on
    values = dict(
        adapter_type="adalora", init_rank=4, target_rank=2, adalora_tinit=0.25, adalora_tfinal=0.25,
        adalora_delta_t=1, learning_rate=1e-2, max_train_steps=4, checkpointing_steps=4,
        export_formats=["diffusers", "kohya"],
    )  # fmt: skip
    return fast_config(tiny_base, instance_dir, out, **{**values, **overrides})


@pytest.fixture(scope="module")
def dora_run(tiny_base, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dora") / "run"
    return _dora_config(tiny_base, instance_dir, out), train(_dora_config(tiny_base, instance_dir, out))


@pytest.fixture(scope="module")
def adalora_run(tiny_base, instance_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("adalora") / "run"
    steps = []
    original = AdaLoraModel.update_and_allocate

    def spy(self, global_step):
        steps.append(global_step)
        return original(self, global_step)

    AdaLoraModel.update_and_allocate = spy
    try:
        result = train(_adalora_config(tiny_base, instance_dir, out))
    finally:
        AdaLoraModel.update_and_allocate = original
    return _adalora_config(tiny_base, instance_dir, out), result, steps


def _unet_output(unet: torch.nn.Module) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=generator)  # (B, C, h, w)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)  # (B, T, D)
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(1, pooled_dim, generator=generator),
        "time_ids": torch.rand(1, 6, generator=generator) * 64,
    }
    with torch.no_grad():
        return unet(sample, torch.tensor([500]), text, added_cond_kwargs=added).sample  # (B, C, h, w)


def _loaded_three_ways(tiny_base, config: TrainConfig, result) -> tuple[torch.Tensor, ...]:
    """UNet outputs: base; the trained state restored into a fresh UNet; the peft folder through
    ``PeftModel.from_pretrained``; the diffusers file through ``pipe.load_lora_weights``."""
    base = UNet2DConditionModel.from_pretrained(tiny_base / "unet").eval()
    restored = UNet2DConditionModel.from_pretrained(tiny_base / "unet").eval()
    backend = backend_class(config.adapter_type)(config)
    backend.inject({"unet": restored})
    backend.restore(result.adapter_state, backend.ranks())
    with warnings.catch_warnings():
        # peft warns (and loads nothing for them) when adapter keys are missing or unexpected
        warnings.filterwarnings("error", message=".*(missing|unexpected) adapter keys")
        from_peft = PeftModel.from_pretrained(
            UNet2DConditionModel.from_pretrained(tiny_base / "unet"), str(result.output_dir / "peft")
        ).eval()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base)
    pipe.load_lora_weights(str(result.output_dir / "pytorch_lora_weights.safetensors"))
    return tuple(_unet_output(m) for m in (base, restored, from_peft.base_model.model, pipe.unet.eval()))


# --------------------------------------------------------------------------- configuration


def test_bad_adapter_type_is_refused():
    with pytest.raises(ValueError, match="adapter_type.*'lokr'"):
        TrainConfig.from_dict({"adapter_type": "lokr"})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"adapter_type": "adalora", "init_rank": 8, "target_rank": 16}, "target_rank in \\[1, init_rank=8\\]"),
        ({"adapter_type": "adalora", "init_rank": 8, "target_rank": 4.5}, "integer target_rank"),
        ({"adapter_type": "adalora", "init_rank": 8, "target_rank": 4, "adalora_tinit": 0.6, "adalora_tfinal": 0.5},
         "no pruning phase"),
        ({"adapter_type": "adalora", "init_rank": 8, "target_rank": 4, "rank_pattern": {"to_q": 2}}, "rank_pattern"),
        ({"adapter_type": "dora", "train_text_encoder": True}, "train_text_encoder needs adapter_type 'lora2'"),
    ],
)  # fmt: skip
def test_bad_peft_settings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(overrides)


def test_peft_config_mapping():
    dora_config = TrainConfig.from_dict({"adapter_type": "dora", "init_rank": 16, "lora_alpha": 32.0})
    dora = backend_class("dora").peft_config(dora_config)
    assert dora.use_dora and dora.r == 16 and dora.lora_alpha == 32.0
    assert set(dora.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    config = TrainConfig.from_dict(
        {"adapter_type": "adalora", "init_rank": 32, "target_rank": 16, "max_train_steps": 300}
    )
    adalora = backend_class("adalora").peft_config(config)
    assert (adalora.init_r, adalora.target_r, adalora.lora_alpha, adalora.total_step) == (32, 16, 32, 300)
    assert (adalora.tinit, adalora.tfinal, adalora.deltaT, adalora.orth_reg_weight) == (30, 60, 10, 0.5)


# --------------------------------------------------------------------------- DoRA


def test_dora_run_trains_and_saves(dora_run):
    _, result = dora_run
    out = result.output_dir
    assert result.status == "completed" and len(result.losses) == 3
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert set(result.ranks.values()) == {4} and len(result.ranks) == NUM_LAYERS
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] and config["r"] == 4
    assert any(key.endswith("lora_magnitude_vector") for key in load_file(out / "peft" / "adapter_model.safetensors"))
    summary = adapter_summary(out / "pytorch_lora_weights.safetensors")
    assert summary["mean_rank"] == 4 and summary["num_modules"] == NUM_LAYERS
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert summary["parameters"] == records[-1]["adapter_params"]  # r·(d_in + d_out) + d_out per layer
    assert records[-1]["regularization"] == 0.0
    assert "# DoRA DreamBooth adapter" in (out / "README.md").read_text()


def test_dora_reloads_exactly_with_peft_and_diffusers(dora_run, tiny_base):
    config, result = dora_run
    base, restored, from_peft, from_diffusers = _loaded_three_ways(tiny_base, config, result)
    assert (restored - base).abs().max() > 1e-3, "training should change the UNet for this test to mean anything"
    torch.testing.assert_close(from_peft, restored, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_diffusers, restored, atol=1e-5, rtol=0)


def test_dora_resume_equals_uninterrupted(dora_run, tiny_base, instance_dir, tmp_path, monkeypatch):
    _, straight = dora_run
    out = tmp_path / "run"
    interrupted = train_with_sigterm_at_step(_dora_config(tiny_base, instance_dir, out), monkeypatch)
    assert interrupted.status == "interrupted" and interrupted.step == 2
    resumed = train(_dora_config(tiny_base, instance_dir, out, resume="latest"))
    assert resumed.status == "completed" and resumed.step == 3
    assert straight.losses[2:] == pytest.approx(resumed.losses, abs=1e-6)
    for key, value in straight.adapter_state.items():
        torch.testing.assert_close(resumed.adapter_state[key], value, atol=1e-6, rtol=0, msg=key)


# --------------------------------------------------------------------------- AdaLoRA


def test_adalora_allocates_its_budget(adalora_run):
    _, result, steps = adalora_run
    out = result.output_dir
    assert steps == [1, 2, 3, 4]  # update_and_allocate after every optimizer step
    assert result.status == "completed" and all(torch.isfinite(torch.tensor(result.losses)))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[1]["total_rank"] == 4 * NUM_LAYERS  # step 1 <= tinit: nothing masked
    assert records[-1]["total_rank"] == 2 * NUM_LAYERS == sum(result.ranks.values())  # budget target_r per layer
    assert all(0 <= rank <= 4 for rank in result.ranks.values())
    assert all(record["regularization"] > 0 for record in records[1:])  # orthogonal regularization
    # masked triplets are zero in the trained state
    for name, rank in result.ranks.items():
        lam = result.adapter_state[f"{name}.lora_E.default"]  # (4, 1)
        assert int((lam != 0).sum()) == rank, name
    summary = adapter_summary(out / "pytorch_lora_weights.safetensors")
    assert summary["total_rank"] == 2 * NUM_LAYERS
    assert summary["ranks"] == {k.removeprefix("unet."): v for k, v in result.ranks.items() if v > 0}
    assert (out / "lora_kohya.safetensors").is_file()
    config = json.loads((out / "peft" / "adapter_config.json").read_text())
    assert config["peft_type"] == "ADALORA" and config["init_r"] == 4 and config["target_r"] == 2
    assert sum(sum(mask) for mask in config["rank_pattern"].values()) == 2 * NUM_LAYERS


def test_adalora_reloads_exactly_with_peft_and_diffusers(adalora_run, tiny_base):
    config, result, _ = adalora_run
    base, restored, from_peft, from_diffusers = _loaded_three_ways(tiny_base, config, result)
    assert (restored - base).abs().max() > 1e-4, "training should change the UNet for this test to mean anything"
    torch.testing.assert_close(from_peft, restored, atol=1e-5, rtol=0)
    torch.testing.assert_close(from_diffusers, restored, atol=1e-5, rtol=0)


def test_adalora_refuses_to_resume(adalora_run, tiny_base, instance_dir):
    config, result, _ = adalora_run
    with pytest.raises(ValueError, match="adalora' cannot resume"):
        train(_adalora_config(tiny_base, instance_dir, result.output_dir, resume="latest"))


def test_cli_flags(tiny_base, instance_dir, tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--base", str(tiny_base), "--instance-data-dir", str(instance_dir), "--class-name", "dog",
            "--output-dir", str(out), "--resolution", "32", "--max-train-steps", "1", "--sample-steps", "1",
            "--sample-prompts", "{instance}", "--report-to", "none", "--device", "cpu", "--adapter-type", "dora",
            "--init-rank", "2"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads((out / "peft" / "adapter_config.json").read_text())["r"] == 2
