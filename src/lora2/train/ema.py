"""EMA of the adapter weights (``--ema-decay D``): θ_ema ← D · θ_ema + (1 − D) · θ after every optimizer step.

One average per adapter tensor (the backend's ``state()``: LoRA²'s A, B and log ν; DoRA's A, B and magnitudes). When
LoRA² changes a layer's rank the average follows like optimizer state (``lora2.lora.optim``): surviving positions
keep their average, dropped positions are dropped, and positions that become active (the rank grew) start from the
live weights, which are fresh there. D itself (the rank) is the live one: the EMA averages weights, not ranks.
Samples, validation images and the exported files use the EMA (``applied`` swaps it in and the live weights back);
checkpoints hold it (``ema.safetensors``) and a resumed run continues the same average.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lora2.train.adapters.base import AdapterBackend
from lora2.train.checkpoint import load_ema

logger = logging.getLogger(__name__)


def _resized(average: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """The average re-allocated like ``live``: the overlap kept, positions outside it taken from ``live``."""
    out = live.detach().clone()
    overlap = tuple(slice(0, min(a, b)) for a, b in zip(average.shape, live.shape))
    out[overlap] = average[overlap]
    return out


class AdapterEMA:
    """The running average of one run's adapter tensors, keyed like ``AdapterBackend.state()``."""

    def __init__(self, decay: float, backend: AdapterBackend, saved: dict[str, torch.Tensor] | None = None) -> None:
        self.decay = decay
        self.backend = backend
        live = backend.state()
        if saved is not None and set(saved) != set(live):
            raise ValueError("the checkpoint's EMA does not match the adapter's tensors (saved by another run?)")
        source = saved if saved is not None else live
        self.average = {key: source[key].to(value.device, torch.float32).clone() for key, value in live.items()}
        self.ranks = backend.ranks()

    @torch.no_grad()
    def update(self) -> None:
        """One EMA step after the optimizer step (and after the ranks followed ν)."""
        live, ranks = self.backend.state(), self.backend.ranks()
        for key, value in live.items():
            if self.average[key].shape != value.shape:  # the layer re-allocated its storage
                self.average[key] = _resized(self.average[key], value)
        for key, (module, axis) in self.backend.rank_axes().items():
            old, new = self.ranks[module], ranks[module]
            if new > old:
                self.average[key].narrow(axis, old, new - old).copy_(live[key].narrow(axis, old, new - old))
        keys = list(live)
        torch._foreach_lerp_([self.average[key] for key in keys], [live[key].float() for key in keys], 1 - self.decay)
        self.ranks = ranks

    @contextmanager
    def applied(self) -> Iterator[None]:
        """The adapter holds the EMA inside the block, its live weights again after it."""
        state = self.backend.state()
        saved = {key: value.clone() for key, value in state.items()}
        with torch.no_grad():
            for key, value in state.items():
                value.copy_(self.average[key])
        try:
            yield
        finally:
            with torch.no_grad():
                for key, value in state.items():
                    value.copy_(saved[key])


def start_ema(decay: float, backend: AdapterBackend, checkpoint: Path | None) -> AdapterEMA | None:
    """The run's EMA (None when ``decay`` is 0): the checkpoint's when resuming, else the live weights."""
    if not decay:
        return None
    saved = load_ema(checkpoint) if checkpoint is not None else None
    if checkpoint is not None and saved is None:
        logger.warning("checkpoint %s holds no EMA (--ema-decay was off): the EMA starts from its weights", checkpoint)
    return AdapterEMA(decay, backend, saved)
