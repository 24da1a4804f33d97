"""Cross-attention entropy: the map entropy, and a processor that computes what the default one does."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

import lora2
from lora2.train.entropy import (
    EntropyAttnProcessor,
    EntropyCollector,
    identifier_maps,
    install_entropy_processors,
    map_entropy,
)


def test_entropy_of_uniform_is_log_n_and_of_one_hot_is_zero():
    assert map_entropy(torch.ones(10)).item() == pytest.approx(math.log(10))
    assert map_entropy(torch.full((3, 7), 0.2)).tolist() == pytest.approx([math.log(7)] * 3)
    one_hot = torch.zeros(10)
    one_hot[3] = 1.0
    assert map_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-9)
    assert 0 < map_entropy(torch.tensor([0.7, 0.2, 0.1])).item() < math.log(3)


def _attention() -> Attention:
    torch.manual_seed(0)
    return Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8)


def test_processor_output_equals_default_and_records_entropy():
    attn = _attention()
    hidden = torch.randn(3, 20, 16)  # (B, N, C)
    text = torch.randn(3, 5, 12)  # (B, T, D)
    expected = AttnProcessor2_0()(attn, hidden, text)
    collector = EntropyCollector([1, 2])
    processor = EntropyAttnProcessor(collector)
    assert torch.allclose(processor(attn, hidden, text), expected, atol=1e-6)  # inactive: SDPA path
    collector.start(torch.tensor([True, False, True]))
    assert torch.allclose(processor(attn, hidden, text), expected, atol=1e-6)  # collecting: SDPA + one-hot maps
    # reference: softmax over tokens, map of tokens 1 and 2 over the 20 positions, rows 0 and 2
    q = attn.to_q(hidden).view(3, 20, 2, 8).transpose(1, 2)
    k = attn.to_k(text).view(3, 5, 2, 8).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(8)).softmax(-1)  # (B, h, N, T)
    maps = probs[[0, 2]][..., [1, 2]].transpose(-1, -2)  # (2, h, 2, N)
    assert collector.loss().item() == pytest.approx(map_entropy(maps).mean().item(), rel=1e-5)
    collector.stop()
    assert not collector.active


def test_identifier_maps_and_their_gradients_equal_the_explicit_softmax():
    torch.manual_seed(1)
    query = torch.randn(2, 3, 40, 8, dtype=torch.float64, requires_grad=True)  # (B, h, N, d)
    key = torch.randn(2, 3, 7, 8, dtype=torch.float64, requires_grad=True)  # (B, h, T, d)
    positions = [2, 5]
    onehot = EntropyCollector(positions).onehot(7, query.device)  # (T, k)
    fused = map_entropy(identifier_maps(query, key, onehot).transpose(-1, -2)).mean()
    fused_grads = torch.autograd.grad(fused, (query, key))
    probs = (query @ key.transpose(-1, -2) / math.sqrt(8)).softmax(-1)  # (B, h, N, T)
    explicit = map_entropy(probs[..., positions].transpose(-1, -2)).mean()
    explicit_grads = torch.autograd.grad(explicit, (query, key))
    assert fused.item() == pytest.approx(explicit.item(), rel=1e-6)
    for a, b in zip(fused_grads, explicit_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)


def test_gradient_flows_through_the_entropy():
    attn = _attention()
    collector = EntropyCollector([0])
    collector.start(torch.tensor([True]))
    EntropyAttnProcessor(collector)(attn, torch.randn(1, 9, 16), torch.randn(1, 4, 12))
    collector.loss().backward()
    assert attn.to_q.weight.grad is not None and attn.to_q.weight.grad.abs().sum() > 0


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn1 = _attention()
        self.attn2 = _attention()


def test_installed_only_on_adapted_cross_attention():
    block = _Block()
    lora2.inject(block, lora2.LoRA2Config(target_modules=["attn1.to_q"]))
    with pytest.raises(ValueError, match="attn2"):
        install_entropy_processors(block, EntropyCollector([0]))
    block = _Block()
    lora2.inject(block, lora2.LoRA2Config())
    assert install_entropy_processors(block, EntropyCollector([0])) == ["attn2"]
    assert isinstance(block.attn2.processor, EntropyAttnProcessor)
    assert not isinstance(block.attn1.processor, EntropyAttnProcessor)


def test_collector_needs_token_positions():
    with pytest.raises(ValueError, match="identifier"):
        EntropyCollector([])
