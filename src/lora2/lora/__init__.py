"""LoRA² adapter: config, layer, and functions over a model."""

from lora2.lora.config import DEFAULT_TARGETS, LoRA2Config
from lora2.lora.layer import LoRA2Layer

__all__ = ["DEFAULT_TARGETS", "LoRA2Config", "LoRA2Layer"]
