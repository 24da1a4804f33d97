"""kohya / sd-scripts LoRA files: ``lora_unet_<module with _>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.

Module names are the ones kohya's trainer for the model's family writes (``lora2.export.sgm``): SDXL UNets in
SGM spelling (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``), text encoders under ``lora_te1_`` /
``lora_te2_``; SD 1.x/2.x UNets in diffusers spelling (``lora_unet_down_blocks_1_attentions_0_…``) with the text
encoder under ``lora_te_``. A UNet without an SGM original (KOALA: no mid block) or of unknown layout keeps the
diffusers spelling, which diffusers-trained community LoRAs of such models use. The header carries kohya's
``ss_*`` entries: ``ss_base_model_version`` (A1111 lists a LoRA with SDXL checkpoints only for "sdxl_…"),
``ss_network_module``, ``ss_network_dim`` / ``ss_network_alpha`` ("Dynamic" for mixed ranks, as sd-scripts'
``resize_lora.py`` writes them), ``ss_network_args`` (``conv_dim`` / ``conv_alpha`` when 3x3 convs are adapted).
Per-module ranks and ν are in the ``lora2`` entry.

Alpha: kohya loaders scale each module by alpha / rank. diffusers (0.42) turns per-module alphas of text encoders
into ``alpha_pattern`` keys that name the attention block rather than the projection, so mixed ranks with alpha = rank
would load with wrong scales there. Every module of a file therefore gets the same alpha (the most common rank) and
``up`` carries rank / alpha, which gives exactly ΔW = up @ down · alpha / rank in every loader.
"""

from __future__ import annotations

import collections
import json
import logging
from pathlib import Path

import torch

from lora2.export.adapter import Adapter, AdapterFile, LoraModule, check_module, check_shapes
from lora2.export.keys import (
    KOHYA_ALPHA,
    KOHYA_DOWN,
    KOHYA_PREFIXES,
    KOHYA_READ_PREFIXES,
    KOHYA_SD_TEXT_PREFIX,
    KOHYA_UP,
)
from lora2.export.names import check_names, underscore
from lora2.export.sgm import NameTable, UNetLayout, is_sgm_name

logger = logging.getLogger(__name__)

NETWORK_MODULE = "networks.lora"
DYNAMIC = "Dynamic"


def kohya_prefix(component: str, layout: UNetLayout | None = None) -> str:
    """kohya key prefix of a component (a bare model, component "", is written as the UNet)."""
    if component and component not in KOHYA_PREFIXES:
        raise ValueError(f"the kohya format has no prefix for component {component!r}; use {list(KOHYA_PREFIXES)}")
    if component == "text_encoder" and layout is not None and layout.addition_embed_type is None:
        return KOHYA_SD_TEXT_PREFIX
    return KOHYA_PREFIXES.get(component, KOHYA_PREFIXES["unet"])


def file_alpha(adapter: Adapter) -> float:
    """The one alpha written for every module: the most common rank (ties: the larger)."""
    counts = collections.Counter(module.rank for modules in adapter.values() for module in modules.values())
    return float(max(counts, key=lambda rank: (counts[rank], rank)))


def unet_names(names: list[str], layout: UNetLayout | None) -> dict[str, str]:
    """module name → name after ``lora_unet_`` (kohya spelling): SGM names where kohya writes them (names already in
    SGM spelling stay), else the diffusers names. A UNet with modules the SGM table lacks keeps diffusers names whole,
    since diffusers drops every SGM key of a file that mixes both spellings."""
    plain = {name: underscore(name) for name in names}
    if layout is None:
        logger.warning(
            "UNet layout unknown (no UNet config, no layout in the lora2 header): kohya UNet names keep the "
            "diffusers spelling, which sd-scripts' SDXL tools do not read"
        )
        return plain
    if layout.kohya_spelling != "sgm":
        if layout.is_sdxl:
            logger.info(
                "this SDXL-family UNet has no SGM original (e.g. KOALA, no mid block): kohya UNet names keep "
                "the diffusers spelling that diffusers-trained LoRAs of such models use"
            )
        return plain
    table = NameTable(layout)
    sgm = {name: table.to_sgm(name) or (stem if table.to_diffusers(stem) else None) for name, stem in plain.items()}
    missing = [name for name, value in sgm.items() if value is None]
    if missing:
        logger.warning(
            "%d UNet module(s) have no SGM name: %s; writing the whole UNet in diffusers spelling, which "
            "sd-scripts' SDXL tools do not read",
            len(missing),
            missing[:5],
        )
        return plain
    return sgm


def header_entries(adapter: Adapter, layout: UNetLayout | None, alpha: float) -> dict[str, str]:
    """kohya's ``ss_*`` header entries for this adapter (see the module docstring)."""
    modules = [module for modules in adapter.values() for module in modules.values()]
    conv = [m.rank for m in modules if m.is_conv and m.down.shape[2:] != (1, 1)]
    plain = [m.rank for m in modules if not (m.is_conv and m.down.shape[2:] != (1, 1))]
    entries = {"ss_network_module": NETWORK_MODULE}
    if plain:
        fixed = len(set(plain)) == 1
        entries["ss_network_dim"] = str(plain[0]) if fixed else DYNAMIC
        entries["ss_network_alpha"] = str(alpha) if fixed else DYNAMIC
    if conv:
        fixed = len(set(conv)) == 1
        args = {"conv_dim": str(conv[0]) if fixed else DYNAMIC, "conv_alpha": str(alpha) if fixed else DYNAMIC}
        entries["ss_network_args"] = json.dumps(args)
    version = layout.base_model_version if layout is not None else None
    if version is not None:
        entries["ss_base_model_version"] = version
        entries["ss_v2"] = str(version.startswith("sd_v2"))
    ranks = sorted(m.rank for m in modules)
    entries["ss_training_comment"] = (
        f"LoRA² adapter: {len(modules)} modules, ranks {ranks[0]}–{ranks[-1]}, alpha {alpha:g} for every module; "
        "per-module ranks in the 'lora2' header entry"
    )
    return entries


def to_state_dict(
    adapter: Adapter, dtype: torch.dtype, layout: UNetLayout | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header entries of a kohya file (ΔW = alpha / rank · up @ down with one alpha per file).

    ``layout``: the UNet's layout, which decides the UNet's spelling, the text encoder prefix of SD 1.x/2.x and
    ``ss_base_model_version``."""
    alpha = file_alpha(adapter)
    tensors: dict[str, torch.Tensor] = {}
    for component, modules in adapter.items():
        prefix = kohya_prefix(component, layout)
        is_unet = prefix == KOHYA_PREFIXES["unet"]
        names = unet_names(list(modules), layout) if is_unet else {name: underscore(name) for name in modules}
        for name, module in modules.items():
            key = prefix + names[name]
            if key + KOHYA_DOWN in tensors:
                raise ValueError(f"module {name!r} of {component!r}: kohya name {key!r} is used by two modules")
            up = module.up.double() * (module.scale * module.rank / alpha)  # (d_out, r[, 1, 1])
            tensors[key + KOHYA_DOWN] = module.down.to(dtype)  # (r, d_in[, kh, kw])
            tensors[key + KOHYA_UP] = up.to(dtype)
            tensors[key + KOHYA_ALPHA] = torch.tensor(alpha, dtype=dtype)
        if is_unet:
            _warn_diffusers_unmapped([names[name] for name in modules])
    return tensors, header_entries(adapter, layout, alpha)


def _warn_diffusers_unmapped(stems: list[str]) -> None:
    unmapped = diffusers_unmapped(stems)
    if unmapped:
        logger.warning(
            "diffusers' kohya conversion maps %d UNet module(s) of this file to other names and drops them: %s; "
            "in diffusers, load the diffusers-format file instead",
            len(unmapped),
            unmapped[:5],
        )


def diffusers_unmapped(stems: list[str]) -> list[str]:
    """UNet names (diffusers spelling, after ``lora_unet_``) that diffusers' kohya conversion does not map back to
    themselves (e.g. ``add_embedding``); SGM names are left to the SGM check in the tests."""
    try:
        from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
        from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    except ImportError:  # another diffusers version: nothing to check against
        return []
    names = [stem for stem in stems if not is_sgm_name(stem)]
    probe = {}
    for stem in names:
        key = KOHYA_PREFIXES["unet"] + stem
        probe[key + KOHYA_DOWN] = probe[key + KOHYA_UP] = torch.zeros(1, 1)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(probe)
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    mapped = {underscore(key.removesuffix(".lora_A.weight")) for key in peft_keys}
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
