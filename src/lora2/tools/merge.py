"""``lora2 merge``: exact merging of adapters with different ranks, and optional SVD recompression.

Rank concatenation: for adapters i with weights w_i, per module

    down = [down_1; down_2; …]   (Σ r_i × d_in),    up = [w_1 s_1 up_1, w_2 s_2 up_2, …]   (d_out × Σ r_i)

so up @ down = Σ_i w_i s_i up_i down_i = Σ_i w_i ΔW_i exactly. A module present in only some adapters keeps the
terms of those. Recompression then truncates each merged ΔW by SVD (``recompress``).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from lora2.export.adapter import Adapter, LoraModule
from lora2.export.formats import read_adapter
from lora2.export.names import underscore
from lora2.tools.output import input_layout, output_format, write_result
from lora2.tools.svd import lowrank_svd, truncate


def check_weights(weights: Sequence[float], count: int) -> None:
    """One finite weight per adapter, else ValueError naming the value."""
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} adapters")
    for index, weight in enumerate(weights):
        if not math.isfinite(weight):
            raise ValueError(f"weight {index + 1} of --weights must be a finite number, got {weight!r}")


def check_rank_options(rank_budget: int | None, max_rank: int | None, energy: float | None) -> None:
    """The recompression settings: ranks are integers >= 1, energy lies in (0, 1]; ValueError naming the value."""
    for name, value in (("rank_budget (--rank-budget)", rank_budget), ("max_rank (--max-rank)", max_rank)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must lie in (0, 1] (--energy), got {energy!r}")


def merge_adapters(
    adapters: Sequence[Adapter], weights: Sequence[float] | None = None, names: Sequence[str] | None = None
) -> Adapter:
    """Exact merge Σ_i w_i ΔW_i by rank concatenation (weights default to 1).

    Modules are matched per component by name, dots and underscores alike (a kohya file and a diffusers file of
    the same model match). Raises ValueError when a module's shapes differ between adapters, naming the adapter by
    ``names`` (e.g. its file) or its index.
    """
    if not adapters:
        raise ValueError("merge needs at least one adapter")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    check_weights(weights, len(adapters))
    names = list(names) if names is not None else [f"adapter {index}" for index in range(len(adapters))]
    terms: dict[tuple[str, str], list[tuple[str, LoraModule, float]]] = {}
    for index, (adapter, weight) in enumerate(zip(adapters, weights)):
        for component, modules in adapter.items():
            for name, module in modules.items():
                terms.setdefault((component, underscore(name)), []).append((name, module, weight))
                first = terms[(component, underscore(name))][0][1]
                if first.down.shape[1:] != module.down.shape[1:] or first.out_features != module.out_features:
                    raise ValueError(
                        f"{names[index]}: module {name!r} of {component!r} has shapes down "
                        f"{tuple(module.down.shape)}, up {tuple(module.up.shape)}, which do not match "
                        f"{tuple(first.down.shape)}, {tuple(first.up.shape)} of an earlier adapter"
                    )
    merged: Adapter = {}
    for (component, _), parts in terms.items():
        name = next((n for n, _, _ in parts if "." in n), parts[0][0])  # prefer the dotted spelling
        dtype = parts[0][1].down.dtype
        down = torch.cat([m.down.to(dtype) for _, m, _ in parts], dim=0)  # (Σ r_i, d_in[, kh, kw])
        up = torch.cat([(m.up.double() * (m.scale * w)).to(dtype) for _, m, w in parts], dim=1)  # (d_out, Σ r_i[,1,1])
        merged.setdefault(component, {})[name] = LoraModule(down, up)
    return merged


def recompress(
    adapter: Adapter, rank_budget: int | None = None, max_rank: int | None = None, energy: float | None = None
) -> Adapter:
    """Truncate every module's ΔW by SVD (best approximation in Frobenius norm, Eckart–Young).

    energy: per module, the smallest k with Σ_{i≤k} σ_i² ≥ energy · Σ_i σ_i².
    max_rank: per-module cap.
    rank_budget: total rank over all modules, at least one per module; the k's minimise the total squared error
        Σ_modules Σ_{i>k} σ_i², i.e. keep the globally largest singular values.
    """
    check_rank_options(rank_budget, max_rank, energy)
    entries = [(c, n, m) for c, modules in adapter.items() for n, m in modules.items()]
    if rank_budget is not None and rank_budget < len(entries):
        raise ValueError(f"rank_budget {rank_budget} is below one rank per module ({len(entries)} modules)")
    svds = [lowrank_svd(m) for _, _, m in tqdm(entries, desc="SVD", disable=len(entries) < 50)]
    keep = []
    for _, s, _ in svds:
        k = len(s)
        if energy is not None:
            fraction = torch.cumsum(s.square(), 0) / s.square().sum().clamp_min(1e-300)  # (k,)
            k = int(torch.searchsorted(fraction, torch.tensor(energy, dtype=fraction.dtype) - 1e-12)) + 1
        if max_rank is not None:
            k = min(k, max_rank)
        keep.append(max(1, min(k, len(s))))
    if rank_budget is not None and sum(keep) > rank_budget:
        keep = _allocate(svds, keep, rank_budget)
    result: Adapter = {}
    for (component, name, module), (u, s, vh), k in zip(entries, svds, keep):
        result.setdefault(component, {})[name] = truncate(module, u, s, vh, k)
    return result


def _allocate(svds: list, caps: list[int], budget: int) -> list[int]:
    """One rank per module, then the largest remaining σ² anywhere (within each module's cap) until the budget."""
    keep = [1] * len(svds)
    heap = [(-(float(s[1]) ** 2), i) for i, (_, s, _) in enumerate(svds) if caps[i] > 1]
    heapq.heapify(heap)
    for _ in range(budget - len(svds)):
        if not heap:
            break
        _, i = heapq.heappop(heap)
        keep[i] += 1
        s = svds[i][1]
        if keep[i] < caps[i]:
            heapq.heappush(heap, (-(float(s[keep[i]]) ** 2), i))
    return keep


@dataclass
class MergeSpec:
    """What ``lora2 merge`` does (see ``merge_files``)."""

    inputs: list[str]
    out: str
    weights: list[float] | None = None
    rank_budget: int | None = None
    max_rank: int | None = None
    energy: float | None = None
    format: str | None = None
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if not self.inputs:
            raise ValueError("merge needs at least one input")
        if self.weights is not None:
            check_weights([float(w) for w in self.weights], len(self.inputs))
        check_rank_options(self.rank_budget, self.max_rank, self.energy)


def merge_files(spec: MergeSpec) -> Path:
    """Read the inputs, merge exactly, recompress if asked, write ``spec.out`` (input's format by default)."""
    files = [read_adapter(path) for path in spec.inputs]
    input_layout(files)  # inputs of different UNets: refused before any work
    merged = merge_adapters([f.adapter for f in files], spec.weights, [str(f.path) for f in files])
    if spec.rank_budget is not None or spec.max_rank is not None or spec.energy is not None:
        merged = recompress(merged, spec.rank_budget, spec.max_rank, spec.energy)
    step = {
        "op": "merge",
        "inputs": [str(f.path) for f in files],
        "weights": spec.weights,
        "rank_budget": spec.rank_budget,
        "max_rank": spec.max_rank,
        "energy": spec.energy,
    }
    return write_result(merged, spec.out, output_format(files, spec.format), files, step, spec.dtype)
