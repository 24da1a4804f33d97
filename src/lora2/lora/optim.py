"""Keeps an optimizer in step with LoRA² layers whose ranks change: ``sync_ranks``, called after each step.

ν moves with every optimizer step; ``lora2.sync_ranks(optimizer, model)`` then recomputes each layer's rank D from ν
(one device→host sync for all layers). Like peft AdaLoRA's ``update_and_allocate``, it is an explicit call after
``optimizer.step()``: nothing global is installed, and the recipe in ``lora2.train`` calls it visibly. When a layer
re-allocates its storage, the optimizer's references and per-parameter state are moved to the new tensors: state
tensors shaped like the parameter keep the values of surviving positions; new positions start with zero state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from lora2.lora.layer import LoRA2Layer
from lora2.lora.model import adapters_of, layers_of, update_ranks

logger = logging.getLogger(__name__)

Target = nn.Module | dict[str, nn.Module] | Iterable[LoRA2Layer]


def _layers(target: Target) -> list[LoRA2Layer]:
    if isinstance(target, nn.Module):
        return layers_of(target)
    if isinstance(target, dict):
        return [layer for module in target.values() for layer in layers_of(module)]
    return list(target)


def _mark_synced(target: Target) -> None:
    modules = [target] if isinstance(target, nn.Module) else list(target.values()) if isinstance(target, dict) else []
    for module in modules:
        adapters = adapters_of(module)
        if adapters is not None:
            adapters.mark_synced()


def sync_ranks(optimizer: torch.optim.Optimizer | None, target: Target) -> int:
    """Recompute ranks from ν and carry the optimizer along; call after every ``optimizer.step()``.

    ``target``: an injected model, a dict of them (component → model), or LoRA² layers. ``optimizer`` may be None
    (ranks only). Returns how many ranks changed.
    """
    layers = _layers(target)
    _mark_synced(target)
    for layer in layers:
        layer.forget_importance()  # ν moved: Λ cached by the forward hook is stale
    changed = update_ranks(layers)
    if optimizer is not None and changed:
        # one map parameter → (list, index) for all re-allocations: a scan per parameter is O(L²) at SDXL size
        where = {
            id(p): (group["params"], i) for group in optimizer.param_groups for i, p in enumerate(group["params"])
        }
        for layer, replaced, grown in changed:
            rebind_parameters(optimizer, replaced, where)
            if grown:
                _zero_state_positions(optimizer, layer, grown)
    if changed:
        logger.debug("ranks changed in %d layers", len(changed))
    return len(changed)


def rebind_parameters(
    optimizer: torch.optim.Optimizer, replaced: dict[str, tuple[nn.Parameter, nn.Parameter]], where: dict | None = None
) -> None:
    """Point the optimizer at re-allocated parameters (name → (old, new)), moving their state along."""
    if where is None:
        where = {
            id(p): (group["params"], i) for group in optimizer.param_groups for i, p in enumerate(group["params"])
        }
    for old, new in replaced.values():
        _rebind(optimizer, old, new, where)


def _resize_like(state: torch.Tensor, new: nn.Parameter) -> torch.Tensor:
    """Copy the overlap of a parameter-shaped state tensor into zeros shaped like the new parameter."""
    out = torch.zeros_like(new, dtype=state.dtype)
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(state.shape, new.shape))
    out[overlap] = state[overlap]
    return out


@torch.no_grad()
def _rebind(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, where: dict) -> None:
    if id(old) in where:
        params, index = where[id(old)]
        params[index] = new
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    moved = {}
    for key, value in state.items():
        if torch.is_tensor(value) and value.shape == old.shape:
            moved[key] = _resize_like(value, new)
        elif torch.is_tensor(value) and value.dim() > 0:
            logger.warning("optimizer state %r of shape %s cannot follow a resize; it is reset", key, value.shape)
            moved = {}
            break
        else:
            moved[key] = value
    if moved:
        optimizer.state[new] = moved


@torch.no_grad()
def _zero_state_positions(optimizer: torch.optim.Optimizer, layer: LoRA2Layer, grown: range) -> None:
    """New rank positions start with no optimizer history (their old values, if any, are stale)."""
    for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                value.narrow(dim, grown.start, len(grown)).zero_()
