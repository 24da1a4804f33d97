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
        # ν of every adaptive layer stacked by the last forward (model order), shared with rank_regularization so that
        # each log ν receives one gradient (no per-layer accumulation) and the model is not walked again
        self.layers = [layer for _, layer in lora_layers(model)]
        self.adaptive = [layer for layer in self.layers if layer.adaptive]
        self.nu: torch.Tensor | None = None
        self.handle = model.register_forward_pre_hook(self.before)

    def before(self, module: nn.Module, args) -> None:
        if not self.adaptive:
            return
        nu = torch.stack([layer.log_nu for layer in self.adaptive]).float().exp()  # (L,)
        for scaling, layers in self.groups.items():
            group_nu = nu if len(self.groups) == 1 else torch.stack([layer.log_nu for layer in layers]).float().exp()
            for layer, lam in zip(layers, storage_importance(layers, self.caches[scaling], group_nu)):
                layer.storage_lambda = lam
                layer.storage_lambda_version = layer.log_nu._version
        # shared with rank_regularization until this forward's backward: a CUDA graph's backward capture frees the
        # captured ν's graph and a replay runs no hook, so a ν kept past its backward would be stale
        capturing = nu.is_cuda and torch.cuda.is_current_stream_capturing()
        self.nu = None if capturing else nu
        if self.nu is not None and nu.requires_grad:
            nu.register_hook(self._release)

    def _release(self, grad: torch.Tensor) -> None:
        """Tensor hook on the shared ν: its backward has run, so its graph is gone."""
        self.nu = None

    def current_nu(self) -> torch.Tensor | None:
        """ν stacked by this step's forward, or None once any ν moved (sync_ranks clears storage_lambda) or when
        that forward ran without gradients (a sampling pass) while gradients are wanted now."""
        if (
            self.nu is None
            or (torch.is_grad_enabled() and not self.nu.requires_grad)
            or any(
                layer.storage_lambda is None or layer.storage_lambda_version != layer.log_nu._version
                for layer in self.adaptive
            )
        ):
            return None
        return self.nu

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
    hook = model.__dict__.get("_lora2_importance_hook")
    if hook is not None:
        adaptive = hook.adaptive
        nu = hook.current_nu()  # (L,), shared with this step's Λ
    else:
        adaptive = [layer for _, layer in lora_layers(model) if layer.adaptive]
        nu = None
    if not adaptive:
        return torch.zeros(())
    if nu is None:
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
    hook = model.__dict__.get("_lora2_importance_hook")
    layers = hook.layers if hook is not None else [layer for _, layer in lora_layers(model)]
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
