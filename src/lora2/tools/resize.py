"""``lora2 resize``: post-hoc SVD truncation of each module with kohya's dynamic-resize criteria.

Criteria on the singular values σ_1 ≥ σ_2 ≥ … of each module's ΔW (sd-scripts networks/resize_lora.py):

- fixed:         k = param
- sv_ratio:      k = #{i : σ_i > σ_1 / param}
- sv_cumulative: smallest k with Σ_{i≤k} σ_i / Σ_i σ_i ≥ param
- sv_fro:        smallest k with √(Σ_{i≤k} σ_i² / Σ_i σ_i²) ≥ param

k is clamped to [1, current rank] (and to ``max_rank``, kohya's ``--new_rank`` hard limit); a module whose σ_1 is
below 1e-6 (a zero update) gets k = 1. The result is the best rank-k approximation: up = U_k diag(σ_k), down = V_kᵀ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lora2.export.adapter import Adapter
from lora2.export.formats import read_adapter
from lora2.tools.output import output_format, write_result
from lora2.tools.svd import lowrank_svd, truncate

METHODS = ("fixed", "sv_ratio", "sv_fro", "sv_cumulative")
MIN_SV = 1e-6


def check_resize_options(method: str, param: float, max_rank: int | None = None) -> None:
    """The criterion and its parameter (fixed: a rank >= 1; sv_ratio: >= 1; sv_fro, sv_cumulative: in (0, 1]) and
    the rank cap (an integer >= 1); ValueError naming the value."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    finite = isinstance(param, (int, float)) and math.isfinite(param)
    if method == "fixed" and not (finite and param >= 1 and param == int(param)):
        raise ValueError(f"fixed rank (--param) must be a positive integer, got {param!r}")
    if method == "sv_ratio" and not (finite and param >= 1):
        raise ValueError(f"sv_ratio (--param, σ_max / σ_min kept) must be >= 1, got {param!r}")
    if method in ("sv_fro", "sv_cumulative") and not (finite and 0 < param <= 1):
        raise ValueError(f"{method} fraction must lie in (0, 1], got {param!r} (--param)")
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank (--max-rank) must be a positive integer, got {max_rank!r}")


def new_rank(s: torch.Tensor, method: str, param: float) -> int:
    """The rank a criterion keeps for singular values ``s`` (descending)."""
    check_resize_options(method, param)
    if method == "fixed":
        rank = int(param)
    elif method == "sv_ratio":
        rank = int((s > s[0] / param).sum())
    else:
        values, target = (s, param) if method == "sv_cumulative" else (s.square(), param**2)
        fraction = torch.cumsum(values, 0) / values.sum()  # (k,)
        rank = int(torch.searchsorted(fraction, torch.tensor(target - 1e-12, dtype=fraction.dtype))) + 1
    if len(s) == 0 or s[0] <= MIN_SV:
        return 1
    return max(1, min(rank, len(s)))


def resize_adapter(
    adapter: Adapter, method: str, param: float, max_rank: int | None = None
) -> tuple[Adapter, dict[str, dict[str, dict]]]:
    """Resize every module; returns the new adapter and per module {old_rank, new_rank, fro_retained, sum_retained}."""
    check_resize_options(method, param, max_rank)
    resized: Adapter = {}
    report: dict[str, dict[str, dict]] = {}
    entries = [(c, n, m) for c, modules in adapter.items() for n, m in modules.items()]
    for component, name, module in tqdm(entries, desc="resize", disable=len(entries) < 50):
        u, s, vh = lowrank_svd(module)
        rank = new_rank(s, method, param)
        if max_rank is not None:
            rank = min(rank, max_rank)
        resized.setdefault(component, {})[name] = truncate(module, u, s, vh, rank)
        total_sq, total = s.square().sum(), s.sum()
        report.setdefault(component, {})[name] = {
            "old_rank": module.rank,
            "new_rank": rank,
            "fro_retained": float((s[:rank].square().sum() / total_sq).sqrt()) if total_sq > 0 else 1.0,
            "sum_retained": float(s[:rank].sum() / total) if total > 0 else 1.0,
        }
    return resized, report


@dataclass
class ResizeSpec:
    """What ``lora2 resize`` does (see ``resize_file``)."""

    input: str
    out: str
    method: str
    param: float
    max_rank: int | None = None
    format: str | None = None
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        check_resize_options(self.method, self.param, self.max_rank)


def resize_file(spec: ResizeSpec) -> tuple[Path, dict]:
    """Resize an adapter file; the output (input's format by default) records the new ranks in its lora2 header."""
    file = read_adapter(spec.input)
    resized, report = resize_adapter(file.adapter, spec.method, spec.param, spec.max_rank)
    step = {
        "op": "resize",
        "input": str(file.path),
        "method": spec.method,
        "param": spec.param,
        "max_rank": spec.max_rank,
    }
    written = write_result(resized, spec.out, output_format([file], spec.format), [file], step, spec.dtype)
    return written, report
