"""Writing the result of a tool: the input's format (native → diffusers) and a lora2 header with the new ranks."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lora2.export.adapter import Adapter, AdapterFile
from lora2.export.formats import planned_files, write_adapter
from lora2.export.metadata import build_header
from lora2.export.sgm import UNetLayout

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def output_format(inputs: list[AdapterFile], fmt: str | None) -> str:
    """The requested format, else the first input's (a lora2-native input gives diffusers)."""
    if fmt is not None:
        return fmt
    return "diffusers" if inputs[0].format == "lora2" else inputs[0].format


def check_not_inputs(targets: list[Path], inputs: list[AdapterFile], out: str | Path) -> None:
    """ValueError when an output file would replace an input file or land inside an input (peft) directory,
    comparing resolved paths (symbolic links and ``..`` followed)."""
    sources = [Path(file.path).resolve() for file in inputs]
    for target in targets:
        resolved = target.resolve()
        for source in sources:
            if resolved == source or source in resolved.parents:
                raise ValueError(
                    f"--out {out}: writing {target} would overwrite the input {source}; choose another --out"
                )


def input_layout(inputs: list[AdapterFile]) -> UNetLayout | None:
    """The UNet layout the inputs agree on (from their lora2 headers or SGM names); ValueError if they differ."""
    layouts = {file.layout: file.path for file in inputs if file.layout is not None}
    if len(layouts) > 1:
        paths = ", ".join(str(path) for path in layouts.values())
        raise ValueError(f"the inputs are adapters of UNets with different block layouts: {paths}")
    return next(iter(layouts), None)


def write_result(
    adapter: Adapter, out: str | Path, fmt: str, inputs: list[AdapterFile], step: dict, dtype: str = "fp32"
) -> Path:
    """Write ``adapter`` with a lora2 header: ranks per module, the inputs' training settings, the history."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    check_not_inputs(planned_files(adapter, out, fmt), inputs, out)
    first = inputs[0].lora2 or {}
    components = {
        component: {"modules": {name: {"rank": module.rank} for name, module in modules.items()}}
        for component, modules in adapter.items()
    }
    layout = input_layout(inputs)
    if layout is not None and "unet" in components:
        components["unet"]["layout"] = layout.to_dict()
    history = list(first.get("history", [])) + [step]
    header = build_header(fmt, components, first.get("training"), history)
    written = write_adapter(adapter, out, fmt, header, DTYPES[dtype], layout)
    logger.info("wrote %s (%s format)", written, fmt)
    return written
