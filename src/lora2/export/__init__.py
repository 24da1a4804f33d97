"""Adapter files: diffusers, kohya and peft formats that standard loaders read, plus the lora2 header and the
lora2-native training state. See ``lora2.export.api`` for the design."""

from lora2.export.adapter import Adapter, AdapterFile, LoraModule
from lora2.export.api import default_component, load_lora, save_lora
from lora2.export.formats import read_adapter, write_adapter

__all__ = [
    "Adapter",
    "AdapterFile",
    "LoraModule",
    "default_component",
    "load_lora",
    "read_adapter",
    "save_lora",
    "write_adapter",
]
