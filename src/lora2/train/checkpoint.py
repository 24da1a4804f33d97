"""Training checkpoints: safetensors + JSON only, written atomically, restored exactly.

A checkpoint is a folder ``checkpoint-<step>`` holding

- ``adapter.safetensors``: every LoRA² layer's full storage (``<prefix>.<module>.lora_A`` / ``lora_B`` at their
  current capacity, ``log_nu``), so resumed layers get the very same storage, stale positions included; for the
  peft baselines (DoRA, AdaLoRA) every adapter parameter, ``<prefix>.<peft parameter name>``;
- ``optimizer.safetensors`` + ``state.json``: optimizer tensors and, in JSON, param groups, non-tensor optimizer
  state, LR-scheduler and grad-scaler state, ranks, step and data position, the training config, and the size and
  SHA-256 of every file of the checkpoint (checked before a resume);
- ``rng.safetensors``: the torch RNG states of every process (global CPU, CUDA, and the trainer's generator);
- ``ema.safetensors`` (``--ema-decay``): the EMA of the adapter's tensors, keyed like ``adapter.safetensors``.

The folder is written as ``checkpoint-<step>.tmp`` and renamed into place only when complete (``os.replace``), and
older checkpoints are deleted only after that, so a crash mid-write never destroys the previous checkpoint; a
checkpoint damaged later (a truncated file) fails its check and ``--resume latest`` takes the one before it.
Resuming re-allocates each layer to the saved capacity *before* ``optimizer.load_state_dict`` (the optimizer is
built over the restored parameters), so per-parameter state lines up with the parameters.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lora2.train.atomic import fsync_dir
from lora2.train.run_folder import CHECKPOINT_PREFIX

logger = logging.getLogger(__name__)

_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")
STATE_FILE = "state.json"
ADAPTER_FILE = "adapter.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
EMA_FILE = "ema.safetensors"


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or damaged (its files do not match the sizes and checksums recorded)."""


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoints of a run that were written to the end, oldest first (``.tmp`` folders of interrupted writes are
    not checkpoints; the files are checked only when one is loaded)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_FILE).is_file()]


def _file_digest(path: Path) -> dict:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 23):
            digest.update(chunk)
    return {"size": path.stat().st_size, "sha256": digest.hexdigest()}


def verify_checkpoint(path: Path) -> dict:
    """The checkpoint's state.json, after checking every file against the size and checksum it records
    (``CheckpointError`` naming the file otherwise)."""
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path / STATE_FILE}: unreadable ({error})") from error
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path / STATE_FILE}: not a lora2 checkpoint state")
    for name, expected in state.get("files", {}).items():
        file = path / name
        if not file.is_file() or _file_digest(file) != expected:
            raise CheckpointError(f"{file}: missing or damaged (size or checksum differs from {STATE_FILE})")
    return state


def resolve_resume(output_dir: str | Path, resume: str) -> Path | None:
    """The checkpoint folder named by ``--resume``: "latest" is the newest checkpoint that passes its integrity check
    (damaged ones are skipped with a warning naming them; None when there is none), a path must pass it."""
    if resume != "latest":
        path = Path(resume)
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE})")
        verify_checkpoint(path)
        return path
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verify_checkpoint(path)
        except CheckpointError as error:
            logger.warning("skipping checkpoint %s: %s", path.name, error)
            continue
        return path
    return None


# ---------------------------------------------------------------------- optimizer state
def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (for safetensors) and the JSON rest. A nested dict of tensors (bitsandbytes wraps its quantization
    state in one, which its ``load_state_dict`` also takes unwrapped) is flattened into the parameter's state."""
    tensors, scalars = {}, {}
    for index, values in state_dict["state"].items():
        nested = [key for key, value in values.items() if isinstance(value, dict)]
        values = {key: value for key, value in values.items() if key not in nested}
        for key in nested:
            values.update(state_dict["state"][index][key])
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
    adapter_state: dict[str, torch.Tensor],
    training: dict,
    optimizer: torch.optim.Optimizer,
    rng_states: dict[str, torch.Tensor],
    total_limit: int | None,
    ema_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``checkpoint-<step>`` atomically, then prune the oldest beyond ``total_limit``. Returns its path.

    ``training`` is the JSON part: ranks, LR-scheduler and grad-scaler state, config, process count, …. On an error
    while writing (disk full) the temporary folder is removed and the earlier checkpoints stay as they were.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"checkpoint-{step}.tmp"
    try:
        _write_checkpoint(tmp, adapter_state, training, optimizer, rng_states, step, ema_state)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(output_dir)
        raise OSError(
            f"cannot write checkpoint {final} ({error}); the earlier checkpoints are intact"
            + (f" (last: {kept[-1].name})" if kept else "")
        ) from error
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = output_dir / f"checkpoint-{step}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    fsync_dir(output_dir)
    if total_limit is not None:
        for stale in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(stale)
            logger.info("removed old checkpoint %s (limit %d)", stale.name, total_limit)
    logger.info("saved checkpoint %s", final)
    return final


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies of tensors that share memory with an earlier one (bitsandbytes gives every parameter's state the same
    code book): safetensors refuses shared storage."""
    seen, out = set(), {}
    for key, value in tensors.items():
        pointer = value.untyped_storage().data_ptr()
        out[key] = value.clone() if pointer in seen and value.numel() else value
        seen.add(pointer)
    return out


def _write_checkpoint(tmp: Path, adapter_state, training: dict, optimizer, rng_states, step: int, ema_state) -> None:
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    opt_tensors, opt_meta = _split_optimizer_state(optimizer.state_dict())
    parts = {ADAPTER_FILE: adapter_state, OPTIMIZER_FILE: opt_tensors, RNG_FILE: rng_states}
    if ema_state is not None:
        parts[EMA_FILE] = ema_state
    for name, tensors in parts.items():
        save_file(_unshared({k: v.detach().contiguous().cpu() for k, v in tensors.items()}), str(tmp / name))
    files = {}
    for name in parts:
        with open(tmp / name, "rb") as handle:
            os.fsync(handle.fileno())
        files[name] = _file_digest(tmp / name)
    state = {**training, "step": step, "optimizer": opt_meta, "files": files}
    # state.json is written last: a folder without it is never taken for a checkpoint
    with open(tmp / STATE_FILE, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(state, indent=1))
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(tmp)


def load_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state.json content, adapter tensors, rng tensors) of a checkpoint folder that passes its integrity check."""
    path = Path(path)
    state = verify_checkpoint(path)
    return state, load_file(str(path / ADAPTER_FILE)), load_file(str(path / RNG_FILE))


def load_ema(path: str | Path) -> dict[str, torch.Tensor] | None:
    """The EMA tensors of a checkpoint (checked with the rest by ``load_checkpoint``), or None when it has none."""
    file = Path(path) / EMA_FILE
    return load_file(str(file)) if file.is_file() else None


def load_optimizer_state(path: str | Path, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load the optimizer's state (call after the adapter is restored and the optimizer built over it)."""
    tensors = load_file(str(Path(path) / OPTIMIZER_FILE))
    optimizer.load_state_dict(_join_optimizer_state(tensors, state["optimizer"]))
