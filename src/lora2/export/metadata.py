"""The ``lora2`` safetensors header entry: what our loader needs to resume or analyse an adapter.

JSON object::

    {"lora2_header": 1, "version": "<lora2 version>", "format": "diffusers" | "kohya" | "peft" | "lora2",
     "components": {"<component>": {
         "config": {LoRA2Config.to_dict()} | absent (adapters made by tools: merge, resize),
         "layout": {UNetLayout.to_dict()} | absent (UNets only: the block layout that names SGM modules),
         "modules": {"<module name as in the file>": {"rank": D, "log_nu": float, "nu": float,
                                                     "adaptive": bool, "scaling": s}}}},
     "training": {settings passed to save_lora(metadata=...)},
     "history": [{"op": "merge" | "resize", ...}]}

Floats are written by ``json`` with ``repr`` and so round-trip exactly (log ν is the fp32 parameter's value).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from lora2.export.files import parse_json_entry
from lora2.export.keys import LORA2_HEADER_KEY, LORA2_HEADER_VERSION
from lora2.export.names import check_names
from lora2.export.sgm import UNetLayout


def lora2_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lora2")
    except PackageNotFoundError:
        return "unknown"


def build_header(fmt: str, components: dict, training: dict | None, history: list | None = None) -> dict[str, str]:
    """The header entry as a string map for safetensors; ValueError if ``training`` is not JSON-serialisable."""
    entry = {
        "lora2_header": LORA2_HEADER_VERSION,
        "version": lora2_version(),
        "format": fmt,
        "components": components,
        "training": training or {},
        "history": history or [],
    }
    try:
        text = json.dumps(entry, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise ValueError(f"metadata must be JSON-serialisable (str, numbers, lists, dicts): {error}") from error
    return {LORA2_HEADER_KEY: text}


def parse_header(path: Path, header: dict[str, str]) -> dict | None:
    """The parsed ``lora2`` entry of a header, or None; ValueError naming the file if it is malformed."""
    entry = parse_json_entry(path, header, LORA2_HEADER_KEY)
    if entry is None:
        return None
    if entry.get("lora2_header") != LORA2_HEADER_VERSION or not isinstance(entry.get("components"), dict):
        raise ValueError(f"{path}: unsupported lora2 header (lora2_header={entry.get('lora2_header')!r})")
    for component, info in entry["components"].items():
        modules = info.get("modules", {}) if isinstance(info, dict) else None
        if not isinstance(modules, dict) or not all(isinstance(m, dict) for m in modules.values()):
            raise ValueError(f"{path}: lora2 header: component {component!r:.100} must be an object of module objects")
        check_names(path, {component: modules})
        if "layout" in info:
            UNetLayout.from_dict(info["layout"], f"{path}: component {component!r}")
        for name, module in modules.items():
            log_nu = module.get("log_nu")
            if log_nu is not None and not (isinstance(log_nu, (int, float)) and math.isfinite(log_nu)):
                raise ValueError(f"{path}: module {name!r} of {component!r}: log_nu {log_nu!r} is not a finite number")
            rank = module.get("rank")
            if not isinstance(rank, int) or rank < 1:
                raise ValueError(f"{path}: module {name!r} of {component!r}: rank {rank!r} is not a positive integer")
    return entry


def header_layout(path: Path, entry: dict | None) -> UNetLayout | None:
    """The UNet layout stored in a parsed lora2 header entry (None if absent)."""
    for component, info in ((entry or {}).get("components") or {}).items():
        if "layout" in info:
            return UNetLayout.from_dict(info["layout"], f"{path}: component {component!r}")
    return None
