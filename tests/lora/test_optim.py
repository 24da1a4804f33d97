"""Ranks follow ν after each optimizer step (``lora2.sync_ranks``), optimizer state follows re-allocation, and ranks
really move."""

import pytest
import torch
import torch.optim.optimizer as optimizer_module
from torch import nn

import lora2
from lora2 import LoRA2Config


def _toy(true_rank: int, init_rank: int, rank_reg_weight: float, steps: int = 400, seed: int = 0):
    """Fit y = W0 x + U V x with a rank-`true_rank` U V: the adapter must find that rank."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 32))
    x = torch.randn(256, 32)
    target = model(x).detach() + x @ (torch.randn(32, true_rank) @ torch.randn(true_rank, 32)).T / 6
    config = LoRA2Config(
        target_modules=["0"],
        init_rank=init_rank,
        max_rank=32,
        chunk_size=4,
        lambda_scaling="sum",
        target_rank=2,
        rank_reg_weight=rank_reg_weight,
    )
    lora2.inject(model, config)
    layer = model[0]
    optimizer = torch.optim.Adam(
        [{"params": [layer.lora_A, layer.lora_B]}, {"params": [layer.log_nu], "lr": 1e-2}], lr=1e-2
    )
    for _ in range(steps):
        loss = (model(x) - target).square().mean() + lora2.regularization(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        lora2.sync_ranks(optimizer, model)
    return model, optimizer, (model(x) - target).square().mean().item()


def test_ranks_grow_when_the_target_needs_more_rank():
    model, optimizer, mse = _toy(true_rank=12, init_rank=4, rank_reg_weight=0.0)
    rank = lora2.ranks(model)["0"]
    assert rank >= 12 and mse < 0.05
    # the optimizer trains the live parameters, with state of their size
    layer = model[0]
    params = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert id(layer.lora_A) in params and id(layer.lora_B) in params
    assert optimizer.state[layer.lora_A]["exp_avg"].shape == layer.lora_A.shape


def test_rank_regularization_settles_lower():
    free, _, _ = _toy(true_rank=12, init_rank=4, rank_reg_weight=0.0)
    regularized, _, _ = _toy(true_rank=12, init_rank=4, rank_reg_weight=3.0)
    assert lora2.ranks(regularized)["0"] < lora2.ranks(free)["0"]


def test_sync_keeps_optimizer_state_of_surviving_positions():
    torch.manual_seed(0)
    model = lora2.inject(nn.Sequential(nn.Linear(8, 8)), LoRA2Config(target_modules=["0"], init_rank=3, chunk_size=4))
    layer = model[0]
    optimizer = torch.optim.Adam([layer.lora_A, layer.lora_B, layer.log_nu], lr=1e-3)
    model(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    exp_avg = optimizer.state[layer.lora_A]["exp_avg"].clone()
    with torch.no_grad():
        layer.log_nu.fill_(torch.log(torch.tensor(lora2.rank.nu_for_rank(9, 0.9))))
    assert lora2.sync_ranks(optimizer, model) == 1
    assert layer.r == 9 and layer.capacity == 12
    state = optimizer.state[layer.lora_A]["exp_avg"]
    assert state.shape == layer.lora_A.shape
    assert torch.equal(state[:3], exp_avg[:3]) and torch.all(state[3:] == 0)
    assert any(p is layer.lora_A for p in optimizer.param_groups[0]["params"])


def test_without_sync_ranks_stay_and_a_warning_says_why(caplog):
    torch.manual_seed(0)
    model = lora2.inject(nn.Sequential(nn.Linear(8, 8)), LoRA2Config(target_modules=["0"], init_rank=3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.5)
    with caplog.at_level("WARNING"):
        for _ in range(200):
            model(torch.randn(2, 8)).sum().backward()
            optimizer.step()
    assert "sync_ranks" in caplog.text and lora2.ranks(model) == {"0": 3}
    assert lora2.sync_ranks(optimizer, model) == 1  # the explicit call applies what ν says


def test_inject_installs_no_global_optimizer_hook():
    lora2.inject(nn.Sequential(nn.Linear(8, 8)), LoRA2Config(target_modules=["0"]))
    assert not optimizer_module._global_optimizer_post_hooks


def test_nan_nu_is_a_floating_point_error():
    model = lora2.inject(nn.Sequential(nn.Linear(8, 8)), LoRA2Config(target_modules=["0"]))
    with torch.no_grad():
        model[0].log_nu.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="'0'"):
        lora2.sync_ranks(None, model)
