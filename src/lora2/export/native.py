"""The lora2-native file: the unbaked LoRA² state, for exact resumption of training.

Standard files (diffusers, kohya, peft) hold ``up = s · B Λ``; ``load_lora`` recovers B = up / (s·λ) from the ν in
the header, which reproduces ΔW and the ranks exactly but B only up to one fp32 rounding. The native file holds
``<component>.<module>.lora_A`` (A[:D], D × d_in[×kh×kw]), ``.lora_B`` (B[:, :D]) and ``.log_nu`` (scalar) as
trained, plus the ``lora2`` header, so a resumed run starts bit-identical. Other tools cannot read it; ``lora2``
tools treat it as the LoRA pair (A, s·BΛ).
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import torch

from lora2.export.adapter import FLOAT_DTYPES, Adapter, AdapterFile, LoraModule, check_module, check_shapes
from lora2.export.names import check_names
from lora2.lora.config import LoRA2Config
from lora2.lora.layer import bake_up, scaled_importance

SUFFIXES = (".lora_A", ".lora_B", ".log_nu")


def to_state_dict(raw: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]) -> dict:
    tensors = {}
    for component, modules in raw.items():
        for name, (a, b, log_nu) in modules.items():
            tensors[f"{component}.{name}.lora_A"] = a.float()  # (D, d_in[, kh, kw])
            tensors[f"{component}.{name}.lora_B"] = b.float()  # (d_out, D[, 1, 1])
            tensors[f"{component}.{name}.log_nu"] = log_nu.float().reshape(())
    return tensors


def from_state_dict(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str], lora2: dict) -> AdapterFile:
    """Read a native file; the ``adapter`` view bakes s·Λ into ``up`` with the stored config."""
    groups: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    for key, value in tensors.items():
        for suffix in SUFFIXES:
            if key.endswith(suffix):
                groups[key[: -len(suffix)]][suffix] = value
                break
        else:
            raise ValueError(f"{path}: unsupported key {key!r} in a lora2-native file")
    adapter: Adapter = {}
    raw: dict = {}
    for stem, parts in sorted(groups.items()):
        component, _, name = stem.partition(".")
        where = f"{path}: module {name!r} of {component!r}"
        info = lora2["components"].get(component)
        if info is None or name not in info.get("modules", {}) or "config" not in info:
            raise ValueError(f"{where}: not described in the lora2 header")
        missing = [s.lstrip(".") for s in SUFFIXES if s not in parts]
        if missing:
            raise ValueError(f"{where}: {missing} missing")
        a, b, log_nu = parts[".lora_A"], parts[".lora_B"], parts[".log_nu"]
        check_shapes(LoraModule(a, b), where)
        if log_nu.numel() != 1 or log_nu.dtype not in FLOAT_DTYPES or not torch.isfinite(log_nu).all():
            raise ValueError(f"{where}: log_nu must be one finite float, got {log_nu.dtype} {tuple(log_nu.shape)}")
        config = header_config(path, component, info)
        up = bake_up(b.double(), scaled_importance(log_nu.double(), a.shape[0], config))  # (d_out, D[, 1, 1])
        module = LoraModule(a, up.float())
        check_module(module, where)
        adapter.setdefault(component, {})[name] = module
        raw.setdefault(component, {})[name] = (a, b, log_nu.reshape(()))
    check_names(path, adapter)
    return AdapterFile(path, "lora2", adapter, lora2=lora2, raw=raw, header=header)


def header_config(path: Path, component: str, info: dict) -> LoRA2Config:
    """The LoRA2Config stored for a component in a lora2 header; ValueError naming the file if it is unusable."""
    try:
        config = LoRA2Config.from_dict(info["config"])
        if not math.isfinite(config.scaling):
            raise ValueError(f"scale {config.scaling} is not finite")
        return config
    except (TypeError, ValueError, AttributeError, ZeroDivisionError) as error:
        raise ValueError(
            f"{path}: component {component!r}: unusable LoRA2Config in the lora2 header ({error})"
        ) from error
