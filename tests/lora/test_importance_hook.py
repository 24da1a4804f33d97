"""The model-level Λ computation (one graph for all layers) equals each layer's own Λ, values and gradients."""

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import lora2
from lora2 import LoRA2Config
from lora2.lora.layer import storage_importance
from lora2.lora.model import adapters_of
from lora2.rank import importance


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.use_checkpoint = False

    def forward(self, x):  # x: (N, 8)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x)
        return self.conv(x[:, :, None, None].expand(-1, -1, 3, 3)).mean((2, 3))


def _model(scaling: str, alpha: float | None) -> Net:
    torch.manual_seed(0)
    net = Net()
    config = LoRA2Config(target_modules=r"blocks\.\d|conv", init_rank=5, lambda_scaling=scaling, lora_alpha=alpha)
    lora2.inject(net, config)
    for index, (_, layer) in enumerate(lora2.lora_layers(net)):
        with torch.no_grad():
            layer.lora_B.normal_()
            layer.log_nu.add_(0.2 * index)
        layer.set_rank(3 + 2 * index)
    return net


@pytest.mark.parametrize("scaling", ["sum", "first", "none"])
def test_storage_importance_matches_reference(scaling):
    net = _model(scaling, alpha=10.0)
    layers = [layer for _, layer in lora2.lora_layers(net)]
    for layer, lam in zip(layers, storage_importance(layers, {})):
        reference = importance(layer.nu, layer.r, scaling) * layer.scaling
        assert lam.shape == (layer.capacity,)
        assert torch.allclose(lam[: layer.r], reference, atol=1e-7) and torch.all(lam[layer.r :] == 0)


@pytest.mark.parametrize("scaling", ["sum", "first"])
@pytest.mark.parametrize("use_checkpoint", [False, True])
def test_hook_path_equals_per_layer_path(scaling, use_checkpoint):
    x = torch.randn(4, 8)
    results = []
    for remove_hook in (False, True):
        net = _model(scaling, alpha=None)
        net.use_checkpoint = use_checkpoint
        if remove_hook:
            adapters_of(net).remove()
        out = net(x)
        out.square().sum().backward()
        grads = [p.grad.clone() for p in net.parameters() if p.requires_grad]
        results.append((out.detach(), grads))
        assert all((layer.storage_lambda is None) == remove_hook for _, layer in lora2.lora_layers(net))
    (out_hook, grads_hook), (out_layer, grads_layer) = results
    assert torch.allclose(out_hook, out_layer, atol=1e-6)
    for a, b in zip(grads_hook, grads_layer):
        assert torch.allclose(a, b, atol=1e-6)


def test_hook_follows_rank_changes_and_unload_removes_it():
    net = _model("sum", alpha=None)
    x = torch.randn(2, 8)
    layer = net.blocks[0]
    layer.set_rank(7)
    expected = layer.base_layer(x) + x @ layer.get_delta_weight().T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    net(x)  # through the hook, with the new layout
    with torch.no_grad():
        layer.log_nu.add_(0.5)  # an optimizer step: the stored Λ is stale and must not be used
    expected = layer.base_layer(x) + x @ layer.get_delta_weight().T
    assert torch.allclose(layer(x), expected, atol=1e-6)
    lora2.unload(net)
    assert adapters_of(net) is None and not net._forward_pre_hooks


@pytest.mark.parametrize("separate", [False, True])
def test_regularization_shares_nu_with_the_forward_and_survives_its_backward(separate):
    # The hook's stacked ν is reused by the rank regularization; after the forward's backward it must not be reused
    # (its graph is freed), so "loss.backward(); regularization(net).backward()" works and gives the same gradients.
    net = _model("first", alpha=None)
    x = torch.randn(4, 8)
    out = net(x).square().sum()
    if separate:
        out.backward()
        assert adapters_of(net).current_nu() is None
        lora2.regularization(net).backward()
    else:
        assert adapters_of(net).current_nu() is not None
        (out + lora2.regularization(net)).backward()
    grads = [p.grad.clone() for p in net.parameters() if p.requires_grad]
    reference = _model("first", alpha=None)
    adapters_of(reference).remove()
    (reference(x).square().sum() + lora2.regularization(reference)).backward()
    for a, b in zip(grads, (p.grad for p in reference.parameters() if p.requires_grad)):
        assert torch.allclose(a, b, atol=1e-6)
