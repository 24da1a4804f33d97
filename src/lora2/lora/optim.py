"""Keeps optimizers in step with LoRA² layers whose ranks change, with no call the user must remember.

After every ``optimizer.step()`` of any torch optimizer (a global post-step hook that ``inject`` installs once),
the ranks of the LoRA² layers that this optimizer trains are recomputed from ν. When a layer re-allocates its
storage, the optimizer's references and per-parameter state are moved to the new tensors: state tensors shaped
like the parameter keep the values of surviving positions; new positions start with zero state.
"""

from __future__ import annotations

import logging
import weakref

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from lora2.lora.layer import LoRA2Layer
from lora2.lora.model import update_ranks

logger = logging.getLogger(__name__)

# id(log_nu parameter) → layer, for every live LoRA² layer
_LAYERS_BY_NU: weakref.WeakValueDictionary[int, LoRA2Layer] = weakref.WeakValueDictionary()
_HOOK_HANDLE = None


def register_layers(layers: list[LoRA2Layer]) -> None:
    """Make the layers known to the post-step hook and install the hook once per process."""
    global _HOOK_HANDLE
    for layer in layers:
        _LAYERS_BY_NU[id(layer.log_nu)] = layer
    if _HOOK_HANDLE is None:
        _HOOK_HANDLE = register_optimizer_step_post_hook(_after_step)


def _layers_of(optimizer: torch.optim.Optimizer) -> list[LoRA2Layer]:
    layers = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            layer = _LAYERS_BY_NU.get(id(param))
            if layer is not None and layer.log_nu is param:
                layers.append(layer)
    return layers


def _after_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    layers = _layers_of(optimizer)
    if layers:
        sync_ranks(optimizer, layers)


def sync_ranks(optimizer: torch.optim.Optimizer | None, layers: list[LoRA2Layer]) -> int:
    """Recompute ranks of ``layers`` from ν and carry the optimizer along. Returns how many ranks changed."""
    for layer in layers:
        layer.storage_lambda = None  # ν moved: Λ stored by the forward hook is stale (fused optimizers keep _version)
    changed = update_ranks(layers)
    if optimizer is not None and changed:
        # one map parameter → (list, index) for all re-allocations: a scan per parameter is O(L²) at SDXL size
        where = {
            id(p): (group["params"], i) for group in optimizer.param_groups for i, p in enumerate(group["params"])
        }
        for layer, replaced, grown in changed:
            for old, new in replaced.values():
                _rebind(optimizer, old, new, where)
            if grown:
                _zero_state_positions(optimizer, layer, grown)
    if changed:
        logger.debug("ranks changed in %d layers", len(changed))
    return len(changed)


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
