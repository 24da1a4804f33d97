"""safetensors reading and writing with clear errors; pickles are refused and never opened."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lora2.export.keys import PICKLE_SUFFIXES

_MAX_HEADER = 100_000_000  # the safetensors limit on the JSON header


def check_safetensors(path: Path) -> None:
    """Raise ValueError unless ``path`` looks like a safetensors file (checked before any parsing).

    A safetensors file starts with an 8-byte little-endian header length n followed by n bytes of JSON; pickles
    (protocol byte 0x80), zip archives (torch.save) and text fail this check.
    """
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ValueError(f"{path}: pickle checkpoints ({path.suffix}) are refused; only safetensors files are read")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len <= min(_MAX_HEADER, size - 8) and head[8:9] == b"{":
        return
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip archive of torch.save, or a raw pickle stream
        raise ValueError(f"{path}: this is a pickle/torch.save checkpoint; only safetensors files are read")
    raise ValueError(f"{path}: not a safetensors file (bad header: declared length {header_len}, size {size})")


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors (on CPU) and the ``__metadata__`` header of a safetensors file; ValueError if it is corrupt."""
    path = Path(path)
    check_safetensors(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            header = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({error})") from error
    return tensors, header


def inside(root: Path, *parts: str) -> Path:
    """``root / parts``, refused (ValueError) unless it resolves inside ``root``: an absolute part, ``..`` or a
    symbolic link out of ``root`` never makes a writer leave its output folder."""
    target = Path(root).joinpath(*parts)
    if not target.resolve().is_relative_to(Path(root).resolve()):
        raise ValueError(f"{target}: resolves outside the output folder {root}; refusing to write there")
    return target


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], header: dict[str, str]) -> Path:
    """Write tensors (made contiguous, on CPU) with a string-valued header."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt", **header})
    return path


def parse_json_entry(path: Path, header: dict[str, str], key: str) -> dict | None:
    """The JSON object stored under ``key`` in a header, or None; ValueError naming the file if it is not JSON."""
    raw = header.get(key)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: header entry {key!r} is not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise ValueError(f"{path}: header entry {key!r} must be a JSON object, got {type(value).__name__}")
    return value
