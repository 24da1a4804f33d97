"""CPU smoke test of benchmarks/sdxl_train_step.py at tiny size: every row runs and the JSON files are complete."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="module")
def results(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    argv = ["--tiny", "--out-dir", str(out), "--backbones", "sdxl", "--batches", "1", "--warmup", "1", "--steps", "1"]
    bench.main(argv + ["--only", "floor,peft,lora2,lora2+entropy,lora2+entropy-sdpa", "--count-ops"])
    rows = json.loads((out / "sdxl_train_step.json").read_text())
    extras = json.loads((out / "rank_change_export.json").read_text())
    return rows, extras


def test_every_row_measured(results):
    rows, _ = results
    methods = [(r["method"], r["rank"], r["grad_ckpt"]) for r in rows]
    assert ("floor", None, False) in methods
    for rank in (4, 16):
        for method in ("peft", "lora2"):
            assert (method, rank, False) in methods and (method, rank, True) in methods
    assert ("lora2+entropy", 4, False) in methods and ("lora2+entropy-sdpa", 4, False) in methods
    keys = {"backbone", "method", "rank", "batch", "grad_ckpt", "median_step_s", "peak_mem_gib"}
    keys |= {"ratio_time_vs_peft", "ratio_mem_vs_peft", "device", "torch", "diffusers"}
    for row in rows:
        assert "error" not in row, row
        assert keys <= set(row)
        assert row["median_step_s"] > 0 and row["loss_finite"]
        if row["method"].startswith("lora2"):
            assert row["ratio_time_vs_peft"] > 0
            assert row["mean_rank"] == row["rank"]  # adaptive ranks sit at the requested effective rank


def test_operator_counts_and_table(bench, results, tmp_path):
    rows, _ = results
    ops = {(r["method"], r["rank"], r["grad_ckpt"]): r["ops_per_step"] for r in rows}
    assert 0 < ops[("floor", None, False)] < ops[("peft", 4, False)] < ops[("peft", 4, True)]
    assert ops[("lora2", 4, False)] > ops[("peft", 4, False)]  # Λ and ν cost operators of their own
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    assert len(bench.main(["--table", str(path)])) == len(rows)


def test_rank_change_and_export(results):
    _, extras = results
    change = next(e for e in extras["results"] if e["kind"] == "rank_change")
    assert change["grow"]["layers_changed"] == change["layers"] > 0
    assert change["shrink"]["layers_changed"] == change["layers"]
    assert change["grow"]["to_rank"] > change["from_rank"] == change["shrink"]["to_rank"]
    exports = [e for e in extras["results"] if e["kind"] == "export"]
    assert {e["rank"] for e in exports} == {4, 16}
    for export in exports:
        assert export["bytes"] > 4 * export["adapter_params"]  # fp32 tensors plus the safetensors header


def test_entropy_processor_matches_reference(bench):
    """The local entropy processor returns the attention output of diffusers' processor and the right entropy."""
    import torch
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
    hidden = torch.randn(2, 12, 16)  # (B, N, C)
    context = torch.randn(2, 5, 8)  # (B, 77→5, C_ctx)
    store = bench.EntropyStore()
    out = bench.IdentifierEntropyProcessor(store, token_index=1)(attn, hidden, context)
    ref = AttnProcessor2_0()(attn, hidden, context)
    torch.testing.assert_close(out, ref)
    q = attn.to_q(hidden).view(2, 12, 2, 8).transpose(1, 2)  # (B, H, N, d)
    k = attn.to_k(context).view(2, 5, 2, 8).transpose(1, 2)  # (B, H, 5, d)
    probs = ((q @ k.transpose(-1, -2)) * attn.scale).softmax(-1)[..., 1]  # (B, H, N)
    a = probs / probs.sum(-1, keepdim=True)
    torch.testing.assert_close(store.values[0], -(a * a.log()).sum(-1).mean())
