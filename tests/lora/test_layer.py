import pytest
import torch
from torch import nn

import lora2
from lora2 import LoRA2Config
from lora2.lora.layer import LoRA2Layer


def _perturb(layer: LoRA2Layer) -> None:
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.log_nu.add_(0.3)


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("conv", [False, True])
def test_identity_at_init_then_merge_equals_forward(adaptive, conv):
    torch.manual_seed(0)
    base = nn.Conv2d(6, 5, 3, padding=1, stride=2) if conv else nn.Linear(6, 5)
    x = torch.randn(2, 6, 9, 9) if conv else torch.randn(3, 6)
    reference = base(x)
    layer = LoRA2Layer(base, LoRA2Config(init_rank=3, max_rank=8, adaptive=adaptive), rank=3, name="m")
    assert torch.equal(layer(x), reference)
    _perturb(layer)
    out = layer(x)
    assert not torch.allclose(out, reference, atol=1e-3)
    # ΔW reproduces the forward: base weight + ΔW in a plain module
    layer.merge()
    assert torch.allclose(layer(x), out, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.base_layer(x), reference, atol=1e-5)


def test_export_weights_reproduce_delta():
    torch.manual_seed(0)
    layer = LoRA2Layer(nn.Linear(7, 4), LoRA2Config(init_rank=5, lora_alpha=10.0), rank=5)
    _perturb(layer)
    down, up = layer.export_weights()
    assert down.shape == (5, 7) and up.shape == (4, 5)
    assert torch.allclose(up @ down, layer.get_delta_weight(), atol=1e-6)


def test_fixed_rank_layer_equals_plain_lora():
    torch.manual_seed(0)
    layer = LoRA2Layer(nn.Linear(8, 8), LoRA2Config(adaptive=False, init_rank=4, lora_alpha=8.0), rank=4)
    _perturb(layer)
    assert not layer.log_nu.requires_grad
    x = torch.randn(2, 8)
    plain = layer.base_layer(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * (8.0 / 4)
    assert torch.allclose(layer(x), plain, atol=1e-5)


def test_set_rank_keeps_function_when_growing_and_truncates_when_shrinking():
    torch.manual_seed(0)
    config = LoRA2Config(init_rank=3, max_rank=64, chunk_size=4, lambda_scaling="first")
    layer = LoRA2Layer(nn.Linear(8, 8), config, rank=3)
    _perturb(layer)
    x = torch.randn(2, 8)
    before = layer(x)
    replaced, grown = layer.set_rank(10)
    assert layer.r == 10 and layer.capacity == 12 and set(replaced) == {"lora_A", "lora_B"}
    assert list(grown) == list(range(3, 10))
    # new B columns are zero and "first" does not renormalise: the function is unchanged
    assert torch.allclose(layer(x), before, atol=1e-6)
    layer.set_rank(9)
    assert layer.capacity == 12  # one spare chunk is kept (hysteresis)
    layer.set_rank(2)
    assert layer.capacity == 4
    with pytest.raises(ValueError, match="rank must lie"):
        layer.set_rank(65)


def test_growth_under_sum_scaling_only_renormalises():
    torch.manual_seed(0)
    layer = LoRA2Layer(nn.Linear(8, 8), LoRA2Config(init_rank=16, max_rank=64, lambda_scaling="sum"), rank=16)
    _perturb(layer)
    delta = layer.get_delta_weight()
    mass_before = 1 - torch.exp(-layer.nu * 16)  # F(16): the normalising constant
    layer.set_rank(24)
    mass_after = 1 - torch.exp(-layer.nu * 24)
    # existing positions are rescaled by F(D_old)/F(D_new), new positions add nothing
    assert torch.allclose(layer.get_delta_weight(), delta * mass_before / mass_after, atol=1e-6)


def test_unsupported_modules_are_refused():
    with pytest.raises(ValueError, match="grouped"):
        LoRA2Layer(nn.Conv2d(4, 4, 3, groups=2), LoRA2Config(), rank=2, name="conv")
    with pytest.raises(ValueError, match="only nn.Linear"):
        LoRA2Layer(nn.LayerNorm(4), LoRA2Config(), rank=2, name="norm")


def test_bf16_autocast_and_half_base():
    torch.manual_seed(0)
    base = nn.Linear(16, 16).to(torch.bfloat16)
    layer = LoRA2Layer(base, LoRA2Config(init_rank=4), rank=4)
    _perturb(layer)
    x = torch.randn(2, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and layer.lora_A.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x.float()).dtype == torch.bfloat16
    expected = base(x).float() + x.float() @ layer.get_delta_weight().T
    assert torch.allclose(out.float(), expected, atol=0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"quantile": 1.0}, "quantile"),
        ({"quantile": 0.0}, "quantile"),
        ({"max_rank": 0}, "max_rank"),
        ({"init_rank": 600}, "init_rank"),
        ({"lambda_scaling": "max"}, "lambda_scaling"),
        ({"target_modules": []}, "target_modules"),
        ({"rank_reg_weight": -1.0}, "rank_reg_weight"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRA2Config(**kwargs)


def test_config_round_trips_and_rejects_unknown_keys():
    config = LoRA2Config(init_rank=4, rank_pattern={"to_k": 2})
    assert LoRA2Config.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="unknown"):
        LoRA2Config.from_dict({"rnak": 3})
    assert config.rank_for("a.attn1.to_k") == 2 and config.rank_for("a.attn1.to_q") == 4


def test_lora2_exports_layer():
    assert lora2.LoRA2Layer is LoRA2Layer
