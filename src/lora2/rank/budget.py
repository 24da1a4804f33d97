"""Uniform rank allocations of a parameter budget (the iso-size baselines of a learned-rank adapter)."""

from __future__ import annotations

from collections.abc import Hashable


def uniform_ranks(
    params_per_rank: dict[Hashable, int], budget: int, max_rank: int | None = None
) -> dict[Hashable, int]:
    """Ranks r_ℓ ∈ {⌊r*⌋, ⌈r*⌉}, r* = budget / Σ_ℓ p_ℓ, with Σ_ℓ r_ℓ p_ℓ as close to ``budget`` from below as a
    greedy pass in key order gets (within max_ℓ p_ℓ of it).

    ``params_per_rank``: module (any sortable key) → p_ℓ, the parameters one unit of rank costs there (d_in + d_out
    for a linear layer).
    ``budget``: the parameter count to match (e.g. a LoRA² adapter's). Every module gets at least rank 1 and at most
    ``max_rank``. ``ValueError`` for an empty table, a non-positive cost or budget.
    """
    if not params_per_rank:
        raise ValueError("uniform_ranks needs at least one module")
    bad = {name: cost for name, cost in params_per_rank.items() if cost < 1}
    if bad:
        raise ValueError(f"parameters per unit of rank must be >= 1, got {bad}")
    if budget < 1:
        raise ValueError(f"parameter budget must be >= 1, got {budget}")
    base = max(1, budget // sum(params_per_rank.values()))
    if max_rank is not None:
        base = min(base, max_rank)
    ranks = dict.fromkeys(sorted(params_per_rank), base)
    left = budget - base * sum(params_per_rank.values())
    for name in ranks:
        if left >= params_per_rank[name] and (max_rank is None or base < max_rank):
            ranks[name] = base + 1
            left -= params_per_rank[name]
    return ranks


def parameter_count(ranks: dict[Hashable, int], params_per_rank: dict[Hashable, int]) -> int:
    """Σ_ℓ r_ℓ p_ℓ: the LoRA parameters of an allocation."""
    return sum(rank * params_per_rank[name] for name, rank in ranks.items())
