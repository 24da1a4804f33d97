import math

import pytest
import torch

from lora2.rank import (
    discretized_exponential,
    effective_rank,
    effective_rank_tensor,
    importance,
    nu_for_rank,
    nu_target,
)


@pytest.mark.parametrize("nu", [1e-4, 0.01, 0.3, 2.0])
def test_discretized_exponential_is_a_decreasing_pmf(nu):
    f = discretized_exponential(torch.tensor(nu, dtype=torch.float64), 2000)
    positive = f[f > 0]
    assert torch.all(positive[1:] < positive[:-1]) and len(positive) > 100
    # the mass of the first n positions is the CDF F(n) = 1 − e^{−νn}
    assert f[:100].sum().item() == pytest.approx(1 - math.exp(-nu * 100), rel=1e-9)


def test_effective_rank_is_the_quantile():
    q = 0.9
    for nu in [0.001, 0.0123, 0.5, 3.0]:
        d = effective_rank(nu, q, max_rank=10_000)
        # D is the smallest integer with F(D) >= q
        assert 1 - math.exp(-nu * d) >= q - 1e-9
        assert d == 1 or 1 - math.exp(-nu * (d - 1)) < q


@pytest.mark.parametrize("rank", [1, 2, 7, 64, 511, 512])
def test_nu_for_rank_round_trips(rank):
    assert effective_rank(nu_for_rank(rank, 0.9), 0.9, 512) == rank


def test_nu_target_gives_target_rank():
    assert effective_rank(nu_target(64, 0.9), 0.9, 512) == 64
    assert nu_target(64, 0.9) == pytest.approx(-math.log(0.1) / 64)


def test_effective_rank_clamps_and_vectorises():
    nu = torch.tensor([1e-9, 10.0, nu_for_rank(33, 0.8)])
    assert effective_rank_tensor(nu, 0.8, 512).tolist() == [512, 1, 33]
    assert effective_rank(1e-9, 0.8, 512) == 512


def test_rank_decreases_with_nu():
    values = [effective_rank(nu, 0.9, 512) for nu in torch.logspace(-3, 1, 50).tolist()]
    assert values == sorted(values, reverse=True)


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_quantile_outside_unit_interval_is_refused(bad):
    with pytest.raises(ValueError, match="quantile"):
        effective_rank(0.1, bad, 8)
    with pytest.raises(ValueError, match="quantile"):
        nu_target(8, bad)


def test_max_rank_below_one_is_refused():
    with pytest.raises(ValueError, match="max_rank"):
        effective_rank(0.1, 0.9, 0)


def test_importance_scalings():
    nu = torch.tensor(0.2)
    first = importance(nu, 10, "first")
    assert first[0].item() == 1.0 and torch.all(first[1:] < first[:-1])
    assert importance(nu, 10, "sum").sum().item() == pytest.approx(1.0)
    assert torch.allclose(importance(nu, 10, "none"), discretized_exponential(nu, 10))
    # all three differ only by a positive factor
    assert torch.allclose(importance(nu, 10, "none") / importance(nu, 10, "none")[0], first)
    with pytest.raises(ValueError, match="lambda_scaling"):
        importance(nu, 10, "max")


def test_importance_is_differentiable_in_nu():
    log_nu = torch.tensor(-2.0, requires_grad=True)
    importance(log_nu.exp(), 8, "sum")[-1].backward()
    assert log_nu.grad is not None and log_nu.grad.item() != 0.0
