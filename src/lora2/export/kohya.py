"""kohya / sd-scripts LoRA files: ``lora_unet_<module with _>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

Module paths are the diffusers module names with dots replaced by underscores
(``lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q``), text encoders under ``lora_te1_`` /
``lora_te2_`` with the ``text_model_`` spelling. This is what diffusers' ``_convert_non_diffusers_lora_to_diffusers``
maps back, what ComfyUI's ``model_lora_keys_unet`` builds from ``unet_to_diffusers``, and what A1111 converts with
``convert_diffusers_name_to_compvis``; no SGM block renumbering (``input_blocks_4_1``) is involved.

Alpha: kohya loaders scale each module by alpha / rank. diffusers (0.42) turns per-module alphas of text encoders
into ``alpha_pattern`` keys that name the attention block rather than the projection, so mixed ranks with alpha = rank
would load with wrong scales there. Every module of a file therefore gets the same alpha (the most common rank) and
``up`` carries rank / alpha, which gives exactly ΔW = up @ down · alpha / rank in every loader.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path

import torch

from lora2.export.adapter import Adapter, AdapterFile, LoraModule, check_module, check_shapes
from lora2.export.keys import KOHYA_ALPHA, KOHYA_DOWN, KOHYA_PREFIXES, KOHYA_READ_PREFIXES, KOHYA_UP
from lora2.export.names import check_names, underscore

logger = logging.getLogger(__name__)

KOHYA_HEADER = {"ss_network_module": "networks.lora", "ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"}


def kohya_prefix(component: str) -> str:
    """kohya key prefix of a component (a bare model, component "", is written as the UNet)."""
    if component and component not in KOHYA_PREFIXES:
        raise ValueError(f"the kohya format has no prefix for component {component!r}; use {list(KOHYA_PREFIXES)}")
    return KOHYA_PREFIXES.get(component, KOHYA_PREFIXES["unet"])


def file_alpha(adapter: Adapter) -> float:
    """The one alpha written for every module: the most common rank (ties: the larger)."""
    counts = collections.Counter(module.rank for modules in adapter.values() for module in modules.values())
    return float(max(counts, key=lambda rank: (counts[rank], rank)))


def to_state_dict(adapter: Adapter, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header entries of a kohya file (ΔW = alpha / rank · up @ down with one alpha per file)."""
    alpha = file_alpha(adapter)
    tensors: dict[str, torch.Tensor] = {}
    for component, modules in adapter.items():
        prefix = kohya_prefix(component)
        for name, module in modules.items():
            key = prefix + underscore(name)
            if key + KOHYA_DOWN in tensors:
                raise ValueError(f"module {name!r} of {component!r}: kohya name {key!r} is used by two modules")
            up = module.up.double() * (module.scale * module.rank / alpha)  # (d_out, r[, 1, 1])
            tensors[key + KOHYA_DOWN] = module.down.to(dtype)  # (r, d_in[, kh, kw])
            tensors[key + KOHYA_UP] = up.to(dtype)
            tensors[key + KOHYA_ALPHA] = torch.tensor(alpha, dtype=dtype)
    unmapped = diffusers_unmapped([name for name in adapter.get("unet", {})])
    if unmapped:
        logger.warning(
            "diffusers' kohya conversion maps %d UNet module(s) to other names and would not load them: %s; "
            "A1111/ComfyUI read them, diffusers users should take the diffusers format",
            len(unmapped),
            unmapped[:5],
        )
    return tensors, dict(KOHYA_HEADER)


def diffusers_unmapped(names: list[str]) -> list[str]:
    """UNet module names that diffusers' kohya conversion does not map back to themselves (e.g. add_embedding)."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    except ImportError:  # another diffusers version: nothing to check against
        return []
    probe = {}
    for name in names:
        key = KOHYA_PREFIXES["unet"] + underscore(name)
        probe[key + KOHYA_DOWN] = probe[key + KOHYA_UP] = torch.zeros(1, 1)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(probe)
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    mapped = {key.removesuffix(".lora_A.weight") for key in peft_keys}
    return sorted(set(names) - mapped)


def split_prefix(path: Path, key: str) -> tuple[str, str]:
    for prefix, component in KOHYA_READ_PREFIXES.items():
        if key.startswith(prefix):
            return component, key[len(prefix) :]
    raise ValueError(f"{path}: unsupported kohya key {key!r} (expected a prefix among {list(KOHYA_READ_PREFIXES)})")


def is_kohya(tensors: dict[str, torch.Tensor]) -> bool:
    return any(key.endswith(KOHYA_DOWN) for key in tensors)


def from_state_dict(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> AdapterFile:
    """Read a kohya file. Module names stay in kohya spelling (underscores) until matched against a model."""
    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        for suffix in (KOHYA_DOWN, KOHYA_UP, KOHYA_ALPHA):
            if key.endswith(suffix):
                groups[key[: -len(suffix)]][suffix] = value
                break
        else:
            raise ValueError(f"{path}: unsupported key {key!r} (kohya LoRA has only lora_down, lora_up and alpha)")
    adapter: Adapter = {}
    for stem, parts in sorted(groups.items()):
        component, module = split_prefix(path, stem)
        where = f"{path}: module {stem!r}"
        for suffix in (KOHYA_DOWN, KOHYA_UP):
            if suffix not in parts:
                raise ValueError(f"{where}: {suffix.lstrip('.')} is missing")
        down, up = parts[KOHYA_DOWN], parts[KOHYA_UP]
        alpha = parts.get(KOHYA_ALPHA)
        if alpha is not None and alpha.numel() != 1:
            raise ValueError(f"{where}: alpha must be a scalar, got shape {tuple(alpha.shape)}")
        check_shapes(LoraModule(down, up), where)  # rank >= 1 before the scale divides by it
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        lora = LoraModule(down, up, scale)
        check_module(lora, where)
        adapter.setdefault(component, {})[module] = lora
    check_names(path, adapter)
    return AdapterFile(path, "kohya", adapter, header=header)


SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")


def sgm_to_diffusers(names: list[str], unet_config) -> dict[str, str]:
    """kohya names in SGM spelling (sd-scripts SDXL: ``input_blocks_4_1_transformer_blocks_0_attn1_to_q``) →
    diffusers module names, through diffusers' own conversion with the UNet's block layout. Unmapped names are left
    out."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    mapped = {}
    for name in names:
        key = KOHYA_PREFIXES["unet"] + underscore(name)
        probe = {key + KOHYA_DOWN: torch.zeros(1, 1), key + KOHYA_UP: torch.zeros(1, 1)}
        try:
            probe = _maybe_map_sgm_blocks_to_diffusers(probe, unet_config)
            converted, _ = _convert_non_diffusers_lora_to_diffusers(probe)
        except (ValueError, IndexError, KeyError):
            continue
        peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
        downs = [k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith(".lora_A.weight")]
        if len(downs) == 1:
            mapped[name] = downs[0]
    return mapped
