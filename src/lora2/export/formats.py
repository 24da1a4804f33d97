"""Reading any supported adapter file or directory, and writing an ``Adapter`` in any format."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lora2.export import diffusers, kohya, native, peft
from lora2.export.adapter import Adapter, AdapterFile, check_module
from lora2.export.files import inside, read_safetensors, write_safetensors
from lora2.export.keys import (
    DIRECTORY_PREFERENCE,
    FILE_NAMES,
    FORMATS,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    TOOL_FORMATS,
)
from lora2.export.metadata import header_layout, parse_header
from lora2.export.names import check_names, underscore
from lora2.export.sgm import NameTable, UNetLayout, is_sgm_name, sdxl_base_layout

PEFT_FILES = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME)

logger = logging.getLogger(__name__)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def output_path(path: str | Path, fmt: str) -> Path:
    """Where a format is written: peft → the directory ``path``; others → ``path`` if it ends in .safetensors,
    else ``path / <format's file name>``."""
    path = Path(path)
    if fmt == "peft":
        if path.suffix == ".safetensors":
            raise ValueError(f"{path}: the peft format is a directory (adapter_config.json + weights), not a file")
        return path
    return path if path.suffix == ".safetensors" else inside(path, FILE_NAMES[fmt])


def planned_files(adapter: Adapter, path: str | Path, fmt: str) -> list[Path]:
    """The files ``write_adapter`` would write (peft: config and weights of each component directory)."""
    target = output_path(path, fmt)
    if fmt != "peft":
        return [target]
    return [d / name for d in peft.component_dirs(target, adapter).values() for name in PEFT_FILES]


def write_adapter(
    adapter: Adapter,
    path: str | Path,
    fmt: str,
    header: dict[str, str],
    dtype: torch.dtype,
    layout: UNetLayout | None = None,
) -> Path:
    """Write a (non-native) adapter; ``header`` holds extra safetensors header entries (e.g. the lora2 entry).

    ``layout``: the UNet's layout; kohya files name UNet modules as kohya's trainer for it does
    (``lora2.export.kohya``). Names are checked like a file's (``names.check_names``), every module like a read one
    (finite, shapes), and the files land under ``path`` (``files.inside``); ValueError naming ``path`` otherwise,
    before anything is written.
    """
    check_format(fmt)
    if fmt == "lora2":
        raise ValueError("the lora2-native format stores training state; save it from a model with save_lora")
    if not adapter or not any(adapter.values()):
        raise ValueError(f"{path}: nothing to write (the adapter has no modules)")
    check_names(path, adapter)
    for component, modules in adapter.items():
        for name, module in modules.items():
            check_module(module, f"{path}: module {name!r} of {component!r}")
    target = output_path(path, fmt)
    try:
        if fmt == "peft":
            return peft.write(target, adapter, dtype, header)
        if fmt == "kohya":
            tensors, entries = kohya.to_state_dict(adapter, dtype, layout)
        else:
            tensors, entries = diffusers.to_state_dict(adapter, dtype)
        return write_safetensors(target, tensors, {**entries, **header})
    except OSError as error:
        raise ValueError(f"{target}: cannot write ({error})") from error
    except ValueError as error:  # a writer's limit (e.g. a component kohya has no prefix for): name the output
        raise ValueError(f"{target}: {error}") from error


def _read_file(path: Path) -> AdapterFile:
    if path.name == PEFT_WEIGHTS_NAME and (path.parent / PEFT_CONFIG_NAME).is_file():
        return peft.read(path.parent)
    tensors, header = read_safetensors(path)
    if not tensors:
        raise ValueError(f"{path}: the file holds no tensors")
    lora2 = parse_header(path, header)
    if lora2 is not None and lora2.get("format") == "lora2":
        return native.from_state_dict(path, tensors, header, lora2)
    if kohya.is_kohya(tensors):
        return kohya.from_state_dict(path, tensors, header)
    return diffusers.from_state_dict(path, tensors, header)


def _find_in_directory(path: Path) -> Path:
    for fmt in DIRECTORY_PREFERENCE:
        if fmt == "peft":
            if peft.is_peft_dir(path):
                return path
        elif (path / FILE_NAMES[fmt]).is_file():
            return path / FILE_NAMES[fmt]
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        return candidates[0]
    names = [p.name for p in path.iterdir()]
    raise ValueError(
        f"{path}: no adapter found (expected one of {list(FILE_NAMES.values())}, a peft directory, "
        f"or a single .safetensors file; found {names[:10]})"
    )


def read_adapter(path: str | Path, dora: bool = False) -> AdapterFile:
    """Read an adapter file or directory in any supported format (safetensors only; pickles are refused).

    Every file gets the same checks: safetensors content, known keys, LoRA pairs of rank >= 1 with finite float
    weights, identifier-like component and module names (``names.check_name``). ``dora``: accept DoRA magnitude
    vectors (for loading into a pipeline); without it a DoRA file is refused, since its update is not up @ down.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    try:
        file = _read(path)
    except (FileNotFoundError, ValueError):
        raise
    except OSError as error:
        raise ValueError(f"{path}: cannot read ({error})") from error
    if file.magnitudes and not dora:
        raise ValueError(
            f"{file.path}: a DoRA adapter (lora_magnitude_vector keys): its update is not up @ down, which "
            "inspect, merge, resize and load_lora work on"
        )
    logger.debug("read %s adapter %s with components %s", file.format, file.path, list(file.adapter))
    return file


def _read(path: Path) -> AdapterFile:
    if path.is_dir():
        found = _find_in_directory(path)
        file = peft.read(found) if found.is_dir() else _read_file(found)
    else:
        file = _read_file(path)
    if file.lora2 is None:
        file.lora2 = parse_header(file.path, file.header)
    file.layout = header_layout(file.path, file.lora2)
    described = list((file.lora2 or {}).get("components", {}))
    if file.format == "kohya":
        _translate_sgm_names(file)
    if file.format == "kohya" and file.lora2 is not None:
        _restore_dotted_names(file)
    if set(file.adapter) == {""} and len(described) == 1:
        file.adapter = {described[0]: file.adapter[""]}
    return file


def _translate_sgm_names(file: AdapterFile) -> None:
    """SGM-named UNet modules of a kohya file → diffusers names (kohya spelling), with the layout of the lora2 header
    or, for files of other tools, SDXL base's (the one layout kohya writes SGM names for) when it names them all."""
    modules = file.adapter.get("unet", {})
    sgm = [name for name in modules if is_sgm_name(name)]
    if not sgm:
        return
    layout = file.layout or sdxl_base_layout()
    table = NameTable(layout) if layout.has_ldm_original else None
    translated = {name: table.to_diffusers(name) for name in sgm} if table else {}
    unknown = [name for name in sgm if translated.get(name) is None]
    if unknown:
        which = "the layout in its lora2 header" if file.layout else "SDXL base's layout"
        logger.warning(
            "%s: %d SGM-named UNet module(s) do not fit %s, names kept as in the file: %s",
            file.path,
            len(unknown),
            which,
            unknown[:5],
        )
        return
    file.layout = layout
    file.adapter["unet"] = {translated.get(name, name): module for name, module in modules.items()}


def _restore_dotted_names(file: AdapterFile) -> None:
    """kohya keys lose the dots of module names; a lora2 header of the same file still has them."""
    for component, modules in file.adapter.items():
        named = file.lora2["components"].get(component, {}).get("modules", {})
        dotted = {underscore(name): name for name in named}
        file.adapter[component] = {dotted.get(name, name): module for name, module in modules.items()}


def tool_table(files: dict[str, str]) -> list[str]:
    """Markdown lines "which file for which tool" (``keys.TOOL_FORMATS``), given format → file name as written
    (e.g. {"kohya": "lora_kohya.safetensors", "diffusers": "pytorch_lora_weights.safetensors", "peft": "peft/"});
    tools whose format was not written are left out."""
    lines = ["| tool | file |", "| --- | --- |"]
    for fmt in dict.fromkeys(TOOL_FORMATS.values()):
        if fmt in files:
            tools = ", ".join(tool for tool, wanted in TOOL_FORMATS.items() if wanted == fmt)
            lines.append(f"| {tools} | `{files[fmt]}` |")
    return lines
