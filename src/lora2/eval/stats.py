"""Paired tests for method comparisons over (subject, seed) pairs, and Holm's correction for a family of them."""

from __future__ import annotations

import numpy as np

EXACT_MAX_PAIRS = 20  # up to 2**20 sign patterns are enumerated; beyond, a fixed-seed Monte Carlo sample
MONTE_CARLO_DRAWS = 200_000


def sign_flip_p(differences: list[float], seed: int = 0) -> float:
    """Two-sided p of the paired sign-flip permutation test of mean(d) = 0 (Fisher 1935; Good 2005, §3.1).

    Under the null each paired difference d_i is as likely to be −d_i, so p = P(|mean(±d)| ≥ |mean(d)|) over the
    2^n sign patterns: enumerated for n ≤ ``EXACT_MAX_PAIRS``, else estimated from ``MONTE_CARLO_DRAWS`` patterns
    drawn with ``seed`` (the observed pattern counted once, so p > 0). ``ValueError`` for no pairs.
    """
    d = np.asarray(differences, dtype=np.float64)  # (n,)
    if d.size == 0:
        raise ValueError("sign_flip_p needs at least one paired difference")
    observed = abs(d.mean()) * (1 - 1e-12)  # ties with the observed statistic count as extreme
    if d.size <= EXACT_MAX_PAIRS:
        patterns = np.arange(2**d.size)[:, None] >> np.arange(d.size) & 1  # (2^n, n) bits
        means = np.abs(((1 - 2 * patterns) * d).mean(axis=1))  # (2^n,)
        return float((means >= observed).mean())
    signs = np.random.default_rng(seed).choice((-1.0, 1.0), size=(MONTE_CARLO_DRAWS, d.size))  # (draws, n)
    extreme = int((np.abs((signs * d).mean(axis=1)) >= observed).sum())
    return (extreme + 1) / (MONTE_CARLO_DRAWS + 1)


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the input order: the k-th smallest of m gets
    max_{j≤k} min(1, (m − j + 1) · p_(j)); rejecting adjusted p < α controls the family-wise error at α."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for position, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - position) * p_values[index]))
        adjusted[index] = running
    return adjusted
