"""The fast path's capture boundary on CPU: when it captures, re-captures and falls back, with a stand-in for
``torch.cuda.make_graphed_callables`` that replays eagerly (the GPU check of the real graphs is
benchmarks/fast_path_gradients.py)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from train_helpers import fast_config, train_with_sigterm_at_step

import lora2
from lora2.lora.layer import LoRA2Layer
from lora2.lora.model import adapters_of, layers_of
from lora2.train import recipe
from lora2.train.fast_path import HEADROOM, TOP_UP, UNetRunner, resolve_mode, unverified

AUTOCAST = {"device_type": "cpu", "dtype": torch.bfloat16, "enabled": False}


class TinyUNet(nn.Module):
    """(sample, timesteps, embeds, added_cond_kwargs) → .sample, with two adaptable linears."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, sample, timesteps, embeds, added_cond_kwargs=None):
        hidden = self.proj(sample) + embeds.mean()  # (B, 4) → (B, 6)
        return SimpleNamespace(sample=self.out(hidden) * timesteps[:, None])


class FakeCapture:
    """Records captures; the 'graph' is the module itself (replayed eagerly)."""

    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple] = []
        self.fail = fail

    def __call__(self, module, sample_args, num_warmup_iters, allow_unused_input):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing\nmore")
        self.calls.append(tuple(t.shape for t in sample_args))
        return module


def _runner(capture: FakeCapture, mode: str = "graphs") -> tuple[UNetRunner, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    unet = lora2.inject(TinyUNet(), lora2.LoRA2Config(target_modules=["proj", "out"], init_rank=2, chunk_size=2))
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    return UNetRunner(unet, None, mode, AUTOCAST, optimizer, capture), unet, optimizer


def _inputs(batch: int = 2):
    sample = torch.randn(batch, 4)  # (B, 4)
    return sample, torch.ones(batch), torch.randn(batch, 3, 5), None, torch.ones(batch, dtype=torch.bool)


def test_resolve_mode():
    assert resolve_mode("auto", torch.device("cpu")) == "none"
    assert resolve_mode("auto", torch.device("cuda")) == "graphs"
    assert resolve_mode("none", torch.device("cuda")) == "none"
    with pytest.raises(ValueError, match="needs a CUDA device, got 'cpu'"):
        resolve_mode("graphs", torch.device("cpu"))
    with pytest.raises(ValueError, match="'inductor'"):
        resolve_mode("inductor", torch.device("cuda"))


def test_captures_once_and_again_only_when_storage_or_shapes_change():
    capture = FakeCapture()
    runner, unet, optimizer = _runner(capture)
    layers = layers_of(unet)
    runner(*_inputs())
    assert len(capture.calls) == 1 and runner.captures[0]["reason"] == "first step"
    for layer in layers:  # the capture gave every layer its headroom
        assert layer.capacity - layer.r >= math.ceil(TOP_UP * HEADROOM * layer.r)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in unet.parameters() if p.requires_grad
    }
    runner(*_inputs())
    layers[0].set_rank(layers[0].capacity)  # within the storage: no re-allocation, no capture
    runner(*_inputs())
    assert len(capture.calls) == 1
    layers[0].set_rank(layers[0].capacity + 1)  # outgrows it
    runner(*_inputs())
    assert runner.captures[-1]["reason"] == "storage re-allocated"
    runner(*_inputs(batch=3))
    assert runner.captures[-1]["reason"] == "input shapes"
    assert runner.summary()["captures"] == 3 and runner.summary()["fallback"] is None


def test_rank_change_within_the_storage_updates_the_mask_in_place():
    runner, unet, _ = _runner(FakeCapture())
    sample, timesteps, embeds, added, rows = _inputs()
    runner(sample, timesteps, embeds, added, rows)
    adapters = adapters_of(unet)
    layout = next(iter(next(iter(adapters.caches.values())).values()))
    active = layout.active
    layer = layers_of(unet)[0]
    layer.set_rank(layer.r + 1)
    with torch.no_grad():
        prediction, _ = runner(sample, timesteps, embeds, added, rows)
        reference = unet(sample, timesteps, embeds).sample
    assert layout.active is active  # the buffer a graph reads
    assert int(active[: layer.capacity].sum()) == layer.r
    torch.testing.assert_close(prediction, reference)


def test_reserve_keeps_the_function():
    torch.manual_seed(0)
    layer = LoRA2Layer(nn.Linear(5, 3), lora2.LoRA2Config(init_rank=3, chunk_size=2), rank=3, name="x")
    with torch.no_grad():
        layer.lora_B.normal_()  # perturb first: B = 0 would hide a wrong ΔW
    x = torch.randn(4, 5)
    before = layer(x)
    layer.headroom = 1.0
    replaced = layer.reserve(2)
    assert replaced and layer.capacity == 6 and layer.r == 3
    torch.testing.assert_close(layer(x), before)
    assert layer.reserve(2) == {}  # enough spare positions now


def test_failed_capture_falls_back_to_eager_and_says_why(caplog):
    runner, unet, _ = _runner(FakeCapture(fail=True))
    sample, timesteps, embeds, added, rows = _inputs()
    prediction, entropy = runner(sample, timesteps, embeds, added, rows)
    assert entropy is None and not runner.graphs
    assert "capturing the UNet failed (RuntimeError: operation not permitted" in runner.summary()["fallback"]
    assert "running eager" in caplog.text
    torch.testing.assert_close(prediction, unet(sample, timesteps, embeds).sample)


def test_accumulating_backward_gets_gradients_before_replay():
    runner, unet, _ = _runner(FakeCapture())
    params = [p for p in unet.parameters() if p.requires_grad]
    runner.prepare_gradients(params)
    assert all(p.grad is not None and not p.grad.any() for p in params)
    eager, unet, _ = _runner(FakeCapture(), mode="none")
    params = [p for p in unet.parameters() if p.requires_grad]
    eager.prepare_gradients(params)
    assert all(p.grad is None for p in params)


def test_training_on_the_fast_path_equals_eager(tiny_base, instance_dir, tmp_path, monkeypatch):
    """The recipe with graphs (replayed by the stand-in) trains as eager does: same losses and ranks, although the
    storage has headroom; prior preservation, accumulation and the entropy term go through the runner."""
    options = {"max_train_steps": 4, "gradient_accumulation_steps": 2, "with_prior_preservation": True,
               "num_class_images": 2, "entropy_weight": 0.01, "nu_lr": 0.5, "chunk_size": 2}  # fmt: skip
    eager = recipe.train(fast_config(tiny_base, instance_dir, tmp_path / "eager", **options))
    capture = FakeCapture()
    monkeypatch.setattr(recipe, "resolve_mode", lambda mode, device: "graphs")
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    fast = recipe.train(fast_config(tiny_base, instance_dir, tmp_path / "fast", compile="graphs", **options))
    assert fast.fast_path["mode"] == "graphs" and fast.fast_path["fallback"] is None
    assert fast.fast_path["captures"] == len(capture.calls) >= 1
    assert fast.losses == pytest.approx(eager.losses, rel=1e-4)
    assert fast.ranks == eager.ranks
    assert eager.fast_path["mode"] == "none" and eager.fast_path["captures"] == 0


def test_aspect_buckets_run_eager_with_a_reason(tiny_base, tmp_path, monkeypatch, caplog):
    from train_helpers import write_photos

    photos = write_photos(tmp_path / "photos")
    monkeypatch.setattr(recipe, "resolve_mode", lambda mode, device: "graphs")
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", FakeCapture())
    config = fast_config(
        tiny_base, photos, tmp_path / "run", resolution=128, aspect_buckets=True, max_train_steps=1, compile="graphs"
    )
    result = recipe.train(config)
    assert "aspect-ratio buckets" in result.fast_path["fallback"] and result.fast_path["captures"] == 0
    assert "running eager" in caplog.text


def test_auto_runs_eager_with_options_not_verified_on_a_gpu(tiny_base, instance_dir, tmp_path, monkeypatch, caplog):
    config = fast_config(tiny_base, instance_dir, tmp_path / "run", gradient_accumulation_steps=2, max_train_steps=1)
    assert unverified(config, world_size=1) == ["mixed_precision no", "gradient_accumulation_steps 2"]
    assert unverified(config.replace(mixed_precision="bf16", gradient_accumulation_steps=1), world_size=2) == [
        "2 processes"
    ]
    verified = config.replace(mixed_precision="bf16", gradient_accumulation_steps=1, train_text_encoder=True)
    assert unverified(verified.replace(with_prior_preservation=True, class_name="dog"), world_size=1) == []
    monkeypatch.setattr(recipe, "resolve_mode", lambda mode, device: "graphs")
    capture = FakeCapture()
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture)
    with caplog.at_level("INFO"):
        result = recipe.train(config)
    assert result.fast_path["mode"] == "none" and not capture.calls
    assert "--compile auto: eager, the fast path is not verified with mixed_precision no" in caplog.text


def test_resume_on_the_fast_path_equals_the_uninterrupted_run(tiny_base, instance_dir, tmp_path, monkeypatch):
    """SIGTERM at step 2, --resume latest: the same losses and ranks as one run (checkpoints hold the storage with
    its headroom; the resumed run captures again)."""
    monkeypatch.setattr(recipe, "resolve_mode", lambda mode, device: "graphs")
    monkeypatch.setattr(torch.cuda, "make_graphed_callables", FakeCapture())
    options = {"max_train_steps": 4, "nu_lr": 0.5, "chunk_size": 2, "compile": "graphs", "checkpointing_steps": 10}
    straight = recipe.train(fast_config(tiny_base, instance_dir, tmp_path / "straight", **options))
    config = fast_config(tiny_base, instance_dir, tmp_path / "resumed", **options)
    first = train_with_sigterm_at_step(config, monkeypatch, step=2)
    assert first.status == "interrupted" and first.fast_path["captures"] >= 1
    resumed = recipe.train(config.replace(resume="latest"))
    assert resumed.fast_path["captures"] >= 1
    assert first.losses + resumed.losses == straight.losses
    assert resumed.ranks == straight.ranks
