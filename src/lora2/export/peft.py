"""peft adapter directories: ``adapter_config.json`` (a ``LoraConfig``) + ``adapter_model.safetensors``.

One component is one peft adapter of one model, so a single component is written into ``path`` itself and several
components into ``path/<component>/`` (``PeftModel.from_pretrained(pipe.unet, path / "unet")``). Keys are
``base_model.model.<module>.lora_A.weight`` as ``get_peft_model_state_dict`` writes them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lora2.export.adapter import Adapter, AdapterFile, LoraModule
from lora2.export.diffusers import lora_config_kwargs, parse_lora_ab
from lora2.export.files import inside, read_safetensors, write_safetensors
from lora2.export.keys import PEFT_CONFIG_NAME, PEFT_PREFIX, PEFT_WEIGHTS_NAME
from lora2.export.names import check_names


def write_component(
    directory: Path, component: str, modules: dict[str, LoraModule], dtype: torch.dtype, header: dict[str, str]
) -> None:
    """One peft adapter directory for one component."""
    from peft import LoraConfig

    baked = {name: module.baked() for name, module in modules.items()}
    config = LoraConfig(**lora_config_kwargs(component, baked))
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    tensors = {}
    for name, module in baked.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.down.to(dtype)  # (r, d_in[, kh, kw])
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.up.to(dtype)  # (d_out, r[, 1, 1])
    write_safetensors(directory / PEFT_WEIGHTS_NAME, tensors, header)


def component_dirs(path: Path, adapter: Adapter) -> dict[str, Path]:
    """Where each component is written: ``path`` itself for a single component, else ``path/<component>``, which
    must resolve inside ``path`` (component names come from files)."""
    if len(adapter) == 1:
        return {next(iter(adapter)): path}
    return {component: inside(path, component) for component in adapter}


def write(path: Path, adapter: Adapter, dtype: torch.dtype, header: dict[str, str]) -> Path:
    """Write one directory (single component) or one sub-directory per component."""
    for component, directory in component_dirs(path, adapter).items():
        write_component(directory, component, adapter[component], dtype, header)
    return path


def is_peft_dir(path: Path) -> bool:
    return (path / PEFT_CONFIG_NAME).is_file() or any(
        (sub / PEFT_CONFIG_NAME).is_file() for sub in path.iterdir() if sub.is_dir()
    )


def read_component(directory: Path, component: str) -> tuple[dict[str, LoraModule], dict[str, str]]:
    config_path = directory / PEFT_CONFIG_NAME
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: must hold a JSON object, got {type(config).__name__}")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{config_path}: peft_type {config.get('peft_type')!r} is not supported (only LORA)")
    if config.get("use_dora"):
        raise ValueError(f"{config_path}: DoRA adapters (use_dora=true) are not supported")
    weights = directory / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{directory}: {PEFT_WEIGHTS_NAME} is missing (adapter_model.bin pickles are refused)")
    tensors, header = read_safetensors(weights)
    parsed = parse_lora_ab(weights, tensors, {"": config}, peft_keys=True)
    if set(parsed) - {""}:
        raise ValueError(f"{weights}: keys must start with {PEFT_PREFIX!r} and name modules of one model")
    return parsed.get("", {}), header


def read(path: Path) -> AdapterFile:
    """Read a peft directory written by peft or by ``write`` (single or per-component)."""
    if (path / PEFT_CONFIG_NAME).is_file():
        modules, header = read_component(path, "")
        adapter = {"": modules}
    else:
        adapter, header = {}, {}
        for sub in sorted(path.iterdir()):
            if (sub / PEFT_CONFIG_NAME).is_file():
                adapter[sub.name], header = read_component(sub, sub.name)
    check_names(path, adapter)
    return AdapterFile(path, "peft", adapter, header=header)
