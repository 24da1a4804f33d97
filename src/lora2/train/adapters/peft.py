"""What the peft baselines (DoRA, AdaLoRA) share: injection of a peft tuner in place, their parameters and state.

The adapters are injected in place (peft's tuner classes), so the UNet keeps its module names and the recipe's
loop, optimizer and checkpoints see plain parameters. Outputs always include the peft folder
(``adapter_config.json`` + ``adapter_model.safetensors``, for ``PeftModel.from_pretrained``) and a diffusers file
for ``pipe.load_lora_weights``; each type says how it writes the diffusers and kohya files.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

from lora2.train.adapters.base import AdapterBackend
from lora2.train.atomic import atomic_save_file, replacing
from lora2.train.run_folder import RunFolder

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
PEFT_PREFIX = "base_model.model."


def peft_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(module name as before injection, peft layer) of every adapted module."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


class PeftBackend(AdapterBackend):
    """A peft tuner on the UNet. Subclasses give ``peft_config()``, the tuner class and the file writers."""

    tuner_class = LoraModel

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        cls.peft_config(config)  # peft's own checks run too

    @classmethod
    def peft_config(cls, config):
        raise NotImplementedError

    @staticmethod
    def common_settings(config) -> dict:
        return {
            "target_modules": config.lora.target_modules,
            "lora_dropout": config.lora.lora_dropout,
            "exclude_modules": list(config.lora.exclude_modules) or None,
        }

    @staticmethod
    def alpha(config) -> float:
        """lora_alpha, or the rank (scale α/r = 1, LoRA²'s default) when none is given."""
        return config.lora.lora_alpha if config.lora.lora_alpha is not None else config.lora.init_rank

    def inject(self, modules: dict[str, nn.Module]) -> None:
        unet = modules["unet"]
        self.tuner = self.tuner_class(unet, self.peft_config(self.config), ADAPTER_NAME)
        for param in unet.parameters():
            if param.requires_grad:
                param.data = param.data.float()  # adapter parameters train in fp32
        self.modules = {"unet": unet}
        self.unet = unet
        logger.info("%s adapter on %d modules", self.name, len(list(peft_layers(unet))))

    def adapter_parameters(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor keyed by parameter name (``lora_A``/``lora_B``/``lora_E``/magnitudes, ``ranknum``)."""
        return {name: p for name, p in self.unet.named_parameters() if ".lora_" in name or ".ranknum." in name}

    def parameter_groups(self) -> list[dict]:
        params = [p for p in self.adapter_parameters().values() if p.requires_grad]
        return [{"params": params, "lr": self.config.learning_rate, "weight_decay": self.config.adam_weight_decay}]

    def ranks(self) -> dict[str, int]:
        return {f"unet.{name}": rank for name, rank in self.layer_ranks().items()}

    def layer_ranks(self) -> dict[str, int]:
        return {name: layer.r[ADAPTER_NAME] for name, layer in peft_layers(self.unet)}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"unet.{key}": value.detach() for key, value in self.adapter_parameters().items()}

    @torch.no_grad()
    def restore(self, tensors: dict[str, torch.Tensor], ranks: dict[str, int]) -> None:
        """Fixed shapes: copied in place, so the optimizer's parameters stay."""
        self.check_names(ranks)
        for key, param in self.adapter_parameters().items():
            if f"unet.{key}" not in tensors:
                raise ValueError(f"checkpoint has no tensor unet.{key} (saved with another adapter type?)")
            param.copy_(tensors[f"unet.{key}"].to(param.device, param.dtype))

    @contextmanager
    def disabled(self) -> Iterator[None]:
        layers = [layer for _, layer in peft_layers(self.unet)]
        for layer in layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)

    @torch.no_grad()
    def peft_state_dict(self) -> tuple[dict[str, torch.Tensor], dict | None]:
        """The adapter as ``PeftModel.save_pretrained`` writes it (keys ``base_model.model.<module>.<tensor>``
        without the adapter name) and the rank pattern to store with it (None: the config's own)."""
        state = get_peft_model_state_dict(self.unet, adapter_name=ADAPTER_NAME)
        return {PEFT_PREFIX + key: value.float().cpu().contiguous() for key, value in state.items()}, None

    def save_peft_folder(self, folder: Path, base_model: str | None) -> Path:
        """peft's own format (``PeftModel.from_pretrained(unet, folder)`` loads it), written atomically."""
        with replacing(folder) as tmp:
            tmp.mkdir(parents=True)
            state, pattern = self.peft_state_dict()
            atomic_save_file(state, tmp / "adapter_model.safetensors", {"format": "pt"})
            settings = copy.deepcopy(self.unet.peft_config[ADAPTER_NAME])
            settings.inference_mode = True
            settings.base_model_name_or_path = base_model
            if pattern is not None:
                settings.rank_pattern = pattern
            settings.save_pretrained(str(tmp))
        return folder

    def save(self, folder: RunFolder, formats: list[str], metadata: dict) -> dict[str, Path]:
        """Always the peft folder and the diffusers file (``lora2 eval``, ``pipe.load_lora_weights``), plus the other
        requested formats that the type can express (``write_file``); the lora2-native format does not apply."""
        folder.record(folder.adapter_path("peft").name)
        paths = {"peft": self.save_peft_folder(folder.adapter_path("peft"), metadata.get("base_model"))}
        for fmt in dict.fromkeys(["diffusers", *formats]):
            if fmt == "peft":
                continue
            path = folder.adapter_path(fmt)
            folder.record(path.name)
            if self.write_file(fmt, path, metadata):
                paths[fmt] = path
            else:
                logger.warning("%s adapters have no %s format; not written", self.name, fmt)
        return paths

    def write_file(self, fmt: str, path: Path, metadata: dict) -> bool:
        """Write one adapter file in ``fmt``; False when the type cannot be expressed in that format."""
        raise NotImplementedError
