"""Step probe: the wall-clock time of every optimizer step of a Python process, and its CUDA memory peaks.

Put this folder on ``PYTHONPATH`` and set ``LORA2_STEP_PROBE=<path.json>``; Python imports ``sitecustomize`` at
start-up, so any program is measured without being modified (``benchmarks/full_scale.py`` measures ``lora2 train``
and the diffusers DreamBooth script this way). Without the variable this module does nothing but hand over to the
next ``sitecustomize`` on the path, if any (so an environment's own one still runs).

What is recorded (JSON, written at exit, also on SIGTERM when the program has no handler of its own):

- ``steps``: ``time.time()`` at the end of every optimizer step. A global post-step hook
  (``torch.optim.optimizer.register_optimizer_step_post_hook``) runs after the optimizer's own post-step hooks
  (LoRA²'s rank update is one), so a step ends once the parameters are updated. A step nested inside another
  (a wrapper optimizer whose ``step`` calls the inner one's) counts once. When CUDA is initialised,
  ``torch.cuda.synchronize()`` runs before the clock is read: the time is when the GPU finished the step, not when
  the host queued it. Both programs measured already wait for the GPU once per step (``loss.item()``; lora2 copies
  its loss terms to the host), so the extra wait costs at most the overlap of the optimizer's kernels with the next
  step's host work, alike for both. ``LORA2_STEP_PROBE_SYNC=0`` turns the synchronisation off.
- ``probe_loaded`` (``time.time()`` when this module ran) and ``process_start`` (from ``/proc``, when readable).
- ``max_memory_allocated`` / ``max_memory_reserved`` (bytes, ``torch.cuda``, the process's current device) at exit,
  and the same at the last step (``*_at_last_step``: the training peak, before any final sampling).
- ``exit``: "atexit" or "SIGTERM"; ``pid``, ``ppid``, ``argv``, ``rank`` (env RANK), ``cuda``.

``{pid}`` and ``{rank}`` in the path are replaced (one file per process of a launcher or of torchrun). Without
them, a process that recorded no step does not overwrite a file another process already wrote.
"""

from __future__ import annotations

import atexit
import importlib.machinery
import importlib.util
import json
import os
import signal
import sys
import time

_ENV = "LORA2_STEP_PROBE"
_HERE = os.path.dirname(os.path.abspath(__file__))


class _Probe:
    """Timestamps and memory peaks of this process."""

    def __init__(self, path_template: str) -> None:
        self.path_template = path_template
        self.sync = os.environ.get("LORA2_STEP_PROBE_SYNC", "1") != "0"
        self.loaded = time.time()
        self.steps: list[float] = []
        self.depth = 0
        self.at_last_step: dict[str, int] = {}
        self.written = False

    # ------------------------------------------------------------------ torch hooks
    def install(self, optimizer_module) -> None:
        """Register the global pre/post step hooks (called once ``torch.optim.optimizer`` is imported)."""
        optimizer_module.register_optimizer_step_pre_hook(self._pre_step)
        optimizer_module.register_optimizer_step_post_hook(self._post_step)

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self.depth += 1

    def _post_step(self, optimizer, args, kwargs) -> None:
        self.depth -= 1
        if self.depth > 0:
            return  # the inner optimizer of a wrapper: the outer step records
        torch = sys.modules["torch"]
        if torch.cuda.is_initialized():
            if self.sync:
                torch.cuda.synchronize()
            self.steps.append(time.time())
            self.at_last_step = _cuda_peaks(torch)
        else:
            self.steps.append(time.time())

    # ------------------------------------------------------------------ output
    def record(self, exit_reason: str) -> dict:
        torch = sys.modules.get("torch")
        cuda = bool(torch is not None and torch.cuda.is_initialized())
        peaks = _cuda_peaks(torch) if cuda else {}
        return {
            "pid": os.getpid(),
            "ppid": os.getppid(),
            "rank": os.environ.get("RANK"),
            "argv": sys.argv,
            "exit": exit_reason,
            "process_start": _process_start(),
            "probe_loaded": self.loaded,
            "exit_time": time.time(),
            "synchronized": self.sync,
            "cuda": cuda,
            "steps": self.steps,
            "max_memory_allocated": peaks.get("allocated"),
            "max_memory_reserved": peaks.get("reserved"),
            "max_memory_allocated_at_last_step": self.at_last_step.get("allocated"),
            "max_memory_reserved_at_last_step": self.at_last_step.get("reserved"),
        }

    def write(self, exit_reason: str) -> None:
        if self.written:
            return
        self.written = True
        templated = "{pid}" in self.path_template or "{rank}" in self.path_template
        path = self.path_template.replace("{pid}", str(os.getpid()))
        path = path.replace("{rank}", os.environ.get("RANK", "main"))
        if not templated and not self.steps and os.path.exists(path):
            return  # a launcher process: keep the file of the process that trained
        try:
            data = self.record(exit_reason)
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"
            with open(tmp, "w", encoding="utf-8") as handle:
                json.dump(data, handle)
            os.replace(tmp, path)
        except Exception as error:  # a probe never breaks the program it measures
            print(f"step probe: could not write {path}: {error}", file=sys.stderr)

    def on_sigterm(self, signum, frame) -> None:
        self.write("SIGTERM")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def _cuda_peaks(torch) -> dict[str, int]:
    """Peaks of the process's current device (each measured process trains on one GPU: torchrun's set theirs)."""
    return {"allocated": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}


def _process_start() -> float | None:
    """Start time of this process (seconds since the epoch) from /proc, or None where /proc does not tell it."""
    try:
        with open(f"/proc/{os.getpid()}/stat", encoding="utf-8") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5), counted after the ")" that ends the command name
        with open("/proc/stat", encoding="utf-8") as handle:
            boot = next(int(line.split()[1]) for line in handle if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class _InstallAfterImport:
    """Meta-path finder: once ``torch.optim.optimizer`` has been executed, register the probe's hooks on it (torch
    is not imported by the probe itself, so processes that never import torch pay nothing)."""

    target = "torch.optim.optimizer"

    def __init__(self, probe: _Probe) -> None:
        self.probe = probe

    def find_spec(self, name, path=None, target=None):
        if name != self.target:
            return None
        others = [finder for finder in sys.meta_path if finder is not self]
        for finder in others:
            spec = finder.find_spec(name, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                original = spec.loader.exec_module
                probe = self.probe

                def exec_module(module, _original=original, _probe=probe):
                    _original(module)
                    _probe.install(module)

                spec.loader.exec_module = exec_module
                return spec
        return None


def _start(path_template: str) -> None:
    probe = _Probe(path_template)
    if "torch.optim.optimizer" in sys.modules:
        probe.install(sys.modules["torch.optim.optimizer"])
    else:
        sys.meta_path.insert(0, _InstallAfterImport(probe))
    atexit.register(probe.write, "atexit")
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, probe.on_sigterm)


def _chain_next_sitecustomize() -> None:
    """Run the ``sitecustomize`` this one shadows (the next one on ``sys.path``), as Python would have."""
    others = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", others)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # as Python's site module does: report and go on
        print(f"Error in {spec.origin}: {error}", file=sys.stderr)


if os.environ.get(_ENV):
    try:
        _start(os.environ[_ENV])
    except Exception as _error:  # never break the measured program
        print(f"step probe disabled: {_error}", file=sys.stderr)
_chain_next_sitecustomize()
