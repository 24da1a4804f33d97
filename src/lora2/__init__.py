"""lora2: LoRA adapters whose rank is learned per layer (LoRA², arXiv 2603.21884)."""

from lora2.export import load_lora, save_lora
from lora2.inject import inject, merge_and_unload, unload
from lora2.lora.config import LoRA2Config
from lora2.lora.layer import LoRA2Layer
from lora2.lora.model import (
    adapter_parameter_count,
    lora_layers,
    merge,
    ranks,
    regularization,
    unmerge,
)
from lora2.lora.optim import sync_ranks

__version__ = "0.1.0"

__all__ = [
    "LoRA2Config",
    "LoRA2Layer",
    "adapter_parameter_count",
    "inject",
    "load_lora",
    "lora_layers",
    "merge",
    "merge_and_unload",
    "ranks",
    "regularization",
    "save_lora",
    "sync_ranks",
    "unload",
    "unmerge",
]
