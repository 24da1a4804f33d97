"""`lora2 report DIR [DIR ...]`: the paper-style results table and plots of ``lora2 bench`` folders.

Reads every ``cells/<subject>/<method>/seed<k>/`` (status.json, run/eval.json, the adapter) of one folder, or of
several folders of the same protocol (a grid split over machines: one folder per GPU host or CPU run), and writes
``report.md``, ``cells.json`` (every cell's scores, size, ranks and folder) and the plots, into the folder or
``--out``. A cell evaluated in two folders counts once (the first folder's) and is listed with both scores: the
check that two machines reproduce each other. A folder archived without its ``run/`` folders is read from the
``cells.json`` of its earlier report. ``report.md`` holds the table (rows: methods; DINO, CLIP-I, CLIP-T as
mean ± std over subjects × seeds; adapter size in GiB of fp32 parameters; mean rank over layers; training time), each
method paired with LoRA² (mean differences, sign-flip p and Holm's adjusted p, ``lora2.eval.stats``) and the PNG plots:

- ``pareto.png``: each metric against adapter size (log scale), one point per method with its spread;
- ``rank_heatmap_<subject>.png``: per-layer ranks of the learned-rank methods (rows: layers; columns: method/seed);
- ``rank_vs_complexity.png``: total rank of each learned-rank cell against its subject's complexity (world subjects:
  ``subjects.json`` beside the subject folders);
- ``rank_by_block.png``: mean rank by UNet block (down/mid/up) and by attention type (attn1 self / attn2 cross ×
  to_q/to_k/to_v/to_out).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API: no pyplot, no global backend switch

from lora2.eval.bench import PROTOCOL_KEYS, find_method, method_registry
from lora2.eval.evaluate import METRICS, adapter_summary
from lora2.eval.stats import holm, sign_flip_p
from lora2.train.run_folder import MAIN_ADAPTER

logger = logging.getLogger(__name__)

METRIC_TITLES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}
BLOCKS = ("down", "mid", "up")
ATTENTIONS = ("attn1", "attn2")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out")


@dataclass
class CellResult:
    """What one finished (or failed) cell contributed."""

    subject: str
    method: str
    seed: int
    state: str
    error: str | None = None
    scores: dict[str, float] = field(default_factory=dict)  # metric -> subject mean over prompts
    ranks: dict[str, int] = field(default_factory=dict)
    size_gb: float | None = None
    mean_rank: float | None = None
    train_seconds: float | None = None
    folder: str = ""  # the bench folder it was read from


def _archived_cells(folder: Path) -> dict[tuple[str, str, int], dict]:
    """The cells of this folder's earlier report (``cells.json``), by (subject, method, seed); {} if none."""
    path = folder / "cells.json"
    if not path.is_file():
        return {}
    return {(c["subject"], c["method"], int(c["seed"])): c for c in json.loads(path.read_text(encoding="utf-8"))}


def collect(folder: str | Path) -> list[CellResult]:
    """Every cell of a bench folder, with its scores and adapter ranks where available.

    A cell archived without its ``run/`` folder (``benchmarks/gpu_bench.sh`` leaves adapters and checkpoints on the
    device) takes its scores, ranks and size from the folder's ``cells.json``, written by ``lora2 report`` before.
    """
    folder = Path(folder)
    cells_dir = folder / "cells"
    if not cells_dir.is_dir():
        raise ValueError(f"{folder} is not a lora2 bench folder (no cells/ inside)")
    archived = _archived_cells(folder)
    results = []
    for status_path in sorted(cells_dir.glob("*/*/seed*/status.json")):
        status = json.loads(status_path.read_text(encoding="utf-8"))
        cell = CellResult(
            subject=status["subject"],
            method=status["method"],
            seed=int(status["seed"]),
            state=status["state"],
            error=status.get("error"),
            train_seconds=status.get("train_seconds"),
            folder=str(folder),
        )
        run = status_path.parent / "run"
        before = archived.get((cell.subject, cell.method, cell.seed))
        if not run.is_dir() and before is not None:
            cell.scores, cell.ranks = before["scores"], before["ranks"]
            cell.size_gb, cell.mean_rank = before["size_gb"], before["mean_rank"]
            results.append(cell)
            continue
        eval_path = run / "eval.json"
        adapter = None
        if eval_path.is_file():
            evaluation = json.loads(eval_path.read_text(encoding="utf-8"))
            cell.scores = {metric: evaluation["summary"][metric]["mean"] for metric in METRICS}
            adapter = evaluation.get("adapter")
        if adapter is None and (run / MAIN_ADAPTER).is_file():
            adapter = adapter_summary(run / MAIN_ADAPTER)
        if adapter is not None:
            cell.ranks, cell.size_gb, cell.mean_rank = adapter["ranks"], adapter["size_gb_fp32"], adapter["mean_rank"]
        results.append(cell)
    if not results:
        raise ValueError(f"{cells_dir} holds no cells (no status.json): run lora2 bench first")
    return results


def _protocol(folder: Path) -> dict:
    """The settings of a bench folder that change results (``bench.json``; lists compared regardless of order)."""
    path = folder / "bench.json"
    grid = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    values = {key: grid.get(key) for key in PROTOCOL_KEYS}
    return {key: sorted(value) if isinstance(value, list) else value for key, value in values.items()}


def collect_folders(folders: list[Path]) -> tuple[list[CellResult], list[tuple[CellResult, CellResult]]]:
    """The cells of several bench folders of one protocol, and the pairs of a cell evaluated in two of them.

    A cell evaluated in more than one folder is kept from the first; one that is unfinished in a folder and evaluated
    in another is taken from the latter. Folders run with different settings cannot be pooled: ValueError.
    """
    reference = _protocol(folders[0])
    for folder in folders[1:]:
        changed = {k: (reference[k], v) for k, v in _protocol(folder).items() if v != reference[k]}
        if changed:
            details = ", ".join(f"{key}: {a!r} vs {b!r}" for key, (a, b) in changed.items())
            raise ValueError(f"{folders[0]} and {folder} were run with different settings ({details}): not pooled")
    cells: dict[tuple[str, str, int], CellResult] = {}
    repeats = []
    for folder in folders:
        for cell in collect(folder):
            key = (cell.subject, cell.method, cell.seed)
            first = cells.get(key)
            if first is None or (cell.scores and not first.scores):
                cells[key] = cell
            elif cell.scores:
                repeats.append((first, cell))
    return list(cells.values()), repeats


def repeats_table(repeats: list[tuple[CellResult, CellResult]]) -> str:
    """Cells evaluated in two folders: both scores and their difference (the first folder's counts)."""
    lines = ["| Cell | folders | DINO | Δ DINO | Δ CLIP-I | Δ CLIP-T |", "|---|---|---|---|---|---|"]
    for first, second in sorted(repeats, key=lambda pair: (pair[0].method, pair[0].subject, pair[0].seed)):
        delta = {m: second.scores[m] - first.scores[m] for m in METRICS}
        lines.append(
            f"| {first.subject}/{first.method}/seed{first.seed} | {Path(first.folder).name} → "
            f"{Path(second.folder).name} | {first.scores['dino']:.3f} → {second.scores['dino']:.3f} | "
            f"{delta['dino']:+.3f} | {delta['clip_i']:+.3f} | {delta['clip_t']:+.3f} |"
        )
    worst = max(abs(second.scores[m] - first.scores[m]) for first, second in repeats for m in METRICS)
    lines += ["", f"Largest difference over {len(repeats)} repeated cells and the three metrics: {worst:.4f}."]
    return "\n".join(lines)


def _ordered_methods(results: list[CellResult]) -> list[str]:
    known = list(method_registry())
    present = {r.method for r in results}
    return [m for m in known if m in present] + sorted(present - set(known))


def _mean_std(values: list[float]) -> tuple[float, float] | None:
    if not values:
        return None
    return statistics.fmean(values), statistics.pstdev(values) if len(values) > 1 else 0.0


def _fmt(pair: tuple[float, float] | None, digits: int = 3) -> str:
    return "–" if pair is None else f"{pair[0]:.{digits}f} ± {pair[1]:.{digits}f}"


def method_table(results: list[CellResult]) -> list[dict]:
    """One row per method: metric mean/std over evaluated cells, size, rank, time, cell counts."""
    rows = []
    for method in _ordered_methods(results):
        cells = [r for r in results if r.method == method]
        scored = [r for r in cells if r.scores]
        row = {
            "method": method,
            "cells": len(cells),
            "evaluated": len(scored),
            "failed": sum(r.state == "failed" for r in cells),
            "unsupported": next((r.error for r in cells if r.state == "unsupported"), None),
            "size_gb": _mean_std([r.size_gb for r in cells if r.size_gb is not None]),
            "mean_rank": _mean_std([r.mean_rank for r in cells if r.mean_rank is not None]),
            "train_minutes": _mean_std([r.train_seconds / 60 for r in cells if r.train_seconds is not None]),
        }
        for metric in METRICS:
            row[metric] = _mean_std([r.scores[metric] for r in scored])
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    """The paper-style table (best mean of each metric in bold)."""
    best = {m: max((r[m][0] for r in rows if r[m]), default=None) for m in METRICS}
    header = "| Method | DINO ↑ | CLIP-I ↑ | CLIP-T ↑ | Size (GB fp32) | Mean rank | Train time (min) | Cells |"
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        if row["unsupported"]:
            lines.append(f"| {row['method']} | unsupported: {row['unsupported']} |{' – |' * 5} 0/{row['cells']} |")
            continue
        metrics = []
        for metric in METRICS:
            text = _fmt(row[metric])
            metrics.append(f"**{text}**" if row[metric] and row[metric][0] == best[metric] else text)
        size = "–" if row["size_gb"] is None else f"{row['size_gb'][0]:.4g}"
        rank = "–" if row["mean_rank"] is None else f"{row['mean_rank'][0]:.1f}"
        cells = f"{row['evaluated']}/{row['cells']}" + (f" ({row['failed']} failed)" if row["failed"] else "")
        minutes = _fmt(row["train_minutes"], 1)
        lines.append(f"| {row['method']} | {' | '.join(metrics)} | {size} | {rank} | {minutes} | {cells} |")
    return "\n".join(lines)


def paired_table(results: list[CellResult], reference: str = "lora2") -> str:
    """Each method against ``reference`` on the (subject, seed) pairs where both were evaluated.

    A grid cut short by a time limit leaves methods with different subjects; pairing keeps the comparison fair.
    Columns: mean difference (method − reference) of each metric, how often the method scored higher, and the mean
    ratio of adapter sizes.
    """
    scored = {(r.subject, r.seed, r.method): r for r in results if r.scores}
    columns = "pairs | Δ DINO | Δ CLIP-I | Δ CLIP-T | higher DINO | higher CLIP-T | size ratio"
    lines = [f"| Method − {reference} | {columns} |", "|" + "---|" * 8]
    for method in _ordered_methods(results):
        if method == reference:
            continue
        pairs = [
            (cell, scored[(cell.subject, cell.seed, reference)])
            for key, cell in scored.items()
            if key[2] == method and (key[0], key[1], reference) in scored
        ]
        if not pairs:
            continue
        deltas = {m: statistics.fmean(a.scores[m] - b.scores[m] for a, b in pairs) for m in METRICS}
        wins = {m: sum(a.scores[m] > b.scores[m] for a, b in pairs) for m in ("dino", "clip_t")}
        ratios = [a.size_gb / b.size_gb for a, b in pairs if a.size_gb and b.size_gb]
        ratio = f"{statistics.fmean(ratios):.2f}×" if ratios else "–"
        lines.append(
            f"| {method} | {len(pairs)} | {deltas['dino']:+.3f} | {deltas['clip_i']:+.3f} | {deltas['clip_t']:+.3f} "
            f"| {wins['dino']}/{len(pairs)} | {wins['clip_t']}/{len(pairs)} | {ratio} |"
        )
    return "\n".join(lines)


def paired_tests(results: list[CellResult], pairs: list[tuple[str, str]]) -> list[dict]:
    """Each (method, other) of ``pairs`` on their common (subject, seed) pairs, every metric: mean difference
    (method − other), sign-flip permutation p (``stats.sign_flip_p``) and Holm's adjusted p over the whole family
    (pairs × metrics)."""
    scored = {(r.subject, r.seed, r.method): r.scores for r in results if r.scores}
    tests = []
    for method, other in pairs:
        keys = [(s, seed) for (s, seed, m) in scored if m == method and (s, seed, other) in scored]
        for metric in METRICS if keys else ():
            differences = [scored[(s, seed, method)][metric] - scored[(s, seed, other)][metric] for s, seed in keys]
            tests.append({"method": method, "other": other, "metric": metric, "pairs": len(keys),
                          "mean_diff": statistics.fmean(differences), "p": sign_flip_p(differences)})  # fmt: skip
    for test, adjusted in zip(tests, holm([t["p"] for t in tests])):
        test["p_holm"] = adjusted
    return tests


def paired_tests_table(tests: list[dict], reference: str = "lora2") -> str:
    """``paired_tests`` as Markdown: one row per method, Δ (p, Holm p) per metric."""
    titles = " | ".join(f"Δ {METRIC_TITLES[m]} (p, Holm p)" for m in METRICS)
    lines = [f"| Method − {reference} | pairs | {titles} |", "|" + "---|" * (2 + len(METRICS))]
    for method in dict.fromkeys(t["method"] for t in tests):
        row = {t["metric"]: t for t in tests if t["method"] == method}
        cells = " | ".join(f"{row[m]['mean_diff']:+.3f} ({row[m]['p']:.3g}, {row[m]['p_holm']:.3g})" for m in METRICS)
        lines.append(f"| {method} | {row[METRICS[0]]['pairs']} | {cells} |")
    return "\n".join(lines)


def subject_table(results: list[CellResult], metric: str = "dino") -> str:
    """Subjects (rows) × methods (columns): ``metric`` averaged over seeds, with the mean rank of learned methods."""
    methods = _ordered_methods(results)
    lines = ["| Subject | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for subject in sorted({r.subject for r in results}):
        row = []
        for method in methods:
            cells = [r for r in results if r.subject == subject and r.method == method and r.scores]
            row.append(f"{statistics.fmean(r.scores[metric] for r in cells):.3f}" if cells else "–")
        lines.append(f"| {subject} | " + " | ".join(row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- layer classification
def layer_block(module: str) -> str | None:
    """ "down", "mid" or "up" for a UNet module name (diffusers or kohya spelling), else None."""
    match = re.search(r"(down_blocks|mid_block|up_blocks)", module)
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}[match.group(1)] if match else None


def layer_attention(module: str) -> tuple[str, str] | None:
    """(``attn1`` | ``attn2``, ``to_q`` | ``to_k`` | ``to_v`` | ``to_out``) of an attention projection, else None."""
    match = re.search(r"(attn[12])[._](to_q|to_k|to_v|to_out)", module)
    return (match.group(1), match.group(2)) if match else None


def _learned(results: list[CellResult]) -> list[CellResult]:
    """Cells whose ranks differ between layers (learned-rank or truncated methods)."""
    varied = [r for r in results if r.ranks and (len(set(r.ranks.values())) > 1 or r.method.startswith("lora2"))]
    return [r for r in varied if not r.method.startswith("iso-")]  # an iso-size LoRA's ranks differ by one at most


# ---------------------------------------------------------------------- plots
def plot_pareto(rows: list[dict], path: Path) -> None:
    """Each metric against adapter size, one point per method (error bars: std over subjects × seeds)."""
    fig = Figure(figsize=(5 * len(METRICS), 4))
    axes = fig.subplots(1, len(METRICS))
    for ax, metric in zip(axes, METRICS):
        for row in rows:
            if row[metric] is None or row["size_gb"] is None:
                continue
            fixed = row["method"].startswith("fixed-")
            ax.errorbar(
                row["size_gb"][0], row[metric][0], yerr=row[metric][1], fmt="o" if fixed else "*",
                markersize=6 if fixed else 11, capsize=3, label=row["method"],
            )  # fmt: skip
            ax.annotate(row["method"], (row["size_gb"][0], row[metric][0]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel("adapter size (GB, fp32)")
        ax.set_title(METRIC_TITLES[metric])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_rank_heatmap(subject: str, cells: list[CellResult], path: Path) -> None:
    """Rows: layers (UNet order as named); columns: method/seed; colour: rank (log scale)."""
    modules = sorted({m for c in cells for m in c.ranks})
    columns = sorted(cells, key=lambda c: (c.method, c.seed))
    matrix = np.array([[c.ranks.get(m, np.nan) for c in columns] for m in modules], dtype=float)  # (layers, cells)
    fig = Figure(figsize=(4 + 0.6 * len(columns), min(24.0, 2 + 0.12 * len(modules))))
    ax = fig.subplots()
    image = ax.imshow(np.log2(matrix), aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(columns)), [f"{c.method}\nseed {c.seed}" for c in columns], rotation=90, fontsize=7)
    step = max(1, len(modules) // 150)  # SDXL has ~700 attention projections: label at most ~150 rows
    ax.set_yticks(range(0, len(modules), step), modules[::step], fontsize=3 if step > 1 or len(modules) > 150 else 7)
    fig.colorbar(image, ax=ax, label="log2 rank")
    ax.set_title(f"per-layer rank: {subject}")
    fig.savefig(path, dpi=120, bbox_inches="tight")


def subject_complexity(bench_dirs: list[Path]) -> dict[str, float]:
    """Subject → complexity from ``subjects.json`` beside the benches' subject folders (world subjects), if any."""
    folders = []
    for bench_dir in bench_dirs:
        grid_path = bench_dir / "bench.json"
        if grid_path.is_file():
            folders += json.loads(grid_path.read_text(encoding="utf-8")).get("subject_folders", {}).values()
    complexity: dict[str, float] = {}
    for root in {Path(f).parent for f in folders}:
        path = root / "subjects.json"
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = data.get("subjects", data) if isinstance(data, dict) else data
        items = entries.items() if isinstance(entries, dict) else ((e.get("name"), e) for e in entries)
        for name, entry in items:
            if isinstance(entry, dict) and "complexity" in entry:
                complexity[name] = float(entry["complexity"])
    return complexity


def _average_ranks(values: list[float]) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing their mean rank."""
    array = np.asarray(values, dtype=float)
    order = array.argsort(kind="stable")
    ranks = np.empty(len(array))
    ranks[order] = np.arange(1, len(array) + 1)
    for value in np.unique(array):
        ranks[array == value] = ranks[array == value].mean()
    return ranks


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: Pearson's correlation of the average ranks of ``x`` and ``y`` (NaN if either is
    constant)."""
    rx, ry = _average_ranks(x), _average_ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def complexity_table(cells: list[CellResult], complexity: dict[str, float]) -> str:
    """Per learned-rank method: Spearman ρ of subject complexity against the subject's total rank (mean over seeds)."""
    lines = ["| Method | subjects | total rank (min–max) | Spearman ρ |", "|---|---|---|---|"]
    for method in sorted({c.method for c in cells}):
        totals: dict[str, list[int]] = {}
        for c in cells:
            if c.method == method:
                totals.setdefault(c.subject, []).append(sum(c.ranks.values()))
        subjects = sorted(totals)
        means = [statistics.fmean(totals[s]) for s in subjects]
        rho = spearman([complexity[s] for s in subjects], means) if len(subjects) > 2 else float("nan")
        shown = "–" if np.isnan(rho) else f"{rho:+.2f}"
        lines.append(f"| {method} | {len(subjects)} | {min(means):.0f}–{max(means):.0f} | {shown} |")
    return "\n".join(lines)


def plot_rank_vs_complexity(cells: list[CellResult], complexity: dict[str, float], path: Path) -> None:
    """Total rank of each learned-rank cell against its subject's complexity, one colour per method."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for method in sorted({c.method for c in cells}):
        points = [(complexity[c.subject], sum(c.ranks.values())) for c in cells if c.method == method]
        ax.scatter(*zip(*points), label=method, alpha=0.8)
    ax.set_xlabel("subject complexity")
    ax.set_ylabel("total rank (sum over layers)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def rank_breakdown(cells: list[CellResult]) -> dict[str, dict[str, float]]:
    """Method → {"down"/"mid"/"up"/"attn1.to_q"/…: mean rank over the method's cells and matching layers}."""
    out: dict[str, dict[str, float]] = {}
    for method in sorted({c.method for c in cells}):
        groups: dict[str, list[int]] = {}
        for cell in (c for c in cells if c.method == method):
            for module, rank in cell.ranks.items():
                block, attention = layer_block(module), layer_attention(module)
                if block:
                    groups.setdefault(block, []).append(rank)
                if attention:
                    groups.setdefault(".".join(attention), []).append(rank)
        out[method] = {key: statistics.fmean(values) for key, values in groups.items()}
    return out


def plot_rank_breakdown(breakdown: dict[str, dict[str, float]], path: Path) -> None:
    """Grouped bars: mean rank by block, and by attention type × projection."""
    attention_keys = [f"{a}.{p}" for a in ATTENTIONS for p in PROJECTIONS]
    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 2.5]})
    for ax, keys, title in (
        (axes[0], BLOCKS, "by UNet block"),
        (axes[1], attention_keys, "by attention (1 self, 2 cross)"),
    ):
        width = 0.8 / max(1, len(breakdown))
        for i, (method, values) in enumerate(breakdown.items()):
            heights = [values.get(k, 0.0) for k in keys]
            ax.bar(np.arange(len(keys)) + i * width, heights, width, label=method)
        ax.set_xticks(np.arange(len(keys)) + width * (len(breakdown) - 1) / 2, keys, rotation=30, fontsize=8)
        ax.set_ylabel("mean rank")
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ---------------------------------------------------------------------- the report
def report(*folders: str | Path, out: str | Path | None = None) -> Path:
    """Write ``report.md``, ``cells.json`` and the PNG plots of one or more bench folders into ``out`` (default: the
    folder, when there is one); returns the Markdown path."""
    if not folders:
        raise ValueError("give at least one bench folder")
    paths = [Path(f) for f in folders]
    if out is None and len(paths) > 1:
        raise ValueError(f"{len(paths)} bench folders: give --out for the pooled report")
    out_dir = Path(out) if out is not None else paths[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    results, repeats = collect_folders(paths)
    rows = method_table(results)
    names = ", ".join(f"`{p}`" for p in paths)
    sections = [
        "# LoRA² benchmark report",
        "",
        f"Bench folder(s) {names}: {len({r.subject for r in results})} subject(s), {len({r.seed for r in results})} "
        f"seed(s), {len(rows)} method(s). Metrics are mean ± std over subjects × seeds (each cell: mean over its "
        "prompts). Size: LoRA parameters in fp32, GiB. Mean rank: over adapted layers.",
        "",
        markdown_table(rows),
        "",
        "## Paired with LoRA² (same subject and seed)",
        "",
        paired_table(results),
        "",
        "## Paired tests against LoRA²",
        "",
        "Sign-flip permutation test of the mean paired difference, two-sided; Holm's correction over every method",
        "and metric below (reject at adjusted p < 0.05).",
        "",
        paired_tests_table(paired_tests(results, [(m, "lora2") for m in _ordered_methods(results) if m != "lora2"])),
        "",
        "## DINO per subject",
        "",
        subject_table(results, "dino"),
        "",
        "## CLIP-T per subject",
        "",
        subject_table(results, "clip_t"),
        "",
    ]
    plot_pareto(rows, out_dir / "pareto.png")
    sections += ["## Quality against size", "", "![pareto](pareto.png)", ""]

    learned = [r for r in _learned(results) if r.ranks]
    if learned:
        sections += ["## Where the rank goes", ""]
        for subject in sorted({c.subject for c in learned}):
            name = f"rank_heatmap_{re.sub(r'[^A-Za-z0-9_.-]+', '_', subject)}.png"
            plot_rank_heatmap(subject, [c for c in learned if c.subject == subject], out_dir / name)
            sections.append(f"![{subject}]({name})")
        breakdown = rank_breakdown(learned)
        plot_rank_breakdown(breakdown, out_dir / "rank_by_block.png")
        sections += ["", "![rank by block](rank_by_block.png)", ""]
        complexity = subject_complexity(paths)
        # an SVD truncation to LoRA²'s total rank would hide the LoRA² point under its own
        registry = method_registry()
        derived = ("resize", "iso")
        with_complexity = [
            c
            for c in learned
            if c.subject in complexity and getattr(find_method(c.method, registry), "kind", "") not in derived
        ]
        if with_complexity:
            plot_rank_vs_complexity(with_complexity, complexity, out_dir / "rank_vs_complexity.png")
            sections += ["![rank vs complexity](rank_vs_complexity.png)", ""]
            sections += [complexity_table(with_complexity, complexity), ""]
        else:
            sections += ["(No subject complexity known: rank-vs-complexity plot skipped.)", ""]

    unfinished = ("failed", "interrupted", "pending", "running", "retrying", "trained")
    problems = [r for r in results if r.state in unfinished]
    if problems:
        sections += ["## Unfinished or failed cells", ""]
        for r in problems:
            first_line = (r.error or "").strip().splitlines()[0] if r.error else ""
            sections.append(
                f"- `{r.subject}/{r.method}/seed{r.seed}`: {r.state}" + (f": {first_line}" if first_line else "")
            )
        sections.append("")
    if repeats:
        sections += ["## Cells run in more than one folder", "", repeats_table(repeats), ""]
    cells = [asdict(r) for r in sorted(results, key=lambda r: (r.seed, r.subject, r.method))]
    (out_dir / "cells.json").write_text(json.dumps(cells, indent=1) + "\n", encoding="utf-8")
    path = out_dir / "report.md"
    path.write_text("\n".join(sections), encoding="utf-8")
    logger.info("report -> %s", path)
    return path
