"""LoRA² (and fixed-rank LoRA through the same layer) as a training backend.

After each optimizer step ``after_step`` calls ``lora2.sync_ranks``: every rank D follows ν and layers whose storage
grows or shrinks are re-allocated, the optimizer's references and state moved with them (``lora2.lora.optim``).
Checkpoints hold each layer's full storage (A, B at their capacity, log ν), so a resumed run is bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from lora2.export.api import save_lora
from lora2.inject import inject
from lora2.lora.config import LORA2_ENTROPY_WEIGHT
from lora2.lora.layer import LoRA2Layer
from lora2.lora.model import adapter_parameter_count, layers_of, regularization
from lora2.lora.optim import sync_ranks
from lora2.train.adapters.base import NU_GROUP, AdapterBackend
from lora2.train.atomic import replacing
from lora2.train.run_folder import RunFolder


class LoRA2Backend(AdapterBackend):
    name = "lora2"
    label = "LoRA²"
    trains_text_encoder = True
    card_description = "LoRA² (per-layer ranks learned, arXiv 2603.21884)."

    def inject(self, modules: dict[str, nn.Module]) -> None:
        for prefix, module in modules.items():
            config = self.config.lora if prefix == "unet" else self.config.text_encoder_lora()
            inject(module, config)
        self.modules = dict(modules)

    def _layers(self) -> Iterator[tuple[str, LoRA2Layer]]:
        for prefix, module in self.modules.items():
            for layer in layers_of(module):
                yield f"{prefix}.{layer.name}", layer

    def parameter_groups(self) -> list[dict]:
        config = self.config
        groups = []
        for prefix, module in self.modules.items():
            layers = layers_of(module)
            lr = config.learning_rate if prefix == "unet" else (config.text_encoder_lr or config.learning_rate)
            weights = [p for layer in layers for p in (layer.lora_A, layer.lora_B)]
            groups.append({"params": weights, "lr": lr, "weight_decay": config.adam_weight_decay})
        nus = [layer.log_nu for _, layer in self._layers() if layer.adaptive]
        if nus:
            groups.append({"params": nus, "lr": config.nu_lr, "weight_decay": 0.0, "name": NU_GROUP})
        return groups

    def regularization(self) -> torch.Tensor:
        """λ_r Σ_ℓ |ν_ℓ − ν_target| + λ_w Σθ²/2 over every adapted model (``lora2.regularization``)."""
        return sum(regularization(module) for module in self.modules.values())

    def method_entropy_weight(self) -> float:
        """LoRA²'s λ_e (``LORA2_ENTROPY_WEIGHT``); fixed-rank LoRA has no entropy term."""
        return LORA2_ENTROPY_WEIGHT if self.config.lora.adaptive else 0.0

    def after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        sync_ranks(optimizer, self.modules)  # ranks follow ν; re-allocated storage is rebound in optimizer

    def ranks(self) -> dict[str, int]:
        return {key: layer.r for key, layer in self._layers()}

    def parameter_count(self) -> int:
        return sum(adapter_parameter_count(module) for module in self.modules.values())

    def state(self) -> dict[str, torch.Tensor]:
        return {
            f"{key}.{attr}": getattr(layer, attr).detach()
            for key, layer in self._layers()
            for attr in ("lora_A", "lora_B", "log_nu")
        }

    def rank_axes(self) -> dict[str, tuple[str, int]]:
        axes = (("lora_A", 0), ("lora_B", 1))  # A's rows, B's columns are the rank positions
        return {f"{key}.{attr}": (key, axis) for key, _ in self._layers() for attr, axis in axes}

    def restore(self, tensors: dict[str, torch.Tensor], ranks: dict[str, int]) -> None:
        self.check_names(ranks)
        for key, layer in self._layers():
            missing = [attr for attr in ("lora_A", "lora_B", "log_nu") if f"{key}.{attr}" not in tensors]
            if missing:
                raise ValueError(f"checkpoint has no {missing} for module {key} (saved with another adapter type?)")
            layer.load_storage(*(tensors[f"{key}.{attr}"] for attr in ("lora_A", "lora_B", "log_nu")), ranks[key])

    @contextmanager
    def disabled(self) -> Iterator[None]:
        layers = [layer for _, layer in self._layers()]
        for layer in layers:
            layer.disable_adapters = True
        try:
            yield
        finally:
            for layer in layers:
                layer.disable_adapters = False

    def save(self, folder: RunFolder, formats: list[str], metadata: dict) -> dict[str, Path]:
        """``lora2.save_lora`` in each format (ranks truncated to D, s·Λ baked into ``up``), each file written under
        a temporary name and renamed into place."""
        paths = {}
        for fmt in formats:
            path = folder.adapter_path(fmt)
            folder.record(path.name)
            with replacing(path) as tmp:
                save_lora(self.modules, tmp, format=fmt, metadata=metadata)
            paths[fmt] = path
        return paths
