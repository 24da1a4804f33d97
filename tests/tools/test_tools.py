"""inspect, merge (exact mixed-rank, SVD recompression), resize (kohya criteria) and their command line."""

from __future__ import annotations

import json

import pytest
import torch

from lora2.cli import main
from lora2.export import LoraModule, read_adapter, write_adapter
from lora2.tools import inspect_file, merge_adapters, new_rank, recompress, resize_adapter, summarize
from lora2.tools.merge import MergeSpec, merge_files
from lora2.tools.resize import ResizeSpec, resize_file
from lora2.tools.svd import lowrank_svd

# (d_out, d_in[, kh, kw]) of the toy adapter's modules
SHAPES = {
    "down_blocks.0.attentions.0.proj_in": (24, 16),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (16, 16),
    "mid_block.resnets.0.conv1": (12, 8, 3, 3),
    "up_blocks.0.resnets.0.conv_shortcut": (12, 10, 1, 1),
}


def make_adapter(ranks: dict[str, int], seed: int, scale: float = 1.0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    modules = {}
    for name, rank in ranks.items():
        d_out, d_in, *kernel = SHAPES[name]
        down = torch.randn(rank, d_in, *kernel, generator=gen)
        up = torch.randn(d_out, rank, *([1, 1] if kernel else []), generator=gen)
        modules[name] = LoraModule(down, up, scale)
    return {"unet": modules}


def deltas(adapter: dict) -> dict:
    return {(c, n): m.delta(torch.float64) for c, mods in adapter.items() for n, m in mods.items()}


RANKS_A = dict(zip(SHAPES, [2, 7, 3, 1]))
RANKS_B = dict(zip(SHAPES, [5, 1, 4, 6]))


def test_merge_of_different_ranks_is_the_weighted_sum_of_deltas():
    a, b = make_adapter(RANKS_A, 0), make_adapter(RANKS_B, 1, scale=0.25)
    merged = merge_adapters([a, b], [0.7, -1.5])
    da, db, dm = deltas(a), deltas(b), deltas(merged)
    for key in da:
        torch.testing.assert_close(dm[key], 0.7 * da[key] + -1.5 * db[key], atol=1e-4, rtol=1e-5)
        assert merged["unet"][key[1]].rank == RANKS_A[key[1]] + RANKS_B[key[1]]


def test_merge_modules_present_in_one_adapter_only():
    a = make_adapter({"mid_block.resnets.0.conv1": 2}, 0)
    b = make_adapter({"down_blocks.0.attentions.0.proj_in": 3}, 1)
    merged = merge_adapters([a, b])
    assert set(merged["unet"]) == {"mid_block.resnets.0.conv1", "down_blocks.0.attentions.0.proj_in"}


def test_merge_matches_kohya_and_dotted_names_and_rejects_shape_mismatch():
    a = make_adapter({"mid_block.resnets.0.conv1": 2}, 0)
    (module,) = make_adapter({"mid_block.resnets.0.conv1": 3}, 1)["unet"].values()
    b = {"unet": {"mid_block_resnets_0_conv1": module}}  # kohya spelling
    merged = merge_adapters([a, b])
    assert list(merged["unet"]) == ["mid_block.resnets.0.conv1"]
    assert merged["unet"]["mid_block.resnets.0.conv1"].rank == 5
    bad = {"unet": {"mid_block.resnets.0.conv1": LoraModule(torch.zeros(2, 8, 1, 1), torch.zeros(12, 2, 1, 1))}}
    with pytest.raises(ValueError, match=r"module 'mid_block.resnets.0.conv1' of 'unet' has shapes"):
        merge_adapters([a, bad])
    with pytest.raises(ValueError, match="got 1 weights for 2 adapters"):
        merge_adapters([a, a], [1.0])


def test_recompress_energy_budget_and_cap():
    merged = merge_adapters([make_adapter(RANKS_A, 0), make_adapter(RANKS_B, 1)])
    energetic = recompress(merged, energy=0.9)
    for name, module in merged["unet"].items():
        _, s, _ = lowrank_svd(module)
        kept = energetic["unet"][name].rank
        fraction = (s[:kept].square().sum() / s.square().sum()).item()
        assert fraction >= 0.9 and (kept == 1 or (s[: kept - 1].square().sum() / s.square().sum()) < 0.9)
        err = (energetic["unet"][name].delta(torch.float64) - module.delta(torch.float64)).norm() ** 2
        torch.testing.assert_close(err, s[kept:].square().sum(), rtol=1e-6, atol=1e-6)  # Eckart–Young
    budget = recompress(merged, rank_budget=10)
    assert sum(m.rank for m in budget["unet"].values()) == 10
    assert all(m.rank >= 1 for m in budget["unet"].values())
    capped = recompress(merged, max_rank=2)
    assert all(m.rank <= 2 for m in capped["unet"].values())
    with pytest.raises(ValueError, match="below one rank per module"):
        recompress(merged, rank_budget=3)
    with pytest.raises(ValueError, match=r"energy must lie in \(0, 1\]"):
        recompress(merged, energy=1.5)


def test_rank_budget_keeps_globally_largest_singular_values():
    big = make_adapter({"down_blocks.0.attentions.0.proj_in": 4}, 0, scale=10.0)
    small = make_adapter({"mid_block.resnets.0.conv1": 4}, 1, scale=0.01)
    merged = merge_adapters([big, small])
    out = recompress(merged, rank_budget=5)
    assert out["unet"]["down_blocks.0.attentions.0.proj_in"].rank == 4
    assert out["unet"]["mid_block.resnets.0.conv1"].rank == 1


def test_resize_fixed_full_rank_is_exact():
    adapter = make_adapter(RANKS_A, 0, scale=0.5)
    resized, report = resize_adapter(adapter, "fixed", 100)
    for key, delta in deltas(adapter).items():
        torch.testing.assert_close(deltas(resized)[key], delta, atol=1e-4, rtol=1e-5)
        assert report["unet"][key[1]]["new_rank"] == RANKS_A[key[1]]
        assert resized["unet"][key[1]].scale == 1.0


@pytest.mark.parametrize("method, param", [("sv_fro", 0.9), ("sv_cumulative", 0.8), ("sv_fro", 0.5)])
def test_resize_keeps_the_stated_fraction(method, param):
    adapter = make_adapter(dict(zip(SHAPES, [8, 8, 8, 8])), 2)
    resized, report = resize_adapter(adapter, method, param)
    for name, module in adapter["unet"].items():
        _, s, _ = lowrank_svd(module)
        kept = resized["unet"][name].rank
        values = s if method == "sv_cumulative" else s.square()
        target = param if method == "sv_cumulative" else param**2
        assert (values[:kept].sum() / values.sum()).item() >= target
        assert kept == 1 or (values[: kept - 1].sum() / values.sum()).item() < target  # smallest such rank
        if method == "sv_fro":
            assert report["unet"][name]["fro_retained"] >= param


def test_new_rank_matches_kohya_formulas():
    s = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    assert new_rank(s, "fixed", 3) == 3
    assert new_rank(s, "fixed", 9) == 5
    assert new_rank(s, "sv_ratio", 4) == 2  # σ > 10 / 4 = 2.5: {10, 5}
    assert new_rank(s, "sv_cumulative", 0.8) == 2  # cumsum / 18.5 = .54, .81, …
    assert new_rank(s, "sv_fro", 0.95) == 2  # cumsum σ² / 130.25 = .768, .960 ≥ .9025
    assert new_rank(torch.zeros(4, dtype=torch.float64), "sv_fro", 0.9) == 1
    with pytest.raises(ValueError, match="method must be one of"):
        new_rank(s, "svd", 1)
    with pytest.raises(ValueError, match=r"sv_fro fraction must lie in \(0, 1\], got 2"):
        new_rank(s, "sv_fro", 2)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "peft"])
def test_resize_file_keeps_format_and_records_ranks(tmp_path, fmt):
    adapter = make_adapter(RANKS_B, 3)
    src = write_adapter(adapter, tmp_path / "in", fmt, {}, torch.float32)
    out, report = resize_file(ResizeSpec(str(src), str(tmp_path / "out"), "fixed", 2))
    file = read_adapter(out)
    assert file.format == fmt
    ranks = {name: min(2, rank) for name, rank in RANKS_B.items()}
    (component,) = file.adapter  # a single peft directory does not name its component: ""
    assert component == ("" if fmt == "peft" else "unet")
    assert {n.replace("_", ".") for n in file.adapter[component]} == {n.replace("_", ".") for n in ranks}
    recorded = file.lora2["components"][component]["modules"]
    assert sorted(v["rank"] for v in recorded.values()) == sorted(ranks.values())
    assert file.lora2["history"][-1]["op"] == "resize"


def test_merge_files_roundtrip(tmp_path):
    a, b = make_adapter(RANKS_A, 0), make_adapter(RANKS_B, 1)
    pa = write_adapter(a, tmp_path / "a.safetensors", "diffusers", {}, torch.float32)
    pb = write_adapter(b, tmp_path / "b.safetensors", "kohya", {}, torch.float32)
    out = merge_files(MergeSpec([str(pa), str(pb)], str(tmp_path / "m.safetensors"), weights=[1.0, 0.5]))
    file = read_adapter(out)
    da, db, dm = deltas(a), deltas(b), deltas(file.adapter)
    for key in da:
        torch.testing.assert_close(dm[key], da[key] + 0.5 * db[key], atol=1e-4, rtol=1e-5)


def test_summarize_counts():
    adapter = make_adapter(RANKS_A, 0)
    report = summarize(adapter)
    expected = sum(
        r * (d_out + d_in * (k[0] * k[1] if k else 1))
        for (d_out, d_in, *k), r in zip(SHAPES.values(), RANKS_A.values())
    )
    assert report["totals"]["parameters"] == expected
    assert report["totals"]["bytes_fp32"] == 4 * expected and report["totals"]["bytes_fp16"] == 2 * expected
    assert report["totals"]["max_rank"] == 7 and report["totals"]["min_rank"] == 1
    kinds = {row["module"]: row["kind"] for row in report["modules"]}
    assert kinds["mid_block.resnets.0.conv1"] == "conv"


@pytest.mark.parametrize("fmt", ["diffusers", "kohya", "peft"])
def test_inspect_every_format(tmp_path, fmt):
    path = write_adapter(make_adapter(RANKS_A, 0), tmp_path / "x", fmt, {}, torch.float32)
    report = inspect_file(path)
    assert report["format"] == fmt and report["totals"]["total_rank"] == sum(RANKS_A.values())


def test_cli_smoke(tmp_path, capsys):
    a = write_adapter(make_adapter(RANKS_A, 0), tmp_path / "a.safetensors", "diffusers", {}, torch.float32)
    b = write_adapter(make_adapter(RANKS_B, 1), tmp_path / "b.safetensors", "diffusers", {}, torch.float32)
    assert main(["inspect", str(a), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["totals"]["modules"] == len(SHAPES)
    assert main(["inspect", str(a)]) == 0
    assert "total: 4 modules" in capsys.readouterr().out
    merged = tmp_path / "m.safetensors"
    assert main(["merge", str(a), str(b), "--weights", "1", "0.5", "--out", str(merged), "--rank-budget", "8"]) == 0
    assert sum(m.rank for m in read_adapter(merged).adapter["unet"].values()) == 8
    resized = tmp_path / "r.safetensors"
    cmd = ["resize", str(a), "--method", "sv_fro", "--param", "0.9", "--out", str(resized), "--format", "kohya"]
    assert main(cmd) == 0
    assert read_adapter(resized).format == "kohya"
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"x")
    assert main(["inspect", str(bad)]) == 2
    assert main(["resize", str(a), "--method", "sv_fro", "--param", "3", "--out", str(resized)]) == 2
