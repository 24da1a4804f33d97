"""Uniform rank allocations of a parameter budget: the iso-size baselines' ranks."""

from __future__ import annotations

import pytest

from lora2.rank.budget import parameter_count, uniform_ranks

COSTS = {"down.to_q": 192, "down.to_k": 256, "mid.to_v": 320, "up.to_out.0": 192, "up.to_q": 128}


@pytest.mark.parametrize("budget", [640, 1000, 5123, 20000, 77777])
def test_uniform_ranks_stay_within_one_and_just_under_the_budget(budget):
    ranks = uniform_ranks(COSTS, budget)
    assert max(ranks.values()) - min(ranks.values()) <= 1
    spent = parameter_count(ranks, COSTS)
    assert spent <= budget or min(ranks.values()) == 1  # rank 1 everywhere may exceed a tiny budget
    assert budget - spent < max(COSTS.values())


def test_an_exact_multiple_is_matched_exactly():
    assert uniform_ranks(COSTS, 7 * sum(COSTS.values())) == dict.fromkeys(sorted(COSTS), 7)


def test_max_rank_caps_the_allocation():
    assert set(uniform_ranks(COSTS, 10**9, max_rank=16).values()) == {16}


@pytest.mark.parametrize("costs, budget", [({}, 10), ({"a": 0}, 10), ({"a": 4}, 0)])
def test_bad_input_is_a_value_error(costs, budget):
    with pytest.raises(ValueError):
        uniform_ranks(costs, budget)
