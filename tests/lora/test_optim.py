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


def _grow_and_shrink(optimizer, model, ranks=(14, 3)):
    """Set ν so that the rank becomes each of ``ranks`` in turn (with one optimizer step between), yielding."""
    layer = model[0]
    for rank in ranks:
        with torch.no_grad():
            layer.log_nu.fill_(torch.log(torch.tensor(lora2.rank.nu_for_rank(rank, 0.9))))
        assert lora2.sync_ranks(optimizer, model) == 1 and layer.r == rank
        yield layer


def _layer_with_steps(optimizer_factory, steps: int = 3):
    torch.manual_seed(0)
    config = LoRA2Config(target_modules=["0"], init_rank=8, chunk_size=4, max_rank=32)
    model = lora2.inject(nn.Sequential(nn.Linear(64, 64)), config)
    layer = model[0]
    optimizer = optimizer_factory([layer.lora_A, layer.lora_B])
    for _ in range(steps):
        model(torch.randn(4, 64)).square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def test_8bit_adamw_state_follows_rank_changes(caplog):
    """bitsandbytes' 8-bit moments (uint8 codes, an absmax per block of 256) are dequantized, resized and quantized
    again: surviving positions keep their moments up to 8-bit rounding, grown positions start at zero (up to the
    code book's nearest value), the optimizer keeps stepping."""
    bnb = pytest.importorskip("bitsandbytes")
    from bitsandbytes.functional import dequantize_blockwise

    def moments(state):
        return [
            dequantize_blockwise(state[key], absmax=state[f"absmax{i}"], code=state[f"qmap{i}"], blocksize=256)
            for i, key in ((1, "state1"), (2, "state2"))
        ]

    model, optimizer = _layer_with_steps(lambda params: bnb.optim.AdamW8bit(params, lr=1e-3, min_8bit_size=0))
    layer = model[0]
    assert optimizer.state[layer.lora_A]["state1"].dtype == torch.uint8
    before_a, before_b = moments(optimizer.state[layer.lora_A]), moments(optimizer.state[layer.lora_B])
    with caplog.at_level("WARNING"):
        steps = _grow_and_shrink(optimizer, model)
        layer = next(steps)  # rank 8 → 14, capacity 8 → 16
        after_a, after_b = moments(optimizer.state[layer.lora_A]), moments(optimizer.state[layer.lora_B])
        for old, new in zip(before_a, after_a):
            scale = old.abs().max()
            assert new.shape == layer.lora_A.shape and torch.allclose(new[:8], old, atol=0.02 * scale)
            assert new[8:].abs().max() <= 1e-4 * scale
        for old, new in zip(before_b, after_b):
            scale = old.abs().max()
            assert torch.allclose(new[:, :8], old, atol=0.02 * scale) and new[:, 8:].abs().max() <= 1e-4 * scale
        model(torch.randn(4, 64)).square().sum().backward()
        optimizer.step()
        layer = next(steps)  # rank 14 → 3: storage shrinks to 4
        assert optimizer.state[layer.lora_A]["state1"].shape == layer.lora_A.shape == (4, 64)
        assert optimizer.state[layer.lora_A]["absmax1"].shape == (1,)
        model(torch.randn(4, 64)).square().sum().backward()
        optimizer.step()
    assert "reset" not in caplog.text


def test_prodigy_state_follows_rank_changes(caplog):
    """Prodigy keeps Adam-like moments (parameter-shaped) and ``s``/``p0`` flattened: all follow the positions; a
    grown position's ``p0`` is where the parameter starts, its other state zero."""
    prodigyopt = pytest.importorskip("prodigyopt")
    model, optimizer = _layer_with_steps(lambda params: prodigyopt.Prodigy(params, lr=1.0))
    layer = model[0]
    before = {key: value.clone() for key, value in optimizer.state[layer.lora_A].items() if torch.is_tensor(value)}
    assert before["s"].dim() == 1 and before["p0"].shape == (8 * 64,)
    with caplog.at_level("WARNING"):
        layer = next(_grow_and_shrink(optimizer, model))
    state = optimizer.state[layer.lora_A]
    for key in ("exp_avg", "exp_avg_sq", "s", "p0"):
        grid = state[key].view(layer.lora_A.shape)
        assert torch.equal(grid[:8], before[key].view(8, 64)), key
        expected = layer.lora_A[8:14] if key == "p0" else torch.zeros(6, 64)
        assert torch.equal(grid[8:14], expected), key
    assert state["p0"].dim() == 1 and "reset" not in caplog.text
    model(torch.randn(4, 64)).square().sum().backward()
    optimizer.step()
