"""Adapter tools over files of any format: inspect, exact mixed-rank merge (+ SVD recompression), SVD resize."""

from lora2.tools.inspect import format_report, inspect_file, summarize
from lora2.tools.merge import MergeSpec, merge_adapters, merge_files, recompress
from lora2.tools.resize import METHODS, ResizeSpec, new_rank, resize_adapter, resize_file

__all__ = [
    "METHODS",
    "MergeSpec",
    "ResizeSpec",
    "format_report",
    "inspect_file",
    "merge_adapters",
    "merge_files",
    "new_rank",
    "recompress",
    "resize_adapter",
    "resize_file",
    "summarize",
]
