"""Functions over a whole model holding LoRA² layers: ranks, rank updates, regularization, merging."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from lora2.lora.layer import LoRA2Layer, storage_importance
from lora2.rank.math import effective_rank_tensor


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRA2Layer]]:
    """(name, layer) for every LoRA² layer, with names of the wrapped modules (as before injection)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRA2Layer):
            yield name, module


def ranks(model: nn.Module) -> dict[str, int]:
    """Current effective rank D of every adapted module, keyed by module name."""
    return {name: layer.r for name, layer in lora_layers(model)}


class ImportanceHook:
    """Computes s·Λ of every adaptive layer of a model once per forward, in a few kernels for all layers.

    Installed by ``lora2.inject`` as a forward pre-hook on the injected model; nothing to call. A layer uses the
    result while its ν and D are unchanged (so gradient checkpointing's recomputation in the backward sees the
    same tensors), and otherwise computes its own Λ, with the same values.
    """

    def __init__(self, model: nn.Module) -> None:
        self.groups: dict[str, list[LoRA2Layer]] = {}
        for _, layer in lora_layers(model):
            if layer.adaptive:
                self.groups.setdefault(layer.config.lambda_scaling, []).append(layer)
        self.caches: dict[str, dict] = {scaling: {} for scaling in self.groups}
        self.handle = model.register_forward_pre_hook(self.before)

    def before(self, module: nn.Module, args) -> None:
        for scaling, layers in self.groups.items():
            for layer, lam in zip(layers, storage_importance(layers, self.caches[scaling])):
                layer.storage_lambda = lam
                layer.storage_lambda_version = layer.log_nu._version

    def remove(self) -> None:
        self.handle.remove()
        for layers in self.groups.values():
            for layer in layers:
                layer.storage_lambda = None


def update_ranks(layers: list[LoRA2Layer]) -> list[tuple[LoRA2Layer, dict, range]]:
    """Recompute D from ν for every adaptive layer (one device→host sync) and resize those that changed.

    Returns (layer, replaced parameters, new positions) for each layer whose rank changed.
    """
    adaptive = [layer for layer in layers if layer.adaptive]
    if not adaptive:
        return []
    with torch.no_grad():
        device = adaptive[0].log_nu.device
        nu = torch.stack([layer.log_nu.detach() for layer in adaptive]).double().exp()  # (L,), one cast
        quantile = torch.tensor([layer.config.quantile for layer in adaptive], device=device)  # (L,)
        max_rank = torch.tensor([layer.config.max_rank for layer in adaptive], device=device)  # (L,)
        new_ranks = effective_rank_tensor(nu, quantile, max_rank).tolist()
    changed = []
    for layer, rank in zip(adaptive, new_ranks):
        if rank != layer.r:
            replaced, grown = layer.set_rank(rank)
            changed.append((layer, replaced, grown))
    return changed


def rank_regularization(model: nn.Module) -> torch.Tensor:
    """L_reg = Σ_ℓ |ν_ℓ − ν_target| over adaptive layers (LoRA², L1 reading), vectorised over layers."""
    adaptive = [layer for _, layer in lora_layers(model) if layer.adaptive]
    if not adaptive:
        return torch.zeros(())
    nu = torch.stack([layer.log_nu for layer in adaptive]).exp()  # (L,)
    targets = {layer.config.nu_target for layer in adaptive}
    if len(targets) == 1:
        return (nu - targets.pop()).abs().sum()
    target = torch.tensor([layer.config.nu_target for layer in adaptive], device=nu.device)  # (L,)
    return (nu - target).abs().sum()


def weight_regularization(model: nn.Module) -> torch.Tensor:
    """Gaussian prior Σθ²/2 over the active LoRA weights (AWNN's weight prior with σ = 1)."""
    terms = [
        0.5 * (layer.lora_A[: layer.r].square().sum() + layer.active_b().square().sum())
        for _, layer in lora_layers(model)
    ]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def regularization(model: nn.Module) -> torch.Tensor:
    """λ_r · L_reg + λ_w · Σθ²/2, with the weights of the model's LoRA2Config (0 when both are off)."""
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("model holds no LoRA² layers: call lora2.inject(model, config) first")
    config = layers[0].config
    total = torch.zeros((), device=layers[0].lora_A.device)
    if config.rank_reg_weight > 0:
        total = total + config.rank_reg_weight * rank_regularization(model)
    if config.weight_reg_weight > 0:
        total = total + config.weight_reg_weight * weight_regularization(model)
    return total


def merge(model: nn.Module) -> None:
    """Merge every adapter into its base weight (the model computes the same, faster)."""
    for _, layer in lora_layers(model):
        layer.merge()


def unmerge(model: nn.Module) -> None:
    """Undo ``merge``."""
    for _, layer in lora_layers(model):
        layer.unmerge()


def adapter_parameter_count(model: nn.Module) -> int:
    """Parameters of the adapters at their current ranks: Σ D·(d_in·k² + d_out)."""
    total = 0
    for _, layer in lora_layers(model):
        total += layer.lora_A[: layer.r].numel() + layer.active_b().numel()
    return total
