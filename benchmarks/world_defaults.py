"""The trainer's method defaults checked on the first world: each LoRA² variant against ``lora2``, paired.

Reads ``lora2 bench`` folders (``lora2.eval.report.collect``; a cell found in two folders counts once, from the
first), pairs every method with the reference method on the same subject and seed, and writes, for each method, its
mean scores, mean rank and size, and the paired sign-flip tests against the reference with Holm's correction over all
methods and metrics (``lora2.eval.report.paired_tests``) to benchmarks/results/world_defaults_cpu.json (or
``--out``). Unlike ``lora2 report`` it pools folders whose bench settings differ (a variant at its own learning rate
is run without the grid's ``--train-arg learning_rate``); each folder's settings are written beside the results.
With ``--reference-cells`` (a ``cells.json`` of ``lora2 report``, e.g. the committed pooled grid) the reference
method's cells that no folder holds are taken from that file.

    python benchmarks/world_defaults.py FOLDER [FOLDER ...] [--reference lora2] [--reference-cells FILE] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from lora2.eval.bench import PROTOCOL_KEYS
from lora2.eval.evaluate import METRICS
from lora2.eval.report import CellResult, collect, paired_tests, paired_tests_table

OUT = Path(__file__).parent / "results" / "world_defaults_cpu.json"


def pooled_cells(
    folders: list[Path], reference_cells: Sequence[CellResult] = ()
) -> tuple[list[CellResult], list[tuple[CellResult, CellResult]]]:
    """The scored cells of ``folders``, each (subject, method, seed) once: the first folder's, then
    ``reference_cells`` for the keys no folder holds; and each pair (kept, repeat) of a cell scored twice."""
    cells: dict[tuple[str, str, int], CellResult] = {}
    repeats = []
    for cell in [c for folder in folders for c in collect(folder)] + list(reference_cells):
        key = (cell.subject, cell.method, cell.seed)
        if not cell.scores:
            continue
        if key in cells:
            repeats.append((cells[key], cell))
        else:
            cells[key] = cell
    return list(cells.values()), repeats


def read_reference_cells(path: Path, method: str) -> list[CellResult]:
    """The cells of ``method`` in a ``lora2 report`` cells.json."""
    return [CellResult(**cell) for cell in json.loads(path.read_text(encoding="utf-8")) if cell["method"] == method]


def bench_settings(folder: Path) -> dict:
    """What a bench folder ran: its methods and seeds, and the settings that change results (``PROTOCOL_KEYS``)."""
    grid = json.loads((folder / "bench.json").read_text(encoding="utf-8"))
    return {key: grid.get(key) for key in ("methods", "seeds", *PROTOCOL_KEYS)}


def method_summary(cells: list[CellResult], reference: str) -> dict[str, dict]:
    """Per method: cells, mean of each metric, mean rank, mean size (GiB), and its size over the reference's on the
    (subject, seed) pairs both have."""
    sizes = {(c.subject, c.seed): c.size_gb for c in cells if c.method == reference}
    summary = {}
    for method in dict.fromkeys(c.method for c in cells):
        mine = [c for c in cells if c.method == method]
        ratios = [c.size_gb / sizes[(c.subject, c.seed)] for c in mine if c.size_gb and sizes.get((c.subject, c.seed))]
        summary[method] = {
            "cells": len(mine),
            **{metric: statistics.fmean(c.scores[metric] for c in mine) for metric in METRICS},
            "mean_rank": statistics.fmean(c.mean_rank for c in mine if c.mean_rank is not None),
            "size_gb": statistics.fmean(c.size_gb for c in mine if c.size_gb),
            "size_over_reference": statistics.fmean(ratios) if ratios else None,
        }
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--reference", default="lora2")
    parser.add_argument("--reference-cells", type=Path, help="a lora2 report cells.json with more reference cells")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    extra = read_reference_cells(args.reference_cells, args.reference) if args.reference_cells else []
    cells, repeats = pooled_cells(args.folders, extra)
    methods = [m for m in dict.fromkeys(c.method for c in cells) if m != args.reference]
    if not methods or not any(c.method == args.reference for c in cells):
        raise ValueError(f"{args.folders}: need cells of {args.reference!r} and of at least one other method")
    tests = paired_tests(cells, [(method, args.reference) for method in methods])
    result = {
        "command": " ".join(["python", "benchmarks/world_defaults.py", *sys.argv[1:]]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "folders": {str(folder): bench_settings(folder) for folder in args.folders},
        "reference": args.reference,
        "methods": method_summary(cells, args.reference),
        "tests": tests,
        # cells scored twice (the first counts): how far a cell reproduces
        "repeats": [
            {
                "subject": a.subject,
                "method": a.method,
                "seed": a.seed,
                "folders": [a.folder, b.folder],
                **{metric: [a.scores[metric], b.scores[metric]] for metric in METRICS},
            }
            for a, b in repeats
        ],
        "cells": [asdict(cell) for cell in cells],
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(paired_tests_table(tests, args.reference))


if __name__ == "__main__":
    main()
