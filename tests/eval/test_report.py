"""`lora2 report` from a synthetic bench folder: table values, plots, failures listed, bad folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from lora2.cli import main
from lora2.eval.report import (
    collect,
    layer_attention,
    layer_block,
    method_table,
    rank_breakdown,
    report,
    spearman,
)

MODULES = [
    f"{block}.attentions.0.transformer_blocks.0.{attn}.{proj}"
    for block in ("down_blocks.1", "mid_block", "up_blocks.0")
    for attn in ("attn1", "attn2")
    for proj in ("to_q", "to_k", "to_v", "to_out.0")
]


def _cell(out: Path, subject: str, method: str, seed: int, state: str = "done", score=None, ranks=None, **extra):
    folder = out / "cells" / subject / method / f"seed{seed}"
    (folder / "run").mkdir(parents=True)
    status = {"subject": subject, "method": method, "seed": seed, "state": state, "attempts": [], **extra}
    (folder / "status.json").write_text(json.dumps(status))
    if ranks is not None:
        tensors = {}
        for name, rank in ranks.items():
            tensors[f"unet.{name}.lora_A.weight"] = np.zeros((rank, 4), np.float32)
            tensors[f"unet.{name}.lora_B.weight"] = np.zeros((4, rank), np.float32)
        save_file(tensors, str(folder / "run" / "pytorch_lora_weights.safetensors"))
    if score is not None:
        summary = {
            m: {"mean": score + offset, "std": 0.0} for m, offset in (("dino", 0), ("clip_i", 0.1), ("clip_t", -0.2))
        }
        (folder / "run" / "eval.json").write_text(json.dumps({"summary": summary}))


@pytest.fixture()
def bench_dir(tmp_path) -> Path:
    out = tmp_path / "bench"
    subjects = tmp_path / "subjects"
    subjects.mkdir()
    records = [{"name": "a", "complexity": 1}, {"name": "b", "complexity": 4}]
    (subjects / "subjects.json").write_text(json.dumps({"subjects": records}))
    (out / "cells").mkdir(parents=True)
    (out / "bench.json").write_text(
        json.dumps({"subject_folders": {"a": str(subjects / "a"), "b": str(subjects / "b")}})
    )
    for s, subject in enumerate(("a", "b")):
        for seed in (0, 1):
            _cell(
                out, subject, "fixed-8", seed, score=0.5 + 0.1 * s, ranks=dict.fromkeys(MODULES, 8), train_seconds=60
            )
            learned = {m: 2 + (i + seed + 3 * s) % 5 for i, m in enumerate(MODULES)}
            _cell(out, subject, "lora2", seed, score=0.6 + 0.2 * s, ranks=learned, train_seconds=120)
        _cell(out, subject, "adalora", 0, state="unsupported", error="lora2 train has no AdaLoRA option yet")
    _cell(out, "a", "fixed-512", 0, state="failed", error="exit code 1\nCUDA out of memory")
    return out


def test_table_values(bench_dir):
    rows = {row["method"]: row for row in method_table(collect(bench_dir))}
    assert list(rows) == ["fixed-8", "fixed-512", "lora2", "adalora"]  # registry order
    mean, std = rows["lora2"]["dino"]
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.1)  # subjects 0.6, 0.8 × 2 seeds
    assert rows["fixed-8"]["clip_t"][0] == pytest.approx(0.35)
    assert rows["fixed-8"]["mean_rank"] == (8.0, 0.0)
    assert rows["fixed-8"]["size_gb"][0] == pytest.approx(24 * 8 * 8 * 4 / 2**30)
    assert rows["lora2"]["train_minutes"] == (2.0, 0.0)
    assert rows["fixed-512"]["failed"] == 1 and rows["fixed-512"]["dino"] is None


def test_report_writes_markdown_and_plots(bench_dir):
    assert main(["report", str(bench_dir)]) == 0
    text = (bench_dir / "report.md").read_text()
    assert "| lora2 | **0.700 ± 0.100** | **0.800 ± 0.100** | **0.500 ± 0.100** |" in text
    assert "| adalora | unsupported: lora2 train has no AdaLoRA option yet" in text
    assert "`a/fixed-512/seed0`: failed: exit code 1" in text
    # 4 pairs, all below LoRA²: the sign-flip p is 2/16, Holm's over 3 metrics 3 · 0.125
    assert "| fixed-8 | 4 | -0.150 (0.125, 0.375) | -0.150 (0.125, 0.375) | -0.150 (0.125, 0.375) |" in text
    for png in (
        "pareto.png",
        "rank_by_block.png",
        "rank_vs_complexity.png",
        "rank_heatmap_a.png",
        "rank_heatmap_b.png",
    ):
        assert (bench_dir / png).stat().st_size > 1000, png
    assert not (bench_dir / "rank_heatmap_fixed-8.png").exists()


def test_rank_breakdown_by_block_and_attention(bench_dir):
    learned = [c for c in collect(bench_dir) if c.method == "lora2"]
    breakdown = rank_breakdown(learned)["lora2"]
    assert set(breakdown) == {"down", "mid", "up"} | {
        f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out")
    }
    expected = np.mean([c.ranks[m] for c in learned for m in MODULES if ".mid_block." in f".{m}"])
    assert breakdown["mid"] == pytest.approx(expected)
    assert layer_block("lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_q") == "up"
    assert layer_attention("up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0") == ("attn2", "to_out")
    assert layer_attention("down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_k") == ("attn1", "to_k")
    assert layer_block("conv_in") is None


def test_not_a_bench_folder(tmp_path):
    with pytest.raises(ValueError, match="not a lora2 bench folder"):
        report(tmp_path)
    (tmp_path / "cells").mkdir()
    with pytest.raises(ValueError, match="holds no cells"):
        report(tmp_path)


def _second_folder(tmp_path: Path, bench_dir: Path, **protocol) -> Path:
    """Another bench folder of the same grid (another machine): one repeated cell, one finishing a failed cell."""
    other = tmp_path / "other"
    (other / "cells").mkdir(parents=True)
    grid = json.loads((bench_dir / "bench.json").read_text())
    (other / "bench.json").write_text(json.dumps({**grid, **protocol}))
    _cell(other, "a", "lora2", 0, score=0.65, ranks=dict.fromkeys(MODULES, 4))  # also in bench_dir, with 0.6
    _cell(other, "a", "fixed-512", 0, score=0.4, ranks=dict.fromkeys(MODULES, 512))  # failed in bench_dir
    _cell(other, "b", "fixed-8", 2, score=0.9, ranks=dict.fromkeys(MODULES, 8))  # only here
    return other


def test_report_pools_folders(tmp_path, bench_dir):
    other = _second_folder(tmp_path, bench_dir)
    pooled = tmp_path / "pooled"
    assert main(["report", str(bench_dir), str(other), "--out", str(pooled)]) == 0
    cells = {(c["subject"], c["method"], c["seed"]): c for c in json.loads((pooled / "cells.json").read_text())}
    assert cells["a", "lora2", 0]["scores"]["dino"] == pytest.approx(0.6)  # the first folder's counts
    assert cells["a", "lora2", 0]["folder"] == str(bench_dir)
    assert cells["a", "fixed-512", 0]["state"] == "done" and cells["a", "fixed-512", 0]["folder"] == str(other)
    assert ("b", "fixed-8", 2) in cells
    text = (pooled / "report.md").read_text()
    assert "| a/lora2/seed0 | bench → other | 0.600 → 0.650 | +0.050 |" in text
    assert "Largest difference over 1 repeated cells and the three metrics: 0.0500." in text
    assert "failed" not in text  # the failed cell was finished in the other folder
    assert "| lora2 | 2 |" in text  # the complexity table: two subjects, too few for a correlation
    assert not (bench_dir / "report.md").exists()


def test_report_reads_a_folder_archived_without_runs(tmp_path, bench_dir):
    assert main(["report", str(bench_dir)]) == 0
    before = json.loads((bench_dir / "cells.json").read_text())
    for run in (bench_dir / "cells").glob("*/*/seed*/run"):
        shutil.rmtree(run)  # what benchmarks/gpu_bench.sh brings back: status and logs, no adapters
    pooled = tmp_path / "pooled"
    assert main(["report", str(bench_dir), "--out", str(pooled)]) == 0
    after = json.loads((pooled / "cells.json").read_text())
    assert [{**c, "folder": ""} for c in after] == [{**c, "folder": ""} for c in before]
    assert "| lora2 | **0.700 ± 0.100** |" in (pooled / "report.md").read_text()


def test_report_refuses_mixed_protocols(tmp_path, bench_dir):
    other = _second_folder(tmp_path, bench_dir, steps=500)
    with pytest.raises(ValueError, match=r"different settings \(steps: None vs 500\)"):
        report(bench_dir, other, out=tmp_path / "pooled")
    with pytest.raises(ValueError, match="give --out"):
        report(bench_dir, other)


def test_spearman_is_the_correlation_of_ranks():
    assert spearman([1, 2, 3, 4], [1, 8, 27, 1000]) == pytest.approx(1.0)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [9, 5, 2, 0]) == pytest.approx(-1.0)
    # ties share their mean rank: x ranks (1, 2.5, 2.5, 4), y ranks (1, 3, 2, 4) -> 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
