"""``lora2 inspect | merge | resize``: adapter tools on the command line (thin wrappers of ``lora2.tools``)."""

from __future__ import annotations

import argparse
import json
import logging

from lora2.export.keys import FORMATS
from lora2.tools import METHODS, MergeSpec, ResizeSpec, format_report, inspect_file, merge_files, resize_file
from lora2.tools.output import DTYPES

logger = logging.getLogger("lora2")

_OUTPUT_FORMATS = [f for f in FORMATS if f != "lora2"]


def _inspect(args: argparse.Namespace) -> int:
    report = inspect_file(args.file)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def _merge(args: argparse.Namespace) -> int:
    spec = MergeSpec(
        inputs=args.inputs,
        out=args.out,
        weights=args.weights,
        rank_budget=args.rank_budget,
        max_rank=args.max_rank,
        energy=args.energy,
        format=args.format,
        dtype=args.dtype,
    )
    written = merge_files(spec)
    logger.info("merged %d adapters into %s", len(args.inputs), written)
    return 0


def _resize(args: argparse.Namespace) -> int:
    spec = ResizeSpec(
        input=args.file,
        out=args.out,
        method=args.method,
        param=args.param,
        max_rank=args.max_rank,
        format=args.format,
        dtype=args.dtype,
    )
    written, report = resize_file(spec)
    rows = [r for modules in report.values() for r in modules.values()]
    old, new = sum(r["old_rank"] for r in rows), sum(r["new_rank"] for r in rows)
    fro = sum(r["fro_retained"] for r in rows) / max(len(rows), 1)
    logger.info(
        "resized %d modules, total rank %d → %d, mean Frobenius norm retained %.2f%%: %s",
        len(rows),
        old,
        new,
        100 * fro,
        written,
    )
    return 0


def _output_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output .safetensors file or directory (peft: directory)")
    parser.add_argument("--format", choices=_OUTPUT_FORMATS, default=None, help="output format (default: input's)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="dtype of the written weights")


def register(subparsers) -> None:
    """Add the ``inspect``, ``merge`` and ``resize`` subcommands."""
    inspect = subparsers.add_parser("inspect", help="per-module ranks, parameters and size of an adapter file")
    inspect.add_argument("file", help="adapter file or directory (diffusers, kohya, peft, lora2)")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    inspect.set_defaults(func=_inspect)

    merge = subparsers.add_parser("merge", help="exact merge of adapters of different ranks (+ SVD recompression)")
    merge.add_argument("inputs", nargs="+", help="adapter files or directories")
    merge.add_argument("--weights", nargs="+", type=float, default=None, help="one weight per input (default 1)")
    budget = merge.add_mutually_exclusive_group()
    budget.add_argument("--rank-budget", type=int, default=None, help="total rank over all modules after SVD")
    budget.add_argument("--energy", type=float, default=None, help="keep this fraction of each module's σ² energy")
    merge.add_argument("--max-rank", type=int, default=None, help="per-module rank cap after SVD")
    _output_flags(merge)
    merge.set_defaults(func=_merge)

    resize = subparsers.add_parser("resize", help="post-hoc SVD truncation (kohya's dynamic-resize criteria)")
    resize.add_argument("file", help="adapter file or directory")
    resize.add_argument("--method", choices=METHODS, required=True, help="rank criterion per module")
    resize.add_argument(
        "--param",
        type=float,
        required=True,
        help="fixed: rank; sv_ratio: σ_max/σ_min; sv_fro, sv_cumulative: fraction kept",
    )
    resize.add_argument("--max-rank", type=int, default=None, help="hard per-module rank limit")
    _output_flags(resize)
    resize.set_defaults(func=_resize)
