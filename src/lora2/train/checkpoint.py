"""Training checkpoints: safetensors + JSON only, written atomically, restored exactly.

A checkpoint is a folder ``checkpoint-<step>`` holding

- ``adapter.safetensors``: every LoRA² layer's full storage (``<prefix>.<module>.lora_A`` / ``lora_B`` at their
  current capacity, ``log_nu``), so resumed layers get the very same storage, stale positions included; for the
  peft baselines (DoRA, AdaLoRA) every adapter parameter, ``<prefix>.<peft parameter name>``;
- ``optimizer.safetensors`` + ``state.json``: optimizer tensors and, in JSON, param groups, non-tensor optimizer
  state, LR-scheduler and grad-scaler state, ranks, step and data position, the training config;
- ``rng.safetensors``: the torch RNG states of every process (global CPU, CUDA, and the trainer's generator).

The folder is written as ``checkpoint-<step>.tmp`` and renamed into place only when complete (``os.replace``), and
older checkpoints are deleted only after that, so a crash mid-write never destroys the previous checkpoint.
Resuming re-allocates each layer to the saved capacity *before* ``optimizer.load_state_dict`` (the optimizer is
built over the restored parameters), so per-parameter state lines up with the parameters.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lora2.lora.model import lora_layers
from lora2.train.peft_adapters import adapter_parameters, has_peft_adapter, peft_ranks

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")


def _fsync_dir(path: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file through a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def atomic_save_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.save_file`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders of interrupted writes are ignored)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / "state.json").is_file()]


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint folder named by ``--resume``: "latest" (None when the run has none yet, as in diffusers'
    scripts: training starts afresh) or a path (``ValueError`` when it is not a complete checkpoint)."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").is_file():
        raise ValueError(f"--resume {resume}: not a complete checkpoint folder (no state.json)")
    return path


# ---------------------------------------------------------------------- adapter storage
def adapter_tensors(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """Full storage of every LoRA² layer, keyed ``<prefix>.<module>.<lora_A|lora_B|log_nu>`` (peft adapters: every
    adapter parameter, ``<prefix>.<parameter name>``)."""
    tensors = {}
    for prefix, module in modules.items():
        if has_peft_adapter(module):
            tensors.update({f"{prefix}.{key}": value.detach() for key, value in adapter_parameters(module).items()})
        for name, layer in lora_layers(module):
            for key in ("lora_A", "lora_B", "log_nu"):
                tensors[f"{prefix}.{name}.{key}"] = getattr(layer, key).detach()
    return tensors


def adapter_ranks(modules: dict[str, nn.Module]) -> dict[str, int]:
    """Current rank of every layer keyed ``<prefix>.<module>`` (peft adapters: ``peft_adapters.peft_ranks``)."""
    ranks = {}
    for prefix, module in modules.items():
        found = peft_ranks(module) if has_peft_adapter(module) else {n: layer.r for n, layer in lora_layers(module)}
        ranks.update({f"{prefix}.{name}": rank for name, rank in found.items()})
    return ranks


@torch.no_grad()
def restore_adapter(modules: dict[str, nn.Module], tensors: dict[str, torch.Tensor], ranks: dict[str, int]) -> None:
    """Re-allocate every layer to its saved capacity and copy its storage, ν and rank back.

    ``log_nu`` is copied in place (the optimizer hook tracks that parameter object); ``lora_A``/``lora_B`` are new
    parameters of the saved shapes. ``ValueError`` names any missing or unexpected layer.
    """
    expected = set(adapter_ranks(modules))
    if set(ranks) != expected:
        missing, extra = sorted(expected - set(ranks)), sorted(set(ranks) - expected)
        raise ValueError(f"checkpoint does not match the adapted modules: missing {missing[:5]}, extra {extra[:5]}")
    for prefix, module in modules.items():
        if has_peft_adapter(module):  # fixed shapes: copied in place, the optimizer's parameters stay
            for key, param in adapter_parameters(module).items():
                if f"{prefix}.{key}" not in tensors:
                    raise ValueError(f"checkpoint has no tensor {prefix}.{key} (saved with another adapter type?)")
                param.copy_(tensors[f"{prefix}.{key}"].to(param.device, param.dtype))
        for name, layer in lora_layers(module):
            key = f"{prefix}.{name}"
            for attr in ("lora_A", "lora_B"):
                old = getattr(layer, attr)
                value = tensors[f"{key}.{attr}"].to(old.device, old.dtype)
                setattr(layer, attr, nn.Parameter(value.clone(), requires_grad=old.requires_grad))
            layer.log_nu.copy_(tensors[f"{key}.log_nu"].to(layer.log_nu.device))
            layer.r = int(ranks[key])


# ---------------------------------------------------------------------- optimizer state
def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


# ---------------------------------------------------------------------- save / load
def save_checkpoint(
    output_dir: str | Path,
    step: int,
    modules: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    scaler,
    rng_states: dict[str, torch.Tensor],
    trainer_state: dict,
    total_limit: int | None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically, then prune the oldest beyond ``total_limit``. Returns its path."""
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous().cpu() for k, v in adapter_tensors(modules).items()}, str(tmp / "adapter.safetensors"))
    opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
    save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
    save_file({k: v.contiguous().cpu() for k, v in rng_states.items()}, str(tmp / "rng.safetensors"))
    state = {
        **trainer_state,
        "step": step,
        "ranks": adapter_ranks(modules),
        "optimizer": opt_meta,
        "lr_scheduler": lr_scheduler.state_dict(),
        "grad_scaler": scaler.state_dict() if scaler is not None else {},
    }
    # state.json is written last: a folder without it is never taken for a checkpoint
    (tmp / "state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    for path in tmp.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    _fsync_dir(tmp)
    if final.exists():
        old = output_dir / f"checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(output_dir)
    if total_limit is not None:
        for stale in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(stale)
            logger.info("removed old checkpoint %s (limit %d)", stale.name, total_limit)
    logger.info("saved checkpoint %s", final)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state.json content, adapter tensors, rng tensors) of a checkpoint folder."""
    path = Path(path)
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return state, load_file(str(path / "adapter.safetensors")), load_file(str(path / "rng.safetensors"))


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load the optimizer's state (call after ``restore_adapter`` and after building the optimizer over it)."""
    tensors = load_file(str(Path(path) / "optimizer.safetensors"))
    optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
