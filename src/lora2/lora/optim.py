"""Keeps an optimizer in step with LoRA² layers whose ranks change: ``sync_ranks``, called after each step.

ν moves with every optimizer step; ``lora2.sync_ranks(optimizer, model)`` then recomputes each layer's rank D from ν
(one device→host sync for all layers). Like peft AdaLoRA's ``update_and_allocate``, it is an explicit call after
``optimizer.step()``: nothing global is installed, and the recipe in ``lora2.train`` calls it visibly. When a layer
re-allocates its storage, the optimizer's references and per-parameter state are moved to the new tensors: state
of surviving positions is kept, positions that were dropped are dropped, new positions start with zero state. This
holds for every per-position state the supported optimizers keep (``_positional_state``): Adam's moments (shaped like
the parameter), Prodigy's ``s`` and ``p0`` (flattened; a grown position's ``p0`` is where it starts), and
bitsandbytes' 8-bit moments (uint8 codes with one absmax per block of 256 values in flattened order: dequantized,
resized and quantized again, since a resize moves positions across blocks).
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


BNB_BLOCKSIZE = 256  # bitsandbytes' 8-bit optimizers quantize their state in blocks of 256 values
_QUANTIZED = {"state1": ("absmax1", "qmap1"), "state2": ("absmax2", "qmap2")}
_START_FROM_PARAMETER = ("p0",)  # Prodigy's starting point: a grown position starts where the parameter is


def _quantized(state: dict, key: str) -> bool:
    value = state[key]
    return key in _QUANTIZED and value.dtype == torch.uint8 and _QUANTIZED[key][0] in state


def _bookkeeping(state: dict) -> set[str]:
    """Keys of bitsandbytes' per-block statistics and code books (recomputed or kept, never resized)."""
    return {name for key in _QUANTIZED if key in state and _quantized(state, key) for name in _QUANTIZED[key]}


def _positional_state(state: dict, param: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every per-position state tensor of ``param`` as a float tensor shaped like it (views where the layout allows:
    Adam's moments, Prodigy's flattened ``s``/``p0``; dequantized copies of bitsandbytes' 8-bit moments)."""
    views, skip = {}, _bookkeeping(state)
    for key, value in state.items():
        if not torch.is_tensor(value) or value.dim() == 0 or key in skip:
            continue
        if _quantized(state, key):
            from bitsandbytes.functional import dequantize_blockwise

            absmax, qmap = (state[name] for name in _QUANTIZED[key])
            views[key] = dequantize_blockwise(value, absmax=absmax, code=qmap, blocksize=BNB_BLOCKSIZE)
        elif value.shape == param.shape:
            views[key] = value
        elif value.dim() == 1 and value.numel() == param.numel():
            views[key] = value.view(param.shape)
    return views


def _store(state: dict, key: str, values: torch.Tensor) -> None:
    """Write parameter-shaped ``values`` back into ``state[key]`` in its own layout (flattened, or quantized)."""
    if _quantized(state, key):
        from bitsandbytes.functional import quantize_blockwise

        absmax, qmap = _QUANTIZED[key]
        codes, quant_state = quantize_blockwise(values.contiguous(), code=state[qmap], blocksize=BNB_BLOCKSIZE)
        state[key], state[absmax] = codes, quant_state.absmax
    else:  # Prodigy keeps some state flattened
        state[key] = values.reshape(-1) if state[key].dim() == 1 and values.dim() > 1 else values


@torch.no_grad()
def _rebind(optimizer: torch.optim.Optimizer, old: nn.Parameter, new: nn.Parameter, where: dict) -> None:
    if id(old) in where:
        params, index = where[id(old)]
        params[index] = new
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    positional, skip = _positional_state(state, old), _bookkeeping(state)
    unknown = [
        key for key, value in state.items()
        if torch.is_tensor(value) and value.dim() > 0 and key not in positional and key not in skip
    ]  # fmt: skip
    if unknown:
        logger.warning("optimizer state %s of %s cannot follow a resize; it is reset", unknown, tuple(old.shape))
        return
    moved = dict(state)
    for key, value in positional.items():
        _store(moved, key, _resize_like(value, new))
    optimizer.state[new] = moved


@torch.no_grad()
def _zero_state_positions(optimizer: torch.optim.Optimizer, layer: LoRA2Layer, grown: range) -> None:
    """New rank positions start with no optimizer history (their old values, if any, are stale)."""
    for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
        state = optimizer.state.get(param)
        if not state:
            continue
        for key, value in _positional_state(state, param).items():
            positions = value.narrow(dim, grown.start, len(grown))
            if key in _START_FROM_PARAMETER:
                positions.copy_(param.narrow(dim, grown.start, len(grown)))
            else:
                positions.zero_()
            _store(state, key, value)
