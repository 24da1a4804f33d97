"""Rank math of LoRA² (Shenaj, Errica, Carta, arXiv 2603.21884) and AWNN (Errica et al.).

Notation: ν > 0 is the rate of an exponential distribution over rank positions i = 1, 2, …;
q is the quantile that defines the effective rank D.
"""

from __future__ import annotations

import math

import torch

SCALINGS = ("none", "sum", "first")


def discretized_exponential(nu: torch.Tensor, length: int) -> torch.Tensor:
    """f(i; ν) = F(i) − F(i−1) = e^{−ν(i−1)} − e^{−νi} for i = 1..length (LoRA² eq. for Λ).

    Differentiable in ν. Computed as e^{−ν(i−1)}·(1 − e^{−ν}) with expm1 so that small ν keeps precision.
    """
    positions = torch.arange(length, device=nu.device, dtype=nu.dtype)  # (length,), i − 1
    return torch.exp(-nu * positions) * (-torch.expm1(-nu))  # (length,)


def importance(nu: torch.Tensor, length: int, scaling: str = "first") -> torch.Tensor:
    """The diagonal of Λ over the first `length` positions, under a normalisation choice.

    - "none":  λ_i = f(i; ν)                          (the paper's Λ as written)
    - "sum":   λ_i = f(i; ν) / Σ_{j≤length} f(j; ν)   (AWNN: renormalised over the truncated support)
    - "first": λ_i = f(i; ν) / f(1; ν) = e^{−ν(i−1)}   (first position has weight 1)

    Since f(i; ν) = e^{−ν(i−1)}·(1 − e^{−ν}), "sum" is softmax(−ν·(i−1)).
    """
    positions = torch.arange(length, device=nu.device, dtype=nu.dtype)  # (length,), i − 1
    logits = positions * -nu  # (length,)
    if scaling == "sum":
        return torch.softmax(logits, dim=0)
    if scaling == "first":
        return logits.exp()
    if scaling == "none":
        return logits.exp() * -torch.expm1(-nu)
    raise ValueError(f"lambda_scaling must be one of {SCALINGS}, got {scaling!r}")


def _check_quantile(quantile: float) -> None:
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile q must lie in (0, 1), got {quantile!r}")


def effective_rank(nu: float, quantile: float, max_rank: int) -> int:
    """D = ⌈−ln(1−q)/ν⌉ clamped to [1, max_rank]: the q-quantile of Exp(ν) (LoRA² effective rank)."""
    _check_quantile(quantile)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank!r}")
    if not nu > 0:
        raise ValueError(f"nu must be > 0, got {nu!r}")
    raw = -math.log1p(-quantile) / nu
    if raw >= max_rank:
        return max_rank
    # a tiny tolerance keeps D stable when ν was set exactly from nu_for_rank (round-off around integers)
    return max(1, math.ceil(raw - 1e-6))


def effective_rank_tensor(
    nu: torch.Tensor, quantile: float | torch.Tensor, max_rank: int | torch.Tensor
) -> torch.Tensor:
    """Vectorised `effective_rank` for many components at once (one device→host sync for all).

    ``quantile`` and ``max_rank`` may be scalars or tensors shaped like ``nu`` (one per component).
    """
    quantile = torch.as_tensor(quantile, dtype=torch.float64, device=nu.device)
    max_rank = torch.as_tensor(max_rank, dtype=torch.float64, device=nu.device)
    raw = -torch.log1p(-quantile) / nu.double()  # (L,)
    return torch.minimum(torch.ceil(raw - 1e-6).clamp(min=1), max_rank).long()


def nu_target(target_rank: float, quantile: float) -> float:
    """ν_target = −ln(1−q)/r_target: the ν whose q-quantile is r_target (LoRA² rank regularization)."""
    _check_quantile(quantile)
    if not target_rank > 0:
        raise ValueError(f"target_rank must be > 0, got {target_rank!r}")
    return -math.log1p(-quantile) / target_rank


def nu_for_rank(rank: int, quantile: float) -> float:
    """The ν at the middle of the interval that gives effective rank exactly `rank` (an initial ν)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank!r}")
    # D = rank for −ln(1−q)/ν in (rank−1, rank]; aim at rank − 0.5 (or 0.5·1 for rank 1 it stays at D = 1)
    return nu_target(rank - 0.5, quantile)
