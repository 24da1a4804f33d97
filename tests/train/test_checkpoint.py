"""Checkpoints: exact restore of re-allocated LoRA² storage and optimizer state; atomic writes; the limit;
integrity checks (a damaged checkpoint is skipped by --resume latest, named by an explicit --resume)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import lora2
from lora2.train import checkpoint as ckpt
from lora2.train.adapters.lora2 import LoRA2Backend
from lora2.train.config import TrainConfig

CONFIG = TrainConfig.from_dict({"target_modules": ["0", "2"], "init_rank": 2, "max_rank": 16, "chunk_size": 2})


def _backend() -> LoRA2Backend:
    torch.manual_seed(0)
    backend = LoRA2Backend(CONFIG)
    backend.inject({"unet": nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))})
    return backend


def _optimizer(backend: LoRA2Backend) -> torch.optim.Optimizer:
    groups = backend.parameter_groups()
    groups[0]["lr"], groups[1]["lr"] = 1e-2, 0.3
    return torch.optim.AdamW(groups)


def _steps(backend, optimizer, count: int, seed: int) -> None:
    model = backend.modules["unet"]
    generator = torch.Generator().manual_seed(seed)
    for step in range(count):
        x = torch.randn(32, 8, generator=generator)
        target = torch.sin(3 * x[:, :4])
        loss = (model(x) - target).square().mean() + 1e-3 * backend.regularization()
        loss.backward()
        optimizer.step()
        backend.after_step(optimizer, step + 1)
        optimizer.zero_grad(set_to_none=True)


def _save(backend, optimizer, folder, step, limit=None):
    training = {"ranks": backend.ranks()}
    rng = {"rank0.cpu": torch.get_rng_state()}
    return ckpt.save_checkpoint(folder, step, backend.state(), training, optimizer, rng, limit)


def test_restore_then_continue_equals_uninterrupted(tmp_path):
    backend = _backend()
    optimizer = _optimizer(backend)
    _steps(backend, optimizer, 6, seed=1)
    saved_ranks = backend.ranks()
    assert saved_ranks != {"unet.0": 2, "unet.2": 2}, "ranks should have moved for this test to mean something"
    path = _save(backend, optimizer, tmp_path, 6)
    _steps(backend, optimizer, 6, seed=2)

    fresh = _backend()
    state, tensors, _ = ckpt.load_checkpoint(path)
    fresh.restore(tensors, state["ranks"])
    assert fresh.ranks() == saved_ranks
    fresh_optimizer = _optimizer(fresh)  # built over the re-allocated storage, then loaded
    ckpt.load_optimizer_state(path, fresh_optimizer, state)
    _steps(fresh, fresh_optimizer, 6, seed=2)
    assert fresh.ranks() == backend.ranks()
    model, other = backend.modules["unet"], fresh.modules["unet"]
    for (name, a), (_, b) in zip(lora2.lora_layers(model), lora2.lora_layers(other)):
        for key in ("lora_A", "lora_B", "log_nu"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (name, key)


def test_restore_names_mismatched_modules(tmp_path):
    backend = _backend()
    path = _save(backend, _optimizer(backend), tmp_path, 1)
    state, tensors, _ = ckpt.load_checkpoint(path)
    other = LoRA2Backend(TrainConfig.from_dict({"target_modules": ["0"]}))
    other.inject({"unet": nn.Sequential(nn.Linear(8, 16))})
    with pytest.raises(ValueError, match="extra"):
        other.restore(tensors, state["ranks"])


def test_disk_full_mid_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    backend = _backend()
    optimizer = _optimizer(backend)
    _steps(backend, optimizer, 1, seed=0)
    first = _save(backend, optimizer, tmp_path, 1)
    real_save = ckpt.save_file

    def failing(tensors, path, *args, **kwargs):
        if "optimizer" in str(path):
            raise OSError(28, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", failing)
    with pytest.raises(OSError, match="checkpoint-2.*No space left on device.*intact"):
        _save(backend, optimizer, tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]  # no .tmp left behind
    assert ckpt.resolve_resume(tmp_path, "latest") == first
    state, _, _ = ckpt.load_checkpoint(first)
    assert state["step"] == 1


def test_total_limit_prunes_oldest_and_resave_replaces(tmp_path):
    backend = _backend()
    optimizer = _optimizer(backend)
    for step in (1, 2, 3):
        _save(backend, optimizer, tmp_path, step, limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    _save(backend, optimizer, tmp_path, 3, limit=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3"]


@pytest.mark.parametrize("damage", ["adapter.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"])
def test_damaged_checkpoint_is_skipped_by_latest_and_named_when_explicit(tmp_path, caplog, damage):
    backend = _backend()
    optimizer = _optimizer(backend)
    first = _save(backend, optimizer, tmp_path, 1)
    second = _save(backend, optimizer, tmp_path, 2)
    path = second / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])  # truncated
    with caplog.at_level(logging.WARNING):
        assert ckpt.resolve_resume(tmp_path, "latest") == first
    assert "checkpoint-2" in caplog.text
    with pytest.raises(ValueError, match=f"{damage}"):
        ckpt.resolve_resume(tmp_path, str(second))


def test_resume_without_checkpoint(tmp_path):
    assert ckpt.resolve_resume(tmp_path, "latest") is None  # diffusers' convention: start afresh
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(tmp_path, str(tmp_path / "checkpoint-9"))
