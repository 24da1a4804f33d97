"""Fuzz over adapter files: random keys, headers, shapes, dtypes, values, truncations and hostile component / module
names. inspect, resize, merge and load_lora raise nothing but ValueError / FileNotFoundError, with one line naming
the file (or the output), and write nothing outside ``--out``; what they write reads back.

A seeded generator with a fixed number of cases (hypothesis is not a dependency of the project).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lora2
from lora2.export import read_adapter
from lora2.tools import inspect_file
from lora2.tools.merge import MergeSpec, merge_files
from lora2.tools.resize import ResizeSpec, resize_file

CASES = 400
HOSTILE = ["{elsewhere}", "../escape", "a/b", "a\\b", "..", "", ".x", "x.", "a..b", "a b", "é", "\x00", "~"]
SUFFIXES = [".lora_A.weight", ".lora_B.weight", ".alpha", ".lora_magnitude_vector", ".lora_down.weight",
            ".lora_up.weight", ".lora_A", ".lora_B", ".log_nu", ".lora_A.default.weight", ".weight", ""]  # fmt: skip
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.int64, torch.uint8,
          torch.bool, torch.float8_e4m3fn]  # fmt: skip
JSON_VALUES = [None, 1, -1, 0, 2.5, float("nan"), 1e308, "x", "8", [], [1, "a"], {}, {"a": 1}, True]
BASES = [(fmt, lora2_header) for fmt in ("diffusers", "kohya", "peft", "lora2") for lora2_header in (True, False)]


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.proj = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[tuple[str, bool], Path]:
    """A valid adapter of ``Toy`` (ranks 1, 2, 3) in every format, with and without the lora2 header."""
    torch.manual_seed(0)
    model = Toy()
    lora2.inject(model, lora2.LoRA2Config(target_modules=["conv", "proj", "out"], init_rank=2, max_rank=8))
    with torch.no_grad():
        for index, (_, layer) in enumerate(lora2.lora_layers(model)):
            layer.set_rank(index + 1)
            layer.lora_B.normal_(0, 0.5)
    root = tmp_path_factory.mktemp("bases")
    made = {}
    for fmt, header in BASES:
        path = root / f"{fmt}-{header}" / ("peft" if fmt == "peft" else "in.safetensors")
        made[(fmt, header)] = lora2.save_lora(model, path, format=fmt)
        if not header:
            weights = path / "adapter_model.safetensors" if fmt == "peft" else path
            tensors, _ = _load(weights)
            save_file(tensors, str(weights))
    return made


def _load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def _hostile(rng: random.Random, elsewhere: Path) -> str:
    return rng.choice(HOSTILE).format(elsewhere=elsewhere)


def _tensor(rng: random.Random, like: torch.Tensor) -> torch.Tensor:
    """``like`` with another shape, dtype or spoiled values."""
    what = rng.choice(["shape", "dtype", "nan", "inf", "huge", "scalar"])
    if what == "shape":
        shape = [rng.choice([0, 1, 2, 3, 8, 16]) for _ in range(rng.choice([1, 2, 3, 4]))]
        return torch.randn(shape)
    if what == "dtype":
        return like.to(rng.choice(DTYPES))
    if what == "scalar":
        return torch.tensor(rng.choice([0.0, 2.0, float("nan")]))
    spoiled = like.clone().float()
    if spoiled.numel():
        spoiled.view(-1)[rng.randrange(spoiled.numel())] = {"nan": float("nan"), "inf": float("inf"), "huge": 1e30}[
            what
        ]
    return spoiled * (1e30 if what == "huge" else 1)


def _mutate_header(rng: random.Random, header: dict[str, str], elsewhere: Path) -> None:
    key = rng.choice(["lora2", "lora_adapter_metadata"])
    if rng.random() < 0.15:
        header[key] = rng.choice(["{not json", "[]", "3", '"x"'])
        return
    try:
        entry = json.loads(header.get(key, "{}"))
    except json.JSONDecodeError:
        entry = {}
    entry = entry if isinstance(entry, dict) else {}
    if key == "lora_adapter_metadata":
        field = rng.choice(["unet.r", "unet.lora_alpha", "unet.alpha_pattern", "unet.use_rslora", "r", "lora_alpha"])
        entry[field] = rng.choice(JSON_VALUES + [{"proj": "a"}, {"(unclosed": 2}, {"proj": 4}])
    elif not isinstance(entry.get("components"), dict) or not entry["components"] or rng.random() < 0.1:
        entry[rng.choice(["lora2_header", "components", "format"])] = rng.choice(JSON_VALUES + ["lora2"])
    else:
        component = rng.choice(list(entry["components"]))
        info = entry["components"][component]
        where = rng.choice(["rename component", "rename module", "module field", "config", "info"])
        if where == "rename component":
            entry["components"][_hostile(rng, elsewhere)] = entry["components"].pop(component)
        elif where == "info":
            entry["components"][component] = rng.choice(JSON_VALUES)
        elif where == "config":
            info["config"] = rng.choice(
                JSON_VALUES + [{"init_rank": "x"}, {"bogus": 1}, {"lora_alpha": "a"}, {"lora_alpha": 1e308}]
            )
        elif isinstance(info, dict) and isinstance(info.get("modules"), dict) and info["modules"]:
            module = rng.choice(list(info["modules"]))
            if where == "rename module":
                info["modules"][_hostile(rng, elsewhere)] = info["modules"].pop(module)
            else:
                info["modules"][module] = {"rank": rng.choice(JSON_VALUES), "log_nu": rng.choice(JSON_VALUES)}
    header[key] = json.dumps(entry)


def _mutate_tensors(rng: random.Random, tensors: dict, elsewhere: Path) -> dict:
    key = rng.choice(sorted(tensors))
    what = rng.choice(["rename", "rename", "tensor", "tensor", "drop", "junk"])
    if what == "rename":  # a hostile component or module name in place of one part of the key
        parts = key.split(".")
        index = rng.randrange(max(1, len(parts) - 2))
        parts[index] = _hostile(rng, elsewhere)
        tensors[".".join(parts)] = tensors.pop(key)
    elif what == "tensor":
        tensors[key] = _tensor(rng, tensors[key])
    elif what == "drop" and len(tensors) > 1:
        del tensors[key]
    else:
        tensors[key.rsplit(".", 2)[0] + rng.choice(SUFFIXES)] = torch.randn(2, 8)
    return tensors


def _relocate(rng: random.Random, tensors: dict, header: dict[str, str], elsewhere: Path) -> None:
    """Move one module of "unet" to a hostile component, in the keys and in the lora2 header alike (the issue's
    file: its keys and header name an absolute folder as component)."""
    stems = sorted({key.rsplit(".lora_", 1)[0] for key in tensors if key.startswith("unet.")})
    if not stems:
        return
    stem, component = rng.choice(stems), rng.choice([str(elsewhere), "../escape", "..", "unet/../../escape"])
    for key in [k for k in tensors if k.startswith(stem + ".")]:
        tensors[component + key.removeprefix("unet")] = tensors.pop(key)
    try:
        entry = json.loads(header["lora2"])
        unet = entry["components"]["unet"]
        module = stem.removeprefix("unet.")
        entry["components"][component] = {**unet, "modules": {module: unet["modules"][module]}}
    except (KeyError, TypeError, ValueError):
        return
    header["lora2"] = json.dumps(entry)


def _adapter(rng: random.Random, bases: dict, root: Path, elsewhere: Path) -> Path:
    """A valid adapter of a random format, copied under ``root``, then 0–3 random mutations."""
    if rng.random() < 0.04:
        path = root / "in.safetensors"
        path.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randrange(40))))
        return path
    source = bases[rng.choice(BASES)]
    path = root / source.name
    shutil.copytree(source, path) if source.is_dir() else shutil.copy(source, path)
    weights = path / "adapter_model.safetensors" if path.is_dir() else path
    tensors, header = _load(weights)
    for _ in range(rng.choice([0, 1, 1, 2, 3])):
        what = rng.random()
        if what < 0.15:
            _relocate(rng, tensors, header, elsewhere)
        elif what < 0.45:
            tensors = _mutate_tensors(rng, tensors, elsewhere)
        elif what < 0.85:
            _mutate_header(rng, header, elsewhere)
        elif path.is_dir():
            config = path / "adapter_config.json"
            settings = json.loads(config.read_text())
            settings[rng.choice(["r", "lora_alpha", "alpha_pattern", "peft_type", "use_dora"])] = rng.choice(
                JSON_VALUES + ["LOHA"]
            )
            config.write_text(json.dumps(settings) if rng.random() < 0.9 else "{")
    save_file({k: v.contiguous() for k, v in tensors.items() if k}, str(weights), metadata=header)
    damage, data = rng.random(), weights.read_bytes()
    if damage < 0.05:
        weights.write_bytes(data[: rng.randrange(len(data))])  # truncated
    elif damage < 0.1:
        spot = rng.randrange(min(len(data), 300))
        weights.write_bytes(data[:spot] + bytes([rng.randrange(256)]) + data[spot + 1 :])  # one byte changed
    return path


def _files(root: Path) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names}


def _check_error(error: Exception, path: Path, out: Path, case: int) -> None:
    message = str(error)
    assert str(path) in message or str(out) in message, f"case {case}: message names no file: {message!r}"
    assert "\n" not in message, f"case {case}: message of several lines: {message!r}"


def _attempt(path: Path, out: Path, case: int, run, *args):
    try:
        return run(*args)
    except (ValueError, FileNotFoundError) as error:
        _check_error(error, path, out, case)
        return None


@pytest.mark.parametrize("block", range(4))
def test_fuzz_adapter_files(block, bases, tmp_path, monkeypatch):
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.chdir(tmp_path)
    for case in range(block * CASES // 4, (block + 1) * CASES // 4):
        rng = random.Random(case)
        root = tmp_path / f"case{case}"
        root.mkdir()
        path = _adapter(rng, bases, root, elsewhere)
        before = _files(root)
        out = root / "out"
        target, merged_file = out / "r", out / "m.safetensors"  # resize: a peft folder (one per component)
        _attempt(path, out, case, inspect_file, path)
        spec = ResizeSpec(input=str(path), out=str(target), method="fixed", param=rng.choice([1, 2]), format="peft")
        resized = _attempt(path, out, case, resize_file, spec)
        fmt = rng.choice([None, "diffusers", "kohya"])
        merge = MergeSpec(inputs=[str(path), str(path)], out=str(merged_file), weights=[0.5, -1.0], format=fmt)
        merged = _attempt(path, out, case, merge_files, merge)
        _attempt(path, out, case, lora2.load_lora, Toy(), path)
        for written in (resized[0] if resized else None, merged):
            if written is not None:
                read_adapter(written)  # what lora2 writes, lora2 reads
        for name in _files(root) - before:  # only the outputs: the resize folder's files, the merged file
            assert name == os.path.relpath(merged_file, root) or name.startswith(
                os.path.relpath(target, root) + os.sep
            ), f"case {case}: {name}"
        assert not elsewhere.exists(), f"case {case}: wrote outside --out into {elsewhere}"
    assert {name.split(os.sep)[0] for name in _files(tmp_path)} <= {f"case{c}" for c in range(CASES)}
