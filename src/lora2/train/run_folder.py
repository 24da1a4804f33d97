"""The run folder of ``lora2 train``: the one module that knows its layout, who owns it, and its log.

Layout (names below are the only place they are written; the trainer, ``lora2 eval``, ``lora2 bench`` and the demo
all ask this module)::

    <output_dir>/
      .lora2-run.json                   marker: this folder is lora2's, and the manifest of what lora2 wrote here
      .lora2-run.lock                   held while a trainer writes (pid, host); a stale lock is taken over
      train_config.yaml                 the run's TrainConfig (flat keys, as the flags spell them)
      log.jsonl                         one JSON record per optimizer step (losses, lr, total rank, size; per-module
                                        ranks at step 0 and whenever a rank changed)
      pytorch_lora_weights.safetensors  diffusers / peft loaders (``pipe.load_lora_weights``)
      lora_kohya.safetensors            kohya / A1111 / ComfyUI
      lora2_adapter.safetensors         unbaked LoRA² state (export format "lora2")
      peft/                             peft folder (``PeftModel.from_pretrained``)
      README.md                         model card
      rank_heatmap.png, sample_grid.png, samples/, validation/, tensorboard/
      wandb/                            Weights & Biases' local run folders (--report-to wandb)
      checkpoint-<step>/                resumable training state (``lora2.train.checkpoint``)
      class_images/                     generated prior-preservation images (a cache: kept by --overwrite)

Guarantees (docs/DESIGN.md, "what lora2 promises about your files"): a trainer starts only in a folder that is
absent, empty, or marked as lora2's; ``--overwrite`` removes only entries lora2 recorded in the manifest; two
trainers never write one folder at once (the lock).
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from lora2.export.keys import FILE_NAMES
from lora2.lockfile import HOST, LockFile

logger = logging.getLogger(__name__)

MARKER = ".lora2-run.json"
LOCK = ".lora2-run.lock"
CONFIG_FILE = "train_config.yaml"
LOG_FILE = "log.jsonl"
MODEL_CARD = "README.md"
RANK_HEATMAP = "rank_heatmap.png"
SAMPLE_GRID = "sample_grid.png"
SAMPLES_DIR = "samples"
VALIDATION_DIR = "validation"
TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"  # wandb.init(dir=<run folder>) writes here
CLASS_IMAGES_DIR = "class_images"
CHECKPOINT_PREFIX = "checkpoint-"
PEFT_DIR = "peft"
# export format → file (or folder) name inside the run folder
ADAPTER_FILES = {**FILE_NAMES, "peft": PEFT_DIR}
# the file other tools (eval, bench, generate) read: diffusers' format, which every adapter type writes
MAIN_ADAPTER = ADAPTER_FILES["diffusers"]
# every top-level name a run writes (a folder written before the marker existed is recognised by these)
LAYOUT = (
    CONFIG_FILE,
    LOG_FILE,
    MODEL_CARD,
    RANK_HEATMAP,
    SAMPLE_GRID,
    SAMPLES_DIR,
    VALIDATION_DIR,
    TENSORBOARD_DIR,
    WANDB_DIR,
    *ADAPTER_FILES.values(),
)


class RunFolderError(ValueError):
    """The output folder cannot be used as asked (not lora2's, locked, nothing to resume)."""


def _is_layout(name: str) -> bool:
    return name in LAYOUT or name.startswith(CHECKPOINT_PREFIX)


class RunFolder:
    """One training run's folder: paths, ownership (marker + manifest), the lock, and the step log."""

    def __init__(self, root: str | Path) -> None:
        if not str(root):
            raise ValueError("--output-dir is required")
        self.root = Path(root)

    # ------------------------------------------------------------------ paths
    def path(self, name: str) -> Path:
        return self.root / name

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def log_path(self) -> Path:
        return self.root / LOG_FILE

    def adapter_path(self, fmt: str) -> Path:
        """Where the adapter of export format ``fmt`` is written."""
        return self.root / ADAPTER_FILES[fmt]

    def find_adapter(self) -> Path:
        """The diffusers-format adapter of a finished run (``ValueError`` naming the folder when it has none)."""
        path = self.root / MAIN_ADAPTER
        if not path.is_file():
            raise ValueError(f"run folder {self.root} has no adapter ({MAIN_ADAPTER}); did training finish?")
        return path

    # ------------------------------------------------------------------ ownership
    @property
    def owned(self) -> bool:
        """Whether lora2 created this folder (its marker is present)."""
        return (self.root / MARKER).is_file()

    def manifest(self) -> list[str]:
        """Top-level entries lora2 wrote here (recorded as they are written)."""
        if not self.owned:
            return []
        try:
            data = json.loads((self.root / MARKER).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise RunFolderError(f"{self.root / MARKER}: unreadable run marker ({error})") from error
        return list(data.get("written", []))

    def record(self, *names: str) -> None:
        """Add top-level entry names (or fnmatch patterns such as ``checkpoint-*``) to the manifest of what lora2
        wrote here; the marker is rewritten atomically. Record a name before writing the entry."""
        written = set(self.manifest())
        if set(names) <= written:
            return
        self._write_marker(sorted(written | set(names)))

    def _write_marker(self, written: list[str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / (MARKER + ".tmp")
        tmp.write_text(json.dumps({"lora2_run": 1, "written": written}, indent=1), encoding="utf-8")
        os.replace(tmp, self.root / MARKER)

    def _is_legacy_run(self) -> bool:
        """A run folder written before the marker existed: a training config and only layout entries."""
        outputs = self.outputs()
        return (self.root / CONFIG_FILE).is_file() and all(_is_layout(p.name) for p in outputs)

    def adopt(self) -> None:
        """Mark a folder as lora2's (a resumed legacy run): record the layout entries it already holds."""
        if not self.owned:
            self._write_marker(sorted(p.name for p in self.outputs() if _is_layout(p.name)))

    def _entries(self) -> list[Path]:
        return sorted(p for p in self.root.iterdir() if p.name not in (MARKER, LOCK)) if self.root.is_dir() else []

    def outputs(self) -> list[Path]:
        """Entries other than the marker, the lock and the class-image cache."""
        return [p for p in self._entries() if p.name != CLASS_IMAGES_DIR]

    def check_new(self, overwrite: bool) -> None:
        """Refuse (before anything is written) a folder holding files lora2 did not write, or a run of lora2's when
        ``overwrite`` is off."""
        outputs = self.outputs()
        if outputs and not (self.owned or self._is_legacy_run()):
            names = ", ".join(p.name for p in outputs[:5])
            raise RunFolderError(
                f"output folder {self.root} holds files lora2 did not write ({names}): choose a new or empty folder"
            )
        if outputs and not overwrite:
            names = ", ".join(p.name for p in outputs[:5])
            raise RunFolderError(
                f"output folder {self.root} already holds a run ({names}): pass --resume latest to continue it or "
                "--overwrite to replace it"
            )

    def prepare_new(self, overwrite: bool) -> None:
        """Make the folder ready for a new run (``check_new`` first); overwrite removes manifest entries only."""
        self.check_new(overwrite)
        outputs = self.outputs()
        self.adopt()
        written = self.manifest()
        for path in outputs:
            if any(fnmatch.fnmatchcase(path.name, pattern) for pattern in written):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            else:
                logger.warning("--overwrite leaves %s in place (not written by lora2 train)", path)
        self._write_marker([name for name in written if "*" in name or (self.root / name).exists()])

    def check_resumable_without_checkpoint(self) -> None:
        """``--resume latest`` found no checkpoint: start afresh only in an absent or empty folder (diffusers'
        convention), never over the outputs of a finished run or files lora2 did not write."""
        outputs = self.outputs()
        if outputs:
            names = ", ".join(p.name for p in outputs[:5])
            whose = "a run of lora2 with no checkpoint left" if self.owned else "files lora2 did not write"
            raise RunFolderError(
                f"--resume latest: {self.root} holds {whose} ({names}) and no checkpoint to resume; "
                "pass --overwrite (without --resume) to replace a lora2 run, or choose a new folder"
            )

    # ------------------------------------------------------------------ lock
    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the folder's lock for the duration (one trainer per folder): a live holder (or one on another host,
        which cannot be checked) is a ``RunFolderError``; the lock of a process that has ended is taken over."""
        self.root.mkdir(parents=True, exist_ok=True)
        lock = LockFile(self.root / LOCK)
        holder = lock.acquire(command="lora2 train")
        if holder is not None:
            pids = [pid for pid, _ in holder.get("pids", [])]
            if holder.get("host") != HOST:
                raise RunFolderError(
                    f"{self.root} is locked by process {pids} on host {holder.get('host')}: another lora2 train may "
                    f"be writing there (remove {lock.path} if that run is gone)"
                )
            raise RunFolderError(f"{self.root} is in use by another lora2 train (process {pids}); wait for it to end")
        try:
            yield
        finally:
            lock.release()

    # ------------------------------------------------------------------ the step log
    def append_log(self, record: dict) -> None:
        with open(self.log_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def read_log(self) -> list[dict]:
        """Every record of log.jsonl; a torn last line (a crash mid-write) is dropped with a warning, a bad line
        elsewhere is a ``ValueError`` naming the file and line."""
        if not self.log_path.is_file():
            return []
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number == len(lines):
                    logger.warning("%s: dropping a torn last line (%d)", self.log_path, number)
                    break
                raise ValueError(f"{self.log_path}: line {number} is not JSON ({error})") from error
        return records

    def truncate_log(self, step: int) -> None:
        """Keep the records up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
        if not self.log_path.is_file():
            return
        keep = [record for record in self.read_log() if record.get("step", 0) <= step]
        tmp = self.log_path.with_name(LOG_FILE + ".tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in keep), encoding="utf-8")
        os.replace(tmp, self.log_path)

    def rank_history(self) -> tuple[list[int], list[dict[str, int]]]:
        """(steps, ranks per module) at every logged step; steps that logged no ranks repeat the last ones."""
        steps, history, current = [], [], None
        for record in self.read_log():
            current = record.get("ranks", current)
            if current is not None:
                steps.append(record["step"])
                history.append(current)
        return steps, history


def read_run_config(run: str | Path) -> dict:
    """The training config saved in a run folder, as a flat dict (``ValueError`` naming the folder otherwise)."""
    import yaml

    path = Path(run) / CONFIG_FILE
    if not Path(run).is_dir():
        raise ValueError(f"run folder not found: {run}")
    if not path.is_file():
        raise ValueError(f"run folder {run} has no training config ({CONFIG_FILE})")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values")
    return data
