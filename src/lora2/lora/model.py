"""Functions over a whole model holding LoRA² layers: ranks, rank updates, regularization, merging."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lora2.lora.layer import LoRA2Layer, storage_importance
from lora2.rank.math import effective_rank_tensor

logger = logging.getLogger(__name__)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRA2Layer]]:
    """(name, layer) for every LoRA² layer, with names of the wrapped modules (as before injection)."""
    for name, module in model.named_modules():
        if isinstance(module, LoRA2Layer):
            yield name, module


def ranks(model: nn.Module) -> dict[str, int]:
    """Current effective rank D of every adapted module, keyed by module name."""
    adapters = adapters_of(model)
    if adapters is not None:
        return {layer.name: layer.r for layer in adapters.layers}
    return {name: layer.r for name, layer in lora_layers(model)}


class LoRA2Adapters:
    """The LoRA² layers of one injected model, attached to it by ``lora2.inject`` (``adapters_of(model)``).

    Holds the layer list (model order, so per-step functions need no module walk) and the model-level forward
    pre-hook that computes s·Λ of every adaptive layer once per forward, in a few kernels for all layers. A layer
    uses that result while its ν and D are unchanged (so gradient checkpointing's recomputation in the backward sees
    the same tensors), and otherwise computes its own, with the same values. ``lora2.unload`` removes it.
    """

    ATTRIBUTE = "lora2_adapters"

    def __init__(self, model: nn.Module) -> None:
        self.layers = [layer for _, layer in lora_layers(model)]
        self.adaptive = [layer for layer in self.layers if layer.adaptive]
        self.groups: dict[str, list[LoRA2Layer]] = {}
        for layer in self.adaptive:
            self.groups.setdefault(layer.config.lambda_scaling, []).append(layer)
        self.caches: dict[str, dict] = {scaling: {} for scaling in self.groups}
        # ν of every adaptive layer stacked by the last forward (model order), shared with rank_regularization so that
        # each log ν receives one gradient (no per-layer accumulation)
        self.nu: torch.Tensor | None = None
        self.forwards_since_sync = 0
        self.handle = model.register_forward_pre_hook(self.before)

    def before(self, module: nn.Module, args) -> None:
        if not self.adaptive:
            return
        self._check_synced()
        nu = torch.stack([layer.log_nu for layer in self.adaptive]).float().exp()  # (L,)
        for scaling, layers in self.groups.items():
            group_nu = nu if len(self.groups) == 1 else torch.stack([layer.log_nu for layer in layers]).float().exp()
            for layer, lam in zip(layers, storage_importance(layers, self.caches[scaling], group_nu)):
                layer.cache_importance(lam)
        # shared with rank_regularization until this forward's backward: a CUDA graph's backward capture frees the
        # captured ν's graph and a replay runs no hook, so a ν kept past its backward would be stale
        capturing = nu.is_cuda and torch.cuda.is_current_stream_capturing()
        self.nu = None if capturing else nu
        if self.nu is not None and nu.requires_grad:
            nu.register_hook(self._release)

    def _check_synced(self) -> None:
        """Warn once when many training forwards ran and ranks were never synchronised (sync_ranks forgotten)."""
        if not torch.is_grad_enabled() or self.forwards_since_sync < 0:
            return
        self.forwards_since_sync += 1
        if self.forwards_since_sync == 200:
            logger.warning(
                "200 training forward passes and lora2.sync_ranks(optimizer, model) was never called: LoRA² ranks "
                "do not follow ν; call it after every optimizer.step()"
            )

    def mark_synced(self) -> None:
        self.forwards_since_sync = -1

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
        for layer in self.adaptive:
            layer.forget_importance()


def attach_adapters(model: nn.Module) -> LoRA2Adapters:
    """Attach a ``LoRA2Adapters`` over the model's LoRA² layers (called by ``lora2.inject``)."""
    adapters = LoRA2Adapters(model)
    setattr(model, LoRA2Adapters.ATTRIBUTE, adapters)
    return adapters


def detach_adapters(model: nn.Module) -> None:
    """Remove the attached ``LoRA2Adapters`` and its hook (called by ``lora2.unload``)."""
    adapters = adapters_of(model)
    if adapters is not None:
        adapters.remove()
        delattr(model, LoRA2Adapters.ATTRIBUTE)


def adapters_of(model: nn.Module) -> LoRA2Adapters | None:
    """The ``LoRA2Adapters`` that ``lora2.inject`` attached to ``model`` (None for a model not injected)."""
    adapters = getattr(model, LoRA2Adapters.ATTRIBUTE, None)
    return adapters if isinstance(adapters, LoRA2Adapters) else None


def layers_of(model: nn.Module) -> list[LoRA2Layer]:
    """Every LoRA² layer of a model, in model order (without a module walk when the model was injected)."""
    adapters = adapters_of(model)
    return list(adapters.layers) if adapters is not None else [layer for _, layer in lora_layers(model)]


def update_ranks(layers: list[LoRA2Layer]) -> list[tuple[LoRA2Layer, dict, range]]:
    """Recompute D from ν for every adaptive layer (one device→host sync) and resize those that changed.

    Returns (layer, replaced parameters, new positions) for each layer whose rank changed; ``FloatingPointError``
    naming the module when a ν is NaN (training diverged).
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
        if rank < 1:  # ν is NaN: the effective rank is undefined
            raise FloatingPointError(f"ν of module {layer.name!r} is not finite ({float(layer.log_nu.exp())})")
        if rank != layer.r:
            replaced, grown = layer.set_rank(rank)
            changed.append((layer, replaced, grown))
    return changed


def rank_regularization(model: nn.Module) -> torch.Tensor:
    """L_reg = Σ_ℓ |ν_ℓ − ν_target| over adaptive layers (LoRA², L1 reading), vectorised over layers."""
    adapters = adapters_of(model)
    if adapters is not None:
        adaptive = adapters.adaptive
        nu = adapters.current_nu()  # (L,), shared with this step's Λ
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


class _GaussianPrior(torch.autograd.Function):
    """Σθ²/2 over the first ``r`` positions of each layer's storage (A's rows, B's columns), in a few kernels.

    Autograd through per-layer slices costs about a dozen kernel launches a layer, and an SDXL step at batch 1 is
    bound by launches (560 layers). The gradient of Σθ²/2 is θ itself: the backward is one multi-tensor multiply and
    a zero fill of the positions beyond each D.
    """

    @staticmethod
    def forward(ctx, ranks: tuple[int, ...], *weights: torch.Tensor) -> torch.Tensor:  # weights: A_1, B_1, A_2, …
        ctx.ranks = ranks
        ctx.save_for_backward(*weights)
        norms = torch._foreach_norm(_active_positions(weights, ranks))  # ‖A_ℓ[:D]‖, ‖B_ℓ[:, :D]‖ for every ℓ
        return 0.5 * torch.stack(norms).square().sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple:
        weights = ctx.saved_tensors
        grads = torch._foreach_mul(weights, grad)  # ∂(Σθ²/2)/∂θ = θ
        tails = [tail for tail in _active_positions(grads, ctx.ranks, beyond=True) if tail.numel()]
        if tails:
            torch._foreach_zero_(tails)
        return None, *grads


def _active_positions(weights: Sequence[torch.Tensor], ranks: Sequence[int], beyond: bool = False) -> list:
    """Views of A_ℓ[:D] and B_ℓ[:, :D] (or, ``beyond``, of the positions past D) of alternating A, B tensors."""
    views = []
    for index, weight in enumerate(weights):
        rank = ranks[index // 2]
        positions = slice(rank, None) if beyond else slice(None, rank)
        views.append(weight[positions] if index % 2 == 0 else weight[:, positions])
    return views


def weight_regularization(model: nn.Module) -> torch.Tensor:
    """Gaussian prior Σθ²/2 over the active LoRA weights (AWNN's weight prior with σ = 1)."""
    layers = layers_of(model)
    if not layers:
        return torch.zeros(())
    weights = [weight for layer in layers for weight in (layer.lora_A, layer.lora_B)]
    return _GaussianPrior.apply(tuple(layer.r for layer in layers), *weights)


def regularization(model: nn.Module) -> torch.Tensor:
    """λ_r · L_reg + λ_w · Σθ²/2, with the weights of the model's LoRA2Config (0 when both are off)."""
    layers = layers_of(model)
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
    return sum(layer.r * (layer.lora_A[0].numel() + layer.out_features) for layer in layers_of(model))
