"""Reproducible pretraining: each phase's step count fixed once and recorded, so that the phase can be run again step
for step (a replay) on another machine of the same kind and checked against the record as it goes.

A phase (``PhasePlan``) is given at most ``max_steps`` and a wall-clock budget. It measures its step rate until
``FIX_FRACTION`` of the budget has passed (and at least ``PROBE_STEPS`` steps ran), so that the rate includes the
load of whatever else shares the GPU; its total is then fixed to what the budget allows (never more than
``max_steps``), and its schedule's progress is ``step / total`` from there on (0 before), a function of the step
count alone. The record (``PretrainRecord``) keeps, per phase, the total, the step that fixed it and SHA-256
fingerprints of the training data, of the weights after ``PROBE_STEPS`` steps and of the final weights. A replay
takes the recorded total and step instead of measuring and stops with ``ReplayMismatch`` at the first fingerprint
that differs, after ``PROBE_STEPS`` steps if the machine computes otherwise, so a failed replay costs a minute, not
the whole phase.

Bit-identical replays need deterministic kernels (``make_deterministic``): PyTorch's deterministic algorithms, cuDNN
without autotuning, a fixed cuBLAS workspace, and the plain ("math") attention kernel, whose backward has no atomic
additions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

PROBE_STEPS = 50  # the first fingerprint's step, and the fewest steps that measure the rate
FIX_FRACTION = 0.15  # the share of a phase's budget spent measuring its rate before its total is fixed
RATE_FROM = 10  # the rate is measured from this step on: the first steps pay for compilation and allocation
DATA_STRIDE = 97  # the data fingerprint hashes every 97th image (enough to see a renderer that draws otherwise)


class ReplayMismatch(RuntimeError):
    """A replayed phase computed something other than its record says."""


def make_deterministic(device: torch.device) -> None:
    """Deterministic kernels for a replayable run on ``device`` (a no-op on the CPU, whose kernels already are).

    Sets the cuBLAS workspace (must precede the process's first cuBLAS call), PyTorch's deterministic algorithms
    (warning, not failing, on an operation that has none: the fingerprints are the judge), cuDNN without autotuning,
    and scaled-dot-product attention restricted to the math kernel.
    """
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # a safety net that costs a kernel per allocation
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


def fingerprint(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-256 (hex) of the tensors' values in order, each as contiguous fp32 bytes on the CPU."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def data_fingerprint(*datasets: torch.Tensor) -> str:
    """SHA-256 (hex) of the shapes of N×… tensors and of every ``DATA_STRIDE``-th row of each."""
    digest = hashlib.sha256()
    for data in datasets:
        digest.update(repr(tuple(data.shape)).encode())
        digest.update(data[::DATA_STRIDE].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def environment() -> dict[str, str]:
    """What a replay must match: the torch build and the device it ran on."""
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"torch": torch.__version__, "device": device}


class PhasePlan:
    """The steps of one phase (see the module docstring); iterate ``steps(weights)``, then call ``finish(weights)``.

    ``weights`` is a callable returning the tensors whose fingerprint is recorded (the trained parameters).
    """

    def __init__(self, record: PretrainRecord, name: str, max_steps: int, seconds: float) -> None:
        if max_steps < 1:
            raise ValueError(f"phase {name!r}: max_steps must be >= 1, got {max_steps}")
        self.record, self.name, self.max_steps, self.seconds = record, name, max_steps, seconds
        self.reference = record.reference_phase(name)
        self.total = None if self.reference is None else int(self.reference["total_steps"])
        self.fixed_at = None if self.reference is None else self.reference.get("fixed_at_step")
        self.entry: dict = {"max_steps": max_steps, "seconds_budget": seconds}
        record.phases[name] = self.entry
        self.start = time.monotonic()

    def check_data(self, *datasets: torch.Tensor) -> None:
        """Record (and in a replay compare) the fingerprint of the phase's training data."""
        self._check("data_fingerprint", data_fingerprint(*datasets), "its training data")

    def steps(self, weights: Callable[[], Iterable[torch.Tensor]]) -> Iterator[tuple[int, float]]:
        """Yields ``(step, progress)``: progress 0 until the total is fixed, then ``step / total``."""
        bar = tqdm(total=self.total or self.max_steps, desc=self.name, mininterval=10.0)
        step, rate_start = 0, None
        while True:
            if step == RATE_FROM:
                rate_start = time.monotonic()
            if step == PROBE_STEPS:
                self._check("probe_fingerprint", fingerprint(weights()), f"its weights after {PROBE_STEPS} steps")
            if self.reference is None and self.fixed_at is None and step >= PROBE_STEPS and self._measured_enough():
                self.fixed_at, self.total = step, self._fixed_total(step, rate_start)
                bar.total = self.total
            if step >= (self.total or self.max_steps):
                break
            yield step, 0.0 if self.fixed_at is None or step < self.fixed_at else step / self.total
            step += 1
            bar.update()
        bar.close()
        self.entry["total_steps"] = step
        self.entry["fixed_at_step"] = self.fixed_at
        self.entry["seconds"] = round(time.monotonic() - self.start, 1)

    def _measured_enough(self) -> bool:
        return math.isinf(self.seconds) or time.monotonic() - self.start >= FIX_FRACTION * self.seconds

    def _fixed_total(self, step: int, rate_start: float) -> int:
        """The total the budget allows at the rate measured from step ``RATE_FROM`` to ``step``."""
        if math.isinf(self.seconds):
            return self.max_steps
        now = time.monotonic()
        rate = (step - RATE_FROM) / max(now - rate_start, 1e-9)  # steps per second
        total = max(step, min(self.max_steps, step + int(rate * max(0.0, self.seconds - (now - self.start)))))
        logger.info("%s: %.2f steps/s over %d steps -> %d steps in all", self.name, rate, step, total)
        return total

    def finish(self, weights: Iterable[torch.Tensor]) -> None:
        """Record (and in a replay compare) the fingerprint of the phase's final weights."""
        self._check("final_fingerprint", fingerprint(weights), "its final weights")

    def _check(self, key: str, value: str, what: str) -> None:
        self.entry[key] = value
        expected = None if self.reference is None else self.reference.get(key)
        if expected is not None and expected != value:
            raise ReplayMismatch(
                f"replay of phase {self.name!r} differs from {self.record.replay_source} in {what} "
                f"({key} {value[:12]}… vs {expected[:12]}…): this machine does not compute what the recorded run did"
            )


class PretrainRecord:
    """The phases of one pretraining process (``phase`` makes each), optionally replaying a recorded run."""

    def __init__(self, replay: str | Path | None = None) -> None:
        self.phases: dict[str, dict] = {}
        self.replay_source = None if replay is None else str(replay)
        self.reference: dict | None = None
        if replay is not None:
            try:
                self.reference = json.loads(Path(replay).read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as error:
                raise ValueError(f"replay record {replay}: {error}") from error
            if not isinstance(self.reference.get("phases"), dict):
                raise ValueError(f"replay record {replay} has no 'phases' table")

    def reference_phase(self, name: str) -> dict | None:
        """The recorded phase ``name`` of a replay (None outside a replay); a replay of an unrecorded phase fails."""
        if self.reference is None:
            return None
        if name not in self.reference["phases"]:
            raise ValueError(f"replay record {self.replay_source} has no phase {name!r}")
        return self.reference["phases"][name]

    def phase(self, name: str, max_steps: int, seconds: float) -> PhasePlan:
        """The plan of phase ``name`` (its record entry is filled as it runs)."""
        return PhasePlan(self, name, max_steps, seconds)

    def to_json(self) -> dict:
        return {"environment": environment(), "replay_of": self.replay_source, "phases": self.phases}

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
