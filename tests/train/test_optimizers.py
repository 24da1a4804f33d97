"""Optimizers of the trainer: Prodigy over the adapter weights with plain Adam over ν, as one optimizer."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from lora2.train.adapters.lora2 import LoRA2Backend
from lora2.train.config import TrainConfig
from lora2.train.optimizers import ProdigyWithAdamNu, build_optimizer


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    config = TrainConfig.from_dict(
        {"target_modules": ["0", "1"], "init_rank": 4, "optimizer": "prodigy", "learning_rate": 1.0, "nu_lr": 0.05}
    )
    backend = LoRA2Backend(config)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    backend.inject({"unet": model})
    return config, backend, model


def _step(model, optimizer, x):
    loss = model(x).square().mean() + sum(layer.log_nu.exp() for layer in model)  # ν has a gradient
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_weights_take_prodigy_steps_and_nu_adam_steps_at_nu_lr():
    pytest.importorskip("prodigyopt")
    config, backend, model = _setup()
    optimizer = build_optimizer(config, backend.parameter_groups())
    assert isinstance(optimizer, ProdigyWithAdamNu) and len(optimizer.param_groups) == 2
    nu_before = model[0].log_nu.detach().clone()
    b_before = model[0].lora_B.detach().clone()
    _step(model, optimizer, torch.randn(16, 8))
    # Adam's first step moves each parameter by lr (bias-corrected m/√v = ±1)
    torch.testing.assert_close((nu_before - model[0].log_nu.detach()).abs(), torch.tensor(0.05), rtol=1e-3, atol=0)
    assert 0 < (model[0].lora_B.detach() - b_before).abs().max() < 1e-4  # Prodigy's d starts at 1e-6
    assert {"exp_avg", "exp_avg_sq", "step"} <= set(optimizer.state[model[0].log_nu])
    assert {"s", "p0", "exp_avg"} <= set(optimizer.state[model[0].lora_A])


def test_state_dict_round_trip_continues_exactly():
    pytest.importorskip("prodigyopt")
    x = torch.randn(16, 8)
    config, backend, model = _setup()
    optimizer = build_optimizer(config, backend.parameter_groups())
    for _ in range(3):
        _step(model, optimizer, x)
    saved_model = {key: value.clone() for key, value in model.state_dict().items()}
    saved_state = copy.deepcopy(optimizer.state_dict())
    for _ in range(3):
        _step(model, optimizer, x)
    config, backend, resumed = _setup(seed=1)
    resumed.load_state_dict(saved_model)
    optimizer = build_optimizer(config, backend.parameter_groups())
    optimizer.load_state_dict(saved_state)
    assert optimizer.adam.state is optimizer.state and optimizer.prodigy.param_groups[0] is optimizer.param_groups[0]
    for _ in range(3):
        _step(resumed, optimizer, x)
    for key, value in model.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_missing_prodigyopt_and_two_learning_rates_are_clear_errors(monkeypatch):
    config, backend, _ = _setup()
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(ValueError, match=r"pip install 'lora2\[prodigy\]'"):
        build_optimizer(config, backend.parameter_groups())
    with pytest.raises(ValueError, match="text_encoder_lr 0.5 differs from learning_rate 1.0"):
        TrainConfig.from_dict({"optimizer": "prodigy", "learning_rate": 1.0, "text_encoder_lr": 0.5})
