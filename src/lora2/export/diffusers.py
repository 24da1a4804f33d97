"""diffusers / peft-style LoRA files: ``<component>.<module>.lora_A.weight`` / ``lora_B.weight``.

Written with the ``lora_adapter_metadata`` header entry that ``pipe.load_lora_weights`` turns into a peft
``LoraConfig`` per component (keys ``<component>.r``, ``.lora_alpha``, ``.rank_pattern``, ``.alpha_pattern``,
``.target_modules``), so modules at different ranks load with their own rank and alpha = rank (scale 1).
"""

from __future__ import annotations

import collections
import json
import math
import re
from pathlib import Path

import torch

from lora2.export.adapter import FLOAT_DTYPES, Adapter, AdapterFile, LoraModule, check_module, check_shapes
from lora2.export.files import parse_json_entry
from lora2.export.keys import DIFFUSERS_METADATA_KEY, KNOWN_COMPONENTS, LORA2_HEADER_KEY, PEFT_PREFIX
from lora2.export.names import PatternTable, check_names, pattern_key, target_name

_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALPHA_KEY = re.compile(r"^(?P<module>.+)\.alpha$")
# DoRA's magnitude vector m of a module (peft / diffusers spellings, with or without adapter name and ".weight")
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?$")


def lora_config_kwargs(component: str, modules: dict[str, LoraModule]) -> dict:
    """peft ``LoraConfig`` arguments for modules with scale 1: r = most common rank, alpha = rank everywhere.

    ``rank_pattern`` has one key per rank (an alternation of the exact module names, ``names.pattern_key``), not
    one per module: peft matches every module against every key with an uncached regex, which with hundreds of
    per-module keys takes tens of seconds for an SDXL UNet.
    """
    ranks = {name: module.rank for name, module in modules.items()}
    counts = collections.Counter(ranks.values())
    common = max(counts, key=lambda rank: (counts[rank], rank))
    groups = collections.defaultdict(list)
    for name, rank in ranks.items():
        if rank != common:
            groups[rank].append(name)
    pattern = {pattern_key(component, sorted(names)): rank for rank, names in sorted(groups.items())}
    return {
        "r": common,
        "lora_alpha": common,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(target_name(component, name) for name in modules),
    }


def to_state_dict(adapter: Adapter, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header entries of a diffusers file (scales baked into lora_B)."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict[str, object] = {}
    for component, modules in adapter.items():
        prefix = f"{component}." if component else ""
        baked = {name: module.baked() for name, module in modules.items()}
        for name, module in baked.items():
            tensors[f"{prefix}{name}.lora_A.weight"] = module.down.to(dtype)  # (r, d_in[, kh, kw])
            tensors[f"{prefix}{name}.lora_B.weight"] = module.up.to(dtype)  # (d_out, r[, 1, 1])
        for key, value in lora_config_kwargs(component, baked).items():
            metadata[f"{prefix}{key}"] = value
    return tensors, {DIFFUSERS_METADATA_KEY: json.dumps(metadata, sort_keys=True)}


def split_component(key: str, strip_peft_prefix: bool = False, known: frozenset = frozenset()) -> tuple[str, str]:
    """(component, rest) of a key: a leading component name (diffusers' or ``known``), else ("", key)."""
    if strip_peft_prefix:
        key = key.removeprefix(PEFT_PREFIX)
    head, _, rest = key.partition(".")
    if (head in KNOWN_COMPONENTS or head in known) and rest:
        return head, rest
    return "", key


def module_scale(
    config: dict | None, alphas: PatternTable | None, name: str, rank: int, alpha_key: float | None
) -> float:
    """Scale of one module from a peft config (alpha / r, or alpha / √r with rsLoRA), an ``.alpha`` key, or 1."""
    if alpha_key is not None:
        return float(alpha_key) / rank
    if not config:
        return 1.0
    alpha = alphas.get(name) if alphas is not None else None
    if alpha is None:
        alpha = config.get("lora_alpha", config.get("r", rank))
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _alpha_table(path: Path, component: str, config: dict) -> PatternTable:
    patterns = config.get("alpha_pattern") or {}
    try:
        if not isinstance(patterns, dict):
            raise TypeError(f"a JSON object is needed, got {type(patterns).__name__}")
        return PatternTable(patterns)
    except (TypeError, re.error) as error:
        raise ValueError(f"{path}: alpha_pattern of component {component!r:.100} is unusable ({error})") from error


def parse_lora_ab(
    path: Path,
    tensors: dict[str, torch.Tensor],
    configs: dict[str, dict],
    peft_keys: bool,
    known: frozenset = frozenset(),
) -> Adapter:
    """Group ``lora_A``/``lora_B`` (and optional ``.alpha``) keys into modules; ValueError for anything else."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = collections.defaultdict(dict)
    alphas: dict[tuple[str, str], float] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match:
            component, module = split_component(match["module"], peft_keys, known)
            pairs[(component, module)][match["ab"]] = value
            continue
        match = _ALPHA_KEY.match(key)
        if match and value.numel() == 1:
            alphas[split_component(match["module"], peft_keys, known)] = float(value)
            continue
        raise ValueError(f"{path}: unsupported key {key!r} (expected <module>.lora_A.weight / lora_B.weight)")
    tables = {component: _alpha_table(path, component, config) for component, config in configs.items()}
    adapter: Adapter = {}
    for (component, module), ab in sorted(pairs.items()):
        where = f"{path}: module {module!r}" + (f" of {component!r}" if component else "")
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise ValueError(f"{where}: {missing}.weight is missing")
        lora = LoraModule(ab["A"], ab["B"])
        check_shapes(lora, where)  # rank >= 1 before the scale divides by it
        alpha = alphas.pop((component, module), None)
        try:
            lora.scale = module_scale(configs.get(component), tables.get(component), module, lora.rank, alpha)
        except (TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"{where}: unusable alpha/r in the header ({error})") from error
        check_module(lora, where)
        adapter.setdefault(component, {})[module] = lora
    if alphas:
        raise ValueError(f"{path}: alpha without weights for modules {sorted(m for _, m in alphas)}")
    return adapter


def from_state_dict(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> AdapterFile:
    """Read a diffusers-style file, with per-module scales from ``lora_adapter_metadata`` when present.

    DoRA magnitude vectors (``<module>.lora_magnitude_vector``) are checked against their module and kept apart in
    ``AdapterFile.magnitudes``; ``read_adapter`` refuses them unless asked for DoRA."""
    flat = parse_json_entry(path, header, DIFFUSERS_METADATA_KEY) or {}
    lora2 = parse_json_entry(path, header, LORA2_HEADER_KEY) or {}
    components = lora2.get("components")
    # components named by the headers (e.g. "controlnet"), besides diffusers' usual ones
    known = frozenset(key.rsplit(".", 1)[0] for key in flat if "." in key)
    known |= frozenset(components if isinstance(components, dict) else ())
    configs: dict[str, dict] = collections.defaultdict(dict)
    for key, value in flat.items():
        component, field = split_component(key, known=known)
        configs[component][field] = value
    magnitude_keys = {key for key in tensors if _MAGNITUDE_KEY.match(key)}
    pairs = {key: value for key, value in tensors.items() if key not in magnitude_keys}
    peft_keys = all(key.startswith(PEFT_PREFIX) for key in pairs)
    adapter = parse_lora_ab(path, pairs, configs, peft_keys, known)
    magnitudes: dict[str, dict[str, torch.Tensor]] = {}
    for key in sorted(magnitude_keys):
        component, module = split_component(_MAGNITUDE_KEY.match(key)["module"], peft_keys, known)
        lora, magnitude = adapter.get(component, {}).get(module), tensors[key]
        if lora is None:
            raise ValueError(f"{path}: DoRA magnitude {key!r} has no lora_A/lora_B pair")
        if tuple(magnitude.shape) != (lora.out_features,) or magnitude.dtype not in FLOAT_DTYPES:
            raise ValueError(
                f"{path}: DoRA magnitude {key!r} must be a float vector of {lora.out_features} entries, got "
                f"{magnitude.dtype} {tuple(magnitude.shape)}"
            )
        if not torch.isfinite(magnitude).all():
            raise ValueError(f"{path}: DoRA magnitude {key!r} contains NaN or Inf")
        magnitudes.setdefault(component, {})[module] = magnitude
    check_names(path, adapter)
    return AdapterFile(path, "diffusers", adapter, header=header, magnitudes=magnitudes)
