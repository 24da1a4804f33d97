"""Injection of LoRA² layers into any torch model, and their removal."""

from __future__ import annotations

import logging

from torch import nn

from lora2.lora.config import LoRA2Config
from lora2.lora.layer import LoRA2Layer
from lora2.lora.model import attach_adapters, detach_adapters, lora_layers

logger = logging.getLogger(__name__)


def inject(model: nn.Module, config: LoRA2Config) -> nn.Module:
    """Replace every target module of ``model`` by a ``LoRA2Layer`` wrapping it, in place.

    All parameters of the model other than the adapters' are frozen (as peft's ``get_peft_model`` does). Call
    ``lora2.sync_ranks(optimizer, model)`` after every optimizer step so that ranks follow ν.
    Raises ``ValueError`` when no module matches, or when a match is of a type that cannot be adapted.
    """
    if any(True for _ in lora_layers(model)):
        raise ValueError("model already holds LoRA² layers: call lora2.unload(model) before injecting again")
    targets = [name for name, module in model.named_modules() if name and config.is_target(name)]
    if not targets:
        linear_names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))][:8]
        raise ValueError(
            f"target_modules={config.target_modules!r} match no module of {type(model).__name__}; "
            f"some adaptable modules are: {linear_names}"
        )
    for param in model.parameters():
        param.requires_grad_(False)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        layer = LoRA2Layer(base, config, config.rank_for(name), name=name)
        setattr(parent, child, layer)
    attach_adapters(model)
    logger.info("injected LoRA² into %d modules", len(targets))
    return model


def _replace_layers(model: nn.Module, merge: bool) -> nn.Module:
    detach_adapters(model)
    for name, layer in list(lora_layers(model)):
        if merge:
            layer.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove the adapters and give the base modules back unchanged (un-merging merged layers first)."""
    for _, layer in lora_layers(model):
        layer.unmerge()
    return _replace_layers(model, merge=False)


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge ΔW into the base weights and remove the adapter layers."""
    return _replace_layers(model, merge=True)
