"""DoRA (Liu et al. 2024, peft ``LoraConfig(use_dora=True)``) as a baseline of ``lora2 train``.

W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_c: a rank-r LoRA pair plus one magnitude m per output feature. Settings from the
TrainConfig: ``LoraConfig(use_dora=True, r=init_rank, lora_alpha=lora_alpha or init_rank (s = 1), target_modules,
exclude_modules, lora_dropout, rank_pattern)``, trained with ``learning_rate``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict

from lora2.train.adapters.peft import ADAPTER_NAME, PeftBackend, peft_layers
from lora2.train.atomic import atomic_save_file


class DoRABackend(PeftBackend):
    name = "dora"
    label = "DoRA"
    card_description = "peft's DoRA (the `peft/` folder loads with `PeftModel.from_pretrained`)."

    @classmethod
    def peft_config(cls, config) -> LoraConfig:
        pattern = dict(config.lora.rank_pattern)
        return LoraConfig(
            r=config.lora.init_rank,
            lora_alpha=cls.alpha(config),
            use_dora=True,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern) if config.lora.lora_alpha is None else {},
            **cls.common_settings(config),
        )

    def parameter_count(self) -> int:
        """Σ r·(d_in·k² + d_out) + d_out (the magnitude vector)."""
        total = 0
        for _, layer in peft_layers(self.unet):
            a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            magnitudes = sum(m.weight.numel() for m in layer.lora_magnitude_vector.values())
            total += a.shape[0] * (a[0].numel() + b.shape[0]) + magnitudes
        return total

    @torch.no_grad()
    def diffusers_state_dict(self) -> dict[str, torch.Tensor]:
        """DoRA as a diffusers file (``pipe.load_lora_weights`` builds a ``use_dora`` LoraConfig from the magnitude
        keys): ``unet.<module>.lora_A.weight``, ``lora_B.weight`` with the scale s baked in (s·BA = (sB)A, so DoRA's
        column norm is unchanged) and ``lora_magnitude_vector``."""
        scales = {name: layer.scaling[ADAPTER_NAME] for name, layer in peft_layers(self.unet)}
        tensors = {}
        for key, value in get_peft_model_state_dict(self.unet, adapter_name=ADAPTER_NAME).items():
            if key.endswith(".lora_B.weight"):
                value = value.float() * scales[key[: -len(".lora_B.weight")]]
            tensors[f"unet.{key}"] = value.float().cpu().contiguous()
        return tensors

    def write_file(self, fmt: str, path: Path, metadata: dict) -> bool:
        if fmt != "diffusers":
            return False
        atomic_save_file(self.diffusers_state_dict(), path)
        return True
