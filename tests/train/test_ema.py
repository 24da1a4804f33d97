"""EMA of the adapter weights: the average, following LoRA²'s rank changes like optimizer state, swapped in and out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lora2
from lora2.train.adapters.lora2 import LoRA2Backend
from lora2.train.config import TrainConfig
from lora2.train.ema import AdapterEMA


def _backend() -> LoRA2Backend:
    torch.manual_seed(0)
    config = TrainConfig.from_dict({"target_modules": ["0"], "init_rank": 3, "chunk_size": 2, "ema_decay": 0.9})
    backend = LoRA2Backend(config)
    backend.inject({"unet": nn.Sequential(nn.Linear(8, 8))})
    return backend


def _set_rank(backend: LoRA2Backend, rank: int) -> None:
    layer = backend.modules["unet"][0]
    with torch.no_grad():
        layer.log_nu.fill_(torch.log(torch.tensor(lora2.rank.nu_for_rank(rank, layer.config.quantile))))
    backend.after_step(None, 1)
    assert layer.r == rank


def test_average_follows_rank_growth_and_reallocation():
    backend = _backend()
    layer = backend.modules["unet"][0]
    ema = AdapterEMA(0.9, backend)
    start_a = layer.lora_A.detach().clone()
    with torch.no_grad():
        layer.lora_A += 1.0
    ema.update()
    torch.testing.assert_close(ema.average["unet.0.lora_A"], start_a + 0.1)  # 0.9 · θ_ema + 0.1 · θ
    averaged = ema.average["unet.0.lora_A"][:3].clone()
    _set_rank(backend, 7)  # capacity 4 → 8: re-allocated, positions 3..6 fresh
    ema.update()
    a = ema.average["unet.0.lora_A"]
    assert a.shape == layer.lora_A.shape == (8, 8)
    torch.testing.assert_close(a[:3], 0.9 * averaged + 0.1 * layer.lora_A[:3].detach())  # surviving: averaged
    assert torch.equal(a[3:7], layer.lora_A[3:7].detach())  # grown: start from the live (fresh) weights
    assert torch.equal(ema.average["unet.0.lora_B"][:, 3:7], torch.zeros(8, 4))
    _set_rank(backend, 2)  # shrinks the storage to 2 positions
    ema.update()
    assert ema.average["unet.0.lora_A"].shape == layer.lora_A.shape == (2, 8)


def test_applied_swaps_the_average_in_and_the_live_weights_back():
    backend = _backend()
    layer = backend.modules["unet"][0]
    ema = AdapterEMA(0.5, backend)
    live = {key: value.clone() for key, value in backend.state().items()}
    with torch.no_grad():
        layer.lora_B += 2.0
    ema.update()
    after = {key: value.clone() for key, value in backend.state().items()}
    with ema.applied():
        torch.testing.assert_close(layer.lora_B.detach(), live["unet.0.lora_B"] + 1.0)
    assert all(torch.equal(after[key], value) for key, value in backend.state().items())
    with pytest.raises(RuntimeError), ema.applied():
        raise RuntimeError("sampling failed")
    assert all(torch.equal(after[key], value) for key, value in backend.state().items())


def test_a_checkpoint_ema_of_other_modules_is_refused():
    backend = _backend()
    with pytest.raises(ValueError, match="EMA does not match"):
        AdapterEMA(0.9, backend, {"unet.1.lora_A": torch.zeros(2, 8)})
