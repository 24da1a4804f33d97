"""Paired sign-flip test and Holm's correction: exact values on small cases, properties on random ones."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from lora2.eval.stats import holm, sign_flip_p


def test_all_differences_of_one_sign_give_the_two_extreme_patterns():
    assert sign_flip_p([0.1, 0.2, 0.05, 0.3, 0.1, 0.2, 0.1, 0.4, 0.2, 0.3]) == pytest.approx(2 / 1024)


def test_exact_p_against_brute_force_enumeration():
    d = np.random.default_rng(1).normal(0.02, 0.05, size=9)
    means = [abs(np.mean(np.array(signs) * d)) for signs in itertools.product((-1, 1), repeat=9)]
    expected = np.mean([m >= abs(d.mean()) * (1 - 1e-12) for m in means])
    assert sign_flip_p(list(d)) == pytest.approx(expected)


def test_p_is_symmetric_and_monte_carlo_agrees_with_exact_for_large_n():
    d = list(np.random.default_rng(2).normal(0.01, 0.05, size=24))
    assert sign_flip_p(d) == pytest.approx(sign_flip_p([-x for x in d]))
    assert 0.0 < sign_flip_p(d) <= 1.0
    assert sign_flip_p([0.0, 0.0, 0.0]) == 1.0
    with pytest.raises(ValueError):
        sign_flip_p([])


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    p = list(np.random.default_rng(3).uniform(size=12))
    adjusted = holm(p)
    assert all(a >= raw for a, raw in zip(adjusted, p)) and max(adjusted) <= 1.0
    order = np.argsort(p)
    assert all(np.diff(np.array(adjusted)[order]) >= 0)  # monotone in the raw p
