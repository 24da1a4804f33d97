import pytest
import torch
from torch import nn

import lora2
from lora2 import LoRA2Config


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = nn.Linear(8, 8)
        self.to_k = nn.Linear(8, 8)
        self.to_out = nn.ModuleList([nn.Linear(8, 8), nn.Dropout(0.0)])
        self.proj_in = nn.Conv2d(8, 8, 1)

    def forward(self, x):  # x: (N, 8)
        h = self.proj_in(x[:, :, None, None])[:, :, 0, 0]
        return self.to_out[0](self.to_q(h) * torch.sigmoid(self.to_k(h)))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block())


def test_identity_at_init_and_names():
    model = _model()
    x = torch.randn(4, 8)
    reference = model(x)
    lora2.inject(model, LoRA2Config(target_modules=["to_q", "to_k", "to_out.0", "proj_in"], init_rank=2))
    assert torch.equal(model(x), reference)
    assert sorted(lora2.ranks(model)) == sorted(
        f"{b}.{m}" for b in "01" for m in ["to_q", "to_k", "to_out.0", "proj_in"]
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.rsplit(".", 1)[-1] in {"lora_A", "lora_B", "log_nu"} for n in trainable)


def test_regex_targets_and_rank_pattern():
    model = _model()
    lora2.inject(model, LoRA2Config(target_modules=r"0\.to_(q|k)", rank_pattern={"to_k": 5}, init_rank=3))
    assert lora2.ranks(model) == {"0.to_q": 3, "0.to_k": 5}


def test_target_that_matches_nothing_is_refused():
    with pytest.raises(ValueError, match="match no module"):
        lora2.inject(_model(), LoRA2Config(target_modules=["to_v"]))


def test_target_of_wrong_type_is_refused():
    with pytest.raises(ValueError, match="only nn.Linear"):
        lora2.inject(_model(), LoRA2Config(target_modules=["to_out"]))


def test_double_injection_is_refused():
    model = lora2.inject(_model(), LoRA2Config())
    with pytest.raises(ValueError, match="already"):
        lora2.inject(model, LoRA2Config())


def test_merge_and_unload_equals_adapted_model():
    model = _model()
    x = torch.randn(4, 8)
    reference = model(x)
    lora2.inject(model, LoRA2Config(target_modules=["to_q", "proj_in"], init_rank=3))
    for _, layer in lora2.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B)
    adapted = model(x)
    assert not torch.allclose(adapted, reference, atol=1e-3)
    lora2.merge(model)
    assert torch.allclose(model(x), adapted, atol=1e-5)
    lora2.unmerge(model)
    assert torch.allclose(model(x), adapted, atol=1e-5)
    merged = lora2.merge_and_unload(model)
    assert not any(True for _ in lora2.lora_layers(merged))
    assert torch.allclose(merged(x), adapted, atol=1e-5)


def test_unload_restores_base():
    model = _model()
    x = torch.randn(4, 8)
    reference = model(x)
    lora2.inject(model, LoRA2Config(target_modules=["to_q"], init_rank=3))
    for _, layer in lora2.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B)
    lora2.merge(model)
    lora2.unload(model)
    assert torch.allclose(model(x), reference, atol=1e-5)


def test_regularization_terms():
    model = lora2.inject(_model(), LoRA2Config(target_modules=["to_q"], init_rank=4, rank_reg_weight=1.0))
    config = next(lora2.lora_layers(model))[1].config
    expected = sum(abs(layer.nu.item() - config.nu_target) for _, layer in lora2.lora_layers(model))
    assert lora2.regularization(model).item() == pytest.approx(expected, rel=1e-5)
    off = lora2.inject(_model(), LoRA2Config(target_modules=["to_q"], rank_reg_weight=0.0))
    assert lora2.regularization(off).item() == 0.0
    with pytest.raises(ValueError, match="no LoRA"):
        lora2.regularization(_model())


def test_weight_prior_counts_active_positions_only():
    assert LoRA2Config().weight_reg_weight == 0.0  # off by default (docs/DESIGN.md)
    with pytest.raises(ValueError, match="weight_reg_weight must be >= 0, got -1"):
        LoRA2Config(weight_reg_weight=-1.0)
    weight = 0.5
    config = LoRA2Config(
        target_modules=["to_q", "to_out.0"], init_rank=4, chunk_size=4, rank_reg_weight=0.0, weight_reg_weight=weight
    )
    model = lora2.inject(_model(), config)
    layers = [layer for _, layer in lora2.lora_layers(model)]
    for index, layer in enumerate(layers):  # perturb, and leave positions beyond D in the storage
        torch.nn.init.normal_(layer.lora_B)
        layer.set_rank(1 + index)
    assert [layer.capacity for layer in layers] == [4, 4, 4, 4]  # D = 1, 2, 3, 4
    expected = sum(
        0.5 * (layer.lora_A[: layer.r].square().sum() + layer.active_b().square().sum()) for layer in layers
    )
    expected.backward()
    reference = [(layer.lora_A.grad.clone(), layer.lora_B.grad.clone()) for layer in layers]
    model.zero_grad(set_to_none=True)
    value = lora2.regularization(model)
    assert value.item() == pytest.approx(weight * expected.item(), rel=1e-6)
    value.backward()
    for layer, (grad_a, grad_b) in zip(layers, reference):
        torch.testing.assert_close(layer.lora_A.grad, weight * grad_a, rtol=1e-6, atol=0)
        torch.testing.assert_close(layer.lora_B.grad, weight * grad_b, rtol=1e-6, atol=0)
        assert not layer.lora_A.grad[layer.r :].any() and not layer.lora_B.grad[:, layer.r :].any()


def test_adapter_parameter_count_follows_rank():
    model = lora2.inject(_model(), LoRA2Config(target_modules=["to_q"], init_rank=4))
    assert lora2.adapter_parameter_count(model) == 2 * 4 * (8 + 8)
