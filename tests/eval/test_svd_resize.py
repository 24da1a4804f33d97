"""The svd-512-to-lora2 baseline: SVD truncation of a high-rank adapter to a learned adapter's size."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora2.eval.bench import resize_main, svd_resize
from lora2.eval.evaluate import adapter_summary

SHAPES = {
    "down_blocks.1.attn1.to_q": (12, 10),
    "mid_block.attn2.to_k": (9, 14),
    "up_blocks.0.attn1.to_out.0": (16, 16),
}


def _write(path, ranks, seed=0):
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_out, d_in) in SHAPES.items():
        tensors[f"unet.{name}.lora_A.weight"] = torch.randn(ranks[name], d_in, generator=generator)
        tensors[f"unet.{name}.lora_B.weight"] = torch.randn(d_out, ranks[name], generator=generator)
    save_file(tensors, str(path))
    return path


def _delta(tensors, name):
    return tensors[f"unet.{name}.lora_B.weight"].double() @ tensors[f"unet.{name}.lora_A.weight"].double()


def test_layers_allocation_is_the_best_approximation_per_layer(tmp_path):
    source = _write(tmp_path / "big.safetensors", dict.fromkeys(SHAPES, 8))
    target_ranks = {"down_blocks.1.attn1.to_q": 2, "mid_block.attn2.to_k": 5, "up_blocks.0.attn1.to_out.0": 1}
    target = _write(tmp_path / "small.safetensors", target_ranks, seed=1)
    out = svd_resize(source, target, tmp_path / "out.safetensors", "layers")
    assert adapter_summary(out)["ranks"] == target_ranks
    big, small = load_file(str(source)), load_file(str(out))
    for name, rank in target_ranks.items():
        u, s, vh = torch.linalg.svd(_delta(big, name))  # judge: the full SVD of ΔW
        best = (u[:, :rank] * s[:rank]) @ vh[:rank]
        torch.testing.assert_close(_delta(small, name), best, atol=1e-4, rtol=1e-4)


def test_budget_allocation_keeps_total_rank(tmp_path):
    source = _write(tmp_path / "big.safetensors", dict.fromkeys(SHAPES, 8))
    target = _write(tmp_path / "small.safetensors", {"down_blocks.1.attn1.to_q": 2, "mid_block.attn2.to_k": 5,
                                                     "up_blocks.0.attn1.to_out.0": 1})  # fmt: skip
    assert resize_main([str(source), "--ranks-from", str(target), "--output", str(tmp_path / "o.safetensors")]) == 0
    summary = adapter_summary(tmp_path / "o.safetensors")
    assert summary["total_rank"] == 8 and all(r >= 1 for r in summary["ranks"].values())


def test_mismatched_modules(tmp_path):
    source = _write(tmp_path / "big.safetensors", dict.fromkeys(SHAPES, 4))
    tensors = load_file(str(source))
    save_file({k: v for k, v in tensors.items() if "mid_block" not in k}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="adapt different modules"):
        svd_resize(source, tmp_path / "other.safetensors", tmp_path / "out.safetensors")


def test_uniform_allocation_is_one_rank_at_the_parameter_count(tmp_path):
    source = _write(tmp_path / "big.safetensors", dict.fromkeys(SHAPES, 8))
    target_ranks = {"down_blocks.1.attn1.to_q": 2, "mid_block.attn2.to_k": 5, "up_blocks.0.attn1.to_out.0": 1}
    target = _write(tmp_path / "small.safetensors", target_ranks, seed=1)
    out = svd_resize(source, target, tmp_path / "out.safetensors", "uniform")
    ranks = adapter_summary(out)["ranks"]
    assert max(ranks.values()) - min(ranks.values()) <= 1
    costs = {name: d_out + d_in for name, (d_out, d_in) in SHAPES.items()}
    budget = sum(rank * costs[name] for name, rank in target_ranks.items())
    spent = sum(ranks[name] * costs[name] for name in SHAPES)
    assert budget - max(costs.values()) < spent <= budget
