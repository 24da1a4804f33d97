"""Every table of measured figures in docs/*.md and README.md names the files it comes from; some are recomputed.

The convention (for whoever adds or edits a table):

- A *figure table* is a Markdown table with a decimal number (``0.713``) or a percentage (``87.5 %``) in its body.
- The paragraph directly above a figure table (its lines up to the previous blank line) starts with ``Source:`` and
  names the table's files in backticks, as paths from the repository root (``benchmarks/results/x.json``, or a folder
  such as ``src/lora2/world/assets/``). A backticked text with a space or without a "/" (a JSON key, a command) is not
  a path. Every named path must exist: results are committed under benchmarks/results/.
- A file that lives only in git history is cited in prose as ``git show <commit>:<path>``, never as the only source of
  a table; a figure that no committed file holds is said to be so where it appears.

Recomputed from their files here: the short answers of docs/RESULTS.md and docs/PERFORMANCE.md, RESULTS.md's table of
method means, DESIGN.md's toy table and PERFORMANCE.md's step-time tables. Wilcoxon p values are not recomputed (that
needs scipy, not a dependency of lora2); the page says how they were made.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
PAGES = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
FIGURE = re.compile(r"\d\.\d|\d ?%")
SEPARATOR = re.compile(r"^\|[-|: ]+\|$")


@dataclass
class Table:
    page: Path
    line: int  # 1-based line of the header
    source: str  # the paragraph above the table, joined with spaces
    header: list[str]
    rows: list[list[str]]

    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"

    def column(self, name: str) -> int:
        return self.header.index(name)

    def row(self, label: str) -> list[str]:
        found = [row for row in self.rows if row[0] == label]
        assert len(found) == 1, f"{self.where()}: no single row {label!r}"
        return found[0]


def _cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


@cache
def tables(page: Path) -> list[Table]:
    """The Markdown tables of a page outside code blocks, with the paragraph above each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    found, fenced, index = [], False, 0
    while index < len(lines):
        line = lines[index]
        fenced ^= line.startswith("```")
        if fenced or not line.startswith("|") or index + 1 >= len(lines) or not SEPARATOR.match(lines[index + 1]):
            index += 1
            continue
        above = index - 1
        while above >= 0 and not lines[above].strip():
            above -= 1
        start = above
        while start > 0 and lines[start - 1].strip():
            start -= 1
        end = index + 2
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        source = " ".join(lines[start : above + 1]) if above >= 0 else ""
        rows = [_cells(row) for row in lines[index + 2 : end]]
        found.append(Table(page, index + 1, source, _cells(line), rows))
        index = end
    return found


def figure_tables() -> list[Table]:
    return [t for page in PAGES for t in tables(page) if any(FIGURE.search(" ".join(row)) for row in t.rows)]


def named_paths(source: str) -> list[str]:
    return [text for text in re.findall(r"`([^`]+)`", source) if "/" in text and " " not in text]


def test_every_figure_table_names_existing_files():
    problems = []
    for table in figure_tables():
        paths = named_paths(table.source) if table.source.startswith("Source:") else []
        if not paths:
            problems.append(f"{table.where()}: no 'Source:' paragraph naming files above the table")
        problems += [f"{table.where()}: {path} does not exist" for path in paths if not (ROOT / path).exists()]
    assert not problems, "\n".join(problems)


def test_the_convention_sees_the_tables_it_should():
    # a perturbation check: tables without figures are exempt, so make sure the figure tables are found at all
    counts = {page.name: sum(t.page == page for t in figure_tables()) for page in PAGES}
    assert counts["RESULTS.md"] >= 10 and counts["PERFORMANCE.md"] >= 10 and counts["DESIGN.md"] == 3
    assert not named_paths("Source: `round_ratio_time_vs_peft`, `python benchmarks/x.py --table`")


# ---------------------------------------------------------------------------------------------- recomputation helpers
def page(name: str) -> Path:
    return ROOT / ("README.md" if name == "README.md" else f"docs/{name}")


def table_under(name: str, heading: str, index: int = 0) -> Table:
    """The ``index``-th table after the heading line ``heading`` of page ``name``."""
    path = page(name)
    lines = path.read_text(encoding="utf-8").splitlines()
    start = lines.index(heading) + 1
    following = [t for t in tables(path) if t.line > start]
    return following[index]


@cache
def load(name: str):
    return json.loads((RESULTS / name).read_text(encoding="utf-8"))


def signed(value: float) -> str:
    return f"{value:+.3f}"


def first_number(cell: str) -> str:
    return re.match(r"[-+]?[\d.]+", cell).group(0)


def paired(cells: list[dict], reference: list[dict]) -> dict:
    """Δ (method − reference) means, pair count and mean size ratio over (subject, seed) pairs."""
    by_key = {(c["subject"], c["seed"]): c for c in reference}
    pairs = [(c, by_key[(c["subject"], c["seed"])]) for c in cells]
    ratios = [a["size_gb"] / b["size_gb"] for a, b in pairs if a["size_gb"] and b["size_gb"]]
    return {
        "pairs": len(pairs),
        "dino": statistics.fmean(a["scores"]["dino"] - b["scores"]["dino"] for a, b in pairs),
        "clip_t": statistics.fmean(a["scores"]["clip_t"] - b["scores"]["clip_t"] for a, b in pairs),
        "size": statistics.fmean(ratios),
    }


# -------------------------------------------------------------------------------------------------------- RESULTS.md
def grid(method: str) -> list[dict]:
    return [c for c in load("world_bench_current_base_pooled.json") if c["method"] == method]


def variant(name: str, seeds: tuple[int, ...]) -> list[dict]:
    return [c for c in load("world_bench_current_base_lr_rtarget.json") if c["variant"] == name and c["seed"] in seeds]


SHORT_ANSWER_ROWS = {
    "fixed-8": lambda: grid("fixed-8"),
    "fixed-16": lambda: grid("fixed-16"),
    "fixed-64": lambda: grid("fixed-64"),
    "DoRA (rank 32)": lambda: grid("dora"),
    "fixed-512 at lr 1e-3 (the grid's one rate)": lambda: grid("fixed-512"),
    "fixed-512 at lr 1.25e-4 (1e-3 · 64/r)": lambda: variant("fixed-512, lr 1.25e-4", (0, 1)),
    "SVD of that fixed-512 to LoRA²'s total rank": lambda: variant(
        "svd of fixed-512 lr 1.25e-4 to lora2's size", (0, 1)
    ),
    "AdaLoRA (32 → 16) at lr 1e-2": lambda: variant("adalora, lr 1e-2", (0,)),
    "LoRA² with r_target 8": lambda: variant("lora2, r_target 8", (0,)),
}


def test_results_short_answer_is_recomputed_from_its_files():
    table = table_under("RESULTS.md", "## Short answer: is LoRA² worth it, and when?")
    assert "world_bench_current_base_pooled.json" in table.source
    assert 5 <= len(table.rows) <= 10 and {row[0] for row in table.rows} == set(SHORT_ANSWER_ROWS)
    for label, cells in SHORT_ANSWER_ROWS.items():
        row, got = table.row(label), paired(cells(), grid("lora2"))
        assert row[table.column("pairs")] == str(got["pairs"]), label
        assert first_number(row[table.column("Δ DINO (p)")]) == signed(got["dino"]), label
        assert first_number(row[table.column("Δ CLIP-T (p)")]) == signed(got["clip_t"]), label
        assert row[table.column("size / LoRA²")] == f"{got['size']:.2f}×", label


def test_results_method_means_are_recomputed():
    table = table_under("RESULTS.md", "### Table (mean ± std over subjects × seeds)")
    for row in table.rows:
        cells = grid(row[0])
        for column, metric in (("DINO ↑", "dino"), ("CLIP-I ↑", "clip_i"), ("CLIP-T ↑", "clip_t")):
            values = [c["scores"][metric] for c in cells]
            expected = f"{statistics.fmean(values):.3f} ± {statistics.pstdev(values):.3f}"
            assert row[table.column(column)].strip("*") == expected, (row[0], metric)


# ---------------------------------------------------------------------------------------------------- PERFORMANCE.md
RUN_FILES = ("sdxl_train_step_repeats.json", "sdxl_train_step_fourth.json", "sdxl_train_step_fifth.json")


def round_ratios(rank: int, checkpointing: bool) -> list[float]:
    return [
        ratio
        for name in RUN_FILES
        for row in load(name)
        if row["method"] == "lora2"
        and row["backbone"] == "sdxl"
        and row["batch"] == 1
        and row["rank"] == rank
        and row["grad_ckpt"] == checkpointing
        for ratio in row["round_ratio_time_vs_peft"]
    ]


def step_row(name: str, method: str, rank: int, checkpointing: bool = False) -> dict:
    (row,) = [
        r
        for r in load(name)
        if r["backbone"] == "sdxl"
        and r["method"] == method
        and r["rank"] == rank
        and r["batch"] == 1
        and r["grad_ckpt"] == checkpointing
    ]
    return row


def gpu_milliseconds(method: str) -> float:
    """Self CUDA time total of the profiled rank-512 step of ``method`` (peft or lora2)."""
    text = (RESULTS / "sdxl_train_step_fifth_profile.txt").read_text(encoding="utf-8")
    section = text.split(f"===== sdxl/{method}/r512/b1/gc0")[1]
    return float(re.search(r"Self CUDA time total: ([\d.]+)ms", section).group(1))


def measurements(name: str, kind: str, rank: int) -> list[dict]:
    """Rank-change or export measurements of a ``rank_change_export*.json`` file at one (starting) rank."""
    return [r for r in load(name)["results"] if r["kind"] == kind and r.get("rank", r.get("from_rank")) == rank]


def test_performance_short_answer_is_recomputed_from_its_files():
    table = table_under("PERFORMANCE.md", "## Short answer: the adapter's step against peft's (issue 6)")
    assert 5 <= len(table.rows) <= 10
    ratio = table.column("LoRA² / peft")
    for label, rank, checkpointing, rounds in (
        ("eager step, rank 64 (10 rounds)", 64, False, 10),
        ("eager step, rank 512 (10 rounds)", 512, False, 10),
        ("eager step with gradient checkpointing, rank 64 (10 rounds)", 64, True, 10),
        ("eager step with gradient checkpointing, rank 512 (9 rounds)", 512, True, 9),
    ):
        values = round_ratios(rank, checkpointing)
        assert len(values) == rounds, label
        expected = f"{statistics.median(values):.2f}× ({min(values):.2f}–{max(values):.2f})"
        assert table.row(label)[ratio] == expected, label

    gpu = table.row("GPU time of one rank-512 step (profiler)")
    lora2, peft = gpu_milliseconds("lora2"), gpu_milliseconds("peft")
    assert gpu[1:] == [f"{lora2:.1f} ms", f"{peft:.1f} ms", f"{lora2 / peft:.2f}×"]

    memory = table.row("peak memory, rank 64 / rank 512 (fifth run)")
    rows = {(m, r): step_row("sdxl_train_step_fifth.json", m, r) for m in ("lora2", "peft") for r in (64, 512)}
    assert memory[1] == f"{rows['lora2', 64]['peak_mem_gib']:.2f} / {rows['lora2', 512]['peak_mem_gib']:.2f} GiB"
    assert memory[2] == f"{rows['peft', 64]['peak_mem_gib']:.2f} / {rows['peft', 512]['peak_mem_gib']:.2f} GiB"
    assert memory[3] == " / ".join(f"{rows['lora2', r]['ratio_mem_vs_peft']:.2f}×" for r in (64, 512))

    graph = table.row("step with CUDA graphs, rank 64 (benchmark only, `lora2 train` runs eager)")
    graphed = step_row("sdxl_train_step_fourth_graph.json", "lora2+cudagraph", 64)
    eager = step_row("sdxl_train_step_fourth_graph.json", "peft", 64)
    assert graph[1:] == [
        f"{graphed['median_step_s']:.3f} s",
        f"{eager['median_step_s']:.3f} s eager",
        f"{graphed['ratio_time_vs_peft']:.2f}×",
    ]

    (change,) = measurements("rank_change_export_fifth.json", "rank_change", 64)
    grow, shrink = change["grow"]["seconds"], change["shrink"]["seconds"]
    expected = (
        f"{grow:.2f} / {shrink:.2f} s "
        f"({change['ratio_grow_vs_step']:.2f} / {change['ratio_shrink_vs_step']:.2f} of a step)"
    )
    assert table.row("rank change of all 560 layers: growth 64 → 80 / shrink 80 → 64")[1] == expected

    (small,) = measurements("rank_change_export_fifth.json", "export", 64)
    large = sorted(
        r["seconds"]
        for name in ("rank_change_export_fifth.json", "rank_change_export_fifth_r512.json")
        for r in measurements(name, "export", 512)
    )
    expected = f"{small['seconds']:.2f} s (372 MB) / {large[0]:.2f}–{large[-1]:.2f} s (2.97 GB)"
    assert table.row("export to a diffusers file, rank 64 / rank 512")[1] == expected


STEP_TABLES = {  # (page heading, table index after it) -> results file; the tables `--table` prints
    ("## Fifth run: four more eager rounds and a profile of the rank-512 step (the current code)", 0): (
        "sdxl_train_step_fifth.json"
    ),
    ("## Fourth run: rank 512 and checkpointing again, CUDA graphs measured", 0): "sdxl_train_step_fourth.json",
    ("## Fourth run: rank 512 and checkpointing again, CUDA graphs measured", 1): "sdxl_train_step_fourth_graph.json",
    ("## Third run (repeats): three interleaved rounds", 0): "sdxl_train_step_repeats.json",
    ("## Second run: after cutting kernel launches", 0): "sdxl_train_step_after.json",
    ("## Results (H200, 1024 px, bf16)", 0): "sdxl_train_step.json",
}


@pytest.mark.parametrize(("where", "name"), list(STEP_TABLES.items()))
def test_performance_step_tables_are_recomputed(where, name):
    table = table_under("PERFORMANCE.md", *where)
    assert f"benchmarks/results/{name}" in table.source
    rows = {
        (r["backbone"], r["method"], str(r["rank"] or "—"), str(r["batch"]), "yes" if r["grad_ckpt"] else "no"): r
        for r in load(name)
    }
    step, memory = table.column("median step (s)"), table.column("peak mem (GiB)")
    checked = 0
    for row in table.rows:
        measured = rows[tuple(row[:5])]
        if measured.get("median_step_s") is None:
            continue
        assert row[step] == f"{measured['median_step_s']:.3f}", row[:5]
        assert row[memory] == f"{measured['peak_mem_gib']:.2f}", row[:5]
        checked += 1
    assert checked >= 6


# --------------------------------------------------------------------------------------------------------- DESIGN.md
def test_design_toy_table_holds_every_row_of_both_files():
    table = table_under("DESIGN.md", "### Choosing the normalisation (measured on a toy)")
    first, rerun = load("rank_dynamics_toy.json")["rows"], load("rank_dynamics_toy_42f58ff.json")["rows"]
    assert len(table.rows) == len(first) == len(rerun) == 18
    for row, measured, again in zip(table.rows, first, rerun):
        setting = [
            measured["lambda_scaling"],
            measured["weight_reg_weight"],
            measured["true_rank"],
            measured["init_rank"],
        ]
        assert [row[0]] + [float(cell) for cell in row[1:4]] == setting
        values = [measured["final_rank"], measured["final_mse"], again["final_rank"], again["final_mse"]]
        assert [float(cell) for cell in row[4:8]] == values, row[:4]


def test_full_scale_short_answer_is_recomputed_from_its_file():
    """The `lora2 train` against the script table: every ratio and figure from benchmarks/results/full_scale.json."""
    table = table_under(
        "PERFORMANCE.md", "## Short answer: `lora2 train` against the diffusers script, at full SDXL architecture"
    )
    vs = json.loads((ROOT / "benchmarks/results/full_scale.json").read_text())["vs_script"]
    for config in ("fixed64", "adaptive", "fixed64_ckpt", "adaptive_ckpt"):
        row, entry = table.row(config), vs[config]
        assert row[table.column("time ratio")] == f"{entry['time_ratio']:.2f}", config
        assert row[table.column("memory ratio")] == f"{entry['mem_ratio']:.2f}", config
        assert row[table.column("lora2 reserved GiB")] == f"{entry['lora2_peak_process_gib']:.1f}", config
    rows = {row["name"]: row for row in json.loads((ROOT / "benchmarks/results/full_scale.json").read_text())["rows"]}
    every = table_under("PERFORMANCE.md", "### Every `lora2 train` path at full scale")
    assert len(every.rows) == len(rows)
    for line in every.rows:
        assert line[every.column("status")].strip("*") == rows[line[0]]["status"], line[0]
