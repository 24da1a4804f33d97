"""Checkpoints: exact restore of re-allocated LoRA² storage and optimizer state; atomic writes; the limit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora2
from lora2.train import checkpoint as ckpt


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    return lora2.inject(model, lora2.LoRA2Config(target_modules=["0", "2"], init_rank=2, max_rank=16, chunk_size=2))


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    layers = [layer for _, layer in lora2.lora_layers(model)]
    weights = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
    return torch.optim.AdamW(
        [{"params": weights, "lr": 1e-2}, {"params": [layer.log_nu for layer in layers], "lr": 0.3}]
    )


def _steps(model, optimizer, count: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(count):
        x = torch.randn(32, 8, generator=generator)
        target = torch.sin(3 * x[:, :4])
        loss = (model(x) - target).square().mean() + 1e-3 * lora2.regularization(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _save(model, optimizer, folder, step, limit=None):
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    rng = {"rank0.cpu": torch.get_rng_state()}
    return ckpt.save_checkpoint(folder, step, {"unet": model}, optimizer, scheduler, None, rng, {}, limit)


def test_restore_then_continue_equals_uninterrupted(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    _steps(model, optimizer, 6, seed=1)
    saved_ranks = lora2.ranks(model)
    assert saved_ranks != {"0": 2, "2": 2}, "ranks should have moved for this test to mean something"
    path = _save(model, optimizer, tmp_path, 6)
    _steps(model, optimizer, 6, seed=2)

    fresh = _model()
    state, tensors, _ = ckpt.load_checkpoint(path)
    ckpt.restore_adapter({"unet": fresh}, tensors, state["ranks"])
    assert lora2.ranks(fresh) == saved_ranks
    fresh_optimizer = _optimizer(fresh)  # built over the re-allocated storage, then loaded
    ckpt.load_optimizer_state(path, fresh_optimizer, state)
    _steps(fresh, fresh_optimizer, 6, seed=2)
    assert lora2.ranks(fresh) == lora2.ranks(model)
    for (name, a), (_, b) in zip(lora2.lora_layers(model), lora2.lora_layers(fresh)):
        for key in ("lora_A", "lora_B", "log_nu"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (name, key)


def test_restore_names_mismatched_modules(tmp_path):
    model = _model()
    path = _save(model, _optimizer(model), tmp_path, 1)
    state, tensors, _ = ckpt.load_checkpoint(path)
    other = lora2.inject(nn.Sequential(nn.Linear(8, 16)), lora2.LoRA2Config(target_modules=["0"]))
    with pytest.raises(ValueError, match="extra"):
        ckpt.restore_adapter({"unet": other}, tensors, state["ranks"])


def test_crash_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model = _model()
    optimizer = _optimizer(model)
    _steps(model, optimizer, 1, seed=0)
    first = _save(model, optimizer, tmp_path, 1)
    real_save = ckpt.save_file

    def failing(tensors, path, *args, **kwargs):
        if "optimizer" in str(path):
            raise OSError("disk full")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(OSError, match="disk full"):
        _save(model, optimizer, tmp_path, 2)
    assert ckpt.list_checkpoints(tmp_path) == [first]
    assert ckpt.resolve_resume(tmp_path, "latest") == first
    state, _, _ = ckpt.load_checkpoint(first)
    assert state["step"] == 1


def test_total_limit_prunes_oldest_and_resave_replaces(tmp_path):
    model = _model()
    optimizer = _optimizer(model)
    for step in (1, 2, 3):
        _save(model, optimizer, tmp_path, step, limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    _save(model, optimizer, tmp_path, 3, limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


def test_resume_without_checkpoint(tmp_path):
    assert ckpt.resolve_resume(tmp_path, "latest") is None  # diffusers' convention: start afresh
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoint-9"))
