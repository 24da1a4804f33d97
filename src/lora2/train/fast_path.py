"""The UNet of a training step, run eagerly or replayed from CUDA graphs (``--compile graphs``).

At batch 1 an SDXL LoRA step is bound by kernel launches, not by the GPU (docs/PERFORMANCE.md): thousands of small
kernels, each launched from Python. ``torch.cuda.make_graphed_callables`` records the UNet's forward and its backward
once and replays each as one launch. What stays eager is small: noise, the loss and regularization terms, the
optimizer, LoRA²'s rank update.

A captured graph reads the memory it read at capture. It stays valid while
- the adapters' storage is the same tensors: LoRA² re-allocates ``lora_A``/``lora_B`` when a rank outgrows its
  storage (a rank change within the storage rewrites the Λ layout's mask in place, ``lora2.lora.layer._layout``);
- the inputs keep their shapes, dtypes and ``requires_grad`` (one training size, text-encoder training on or off);
- the same batch rows carry the identifier (the entropy term reads them on the host).
A change of any of these re-captures, once. LoRA² layers keep ``HEADROOM`` × D spare positions so that re-allocations
are rare (capacity costs memory and FLOPs only: positions beyond D are masked), and every capture first tops up the
layers that are close to full, so that growth across many layers costs few re-captures.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from lora2.lora.model import layers_of
from lora2.lora.optim import rebind_parameters

if TYPE_CHECKING:  # the entropy module imports diffusers, config imports this module (COMPILE_MODES)
    from lora2.train.config import TrainConfig
    from lora2.train.entropy import EntropyCollector

logger = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "none", "graphs")
HEADROOM = 0.5  # spare storage beyond D, as a fraction of D, while graphs are on
TOP_UP = 0.5  # at a capture, layers with fewer than TOP_UP × HEADROOM × D spare positions get their headroom back


def _free_cached_memory() -> None:
    """A graphed module refers to itself (its forward is a closure over it): only the cycle collector frees a
    dropped graph, and only ``empty_cache`` returns its pool and freed blocks to the driver."""
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def resolve_mode(mode: str, device: torch.device) -> str:
    """The mode a run uses: ``auto`` is ``graphs`` on CUDA and ``none`` elsewhere; ``graphs`` needs CUDA."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "graphs" and device.type != "cuda":
        raise ValueError(f"--compile graphs needs a CUDA device, got {device.type!r}; use --compile none")
    if mode == "auto":
        return "graphs" if device.type == "cuda" else "none"
    return mode


def unverified(config: TrainConfig, world_size: int) -> list[str]:
    """The options of a run that the fast path has not been verified with on a GPU (docs/PERFORMANCE.md, "The fast
    path"): ``--compile auto`` runs those eagerly, ``--compile graphs`` tries them (and falls back if capture fails).
    Verified: LoRA² adaptive and fixed rank, bf16, one process, batch of one size, gradient checkpointing, the
    entropy term, prior preservation, text-encoder LoRA, SDXL / KOALA-700m / SD 1.5."""
    found = {
        f"adapter_type {config.adapter_type}": config.adapter_type != "lora2",
        f"mixed_precision {config.mixed_precision}": config.mixed_precision != "bf16",
        f"gradient_accumulation_steps {config.gradient_accumulation_steps}": config.gradient_accumulation_steps > 1,
        f"{world_size} processes": world_size > 1,
    }
    return [name for name, on in found.items() if on]


class UNetCall(nn.Module):
    """The UNet as a function of tensors only: (sample, timesteps, embeds, *added values) → prediction, or
    (prediction, entropy) with the entropy term (a graph returns what the loss needs as outputs)."""

    def __init__(
        self, unet: nn.Module, added_keys: tuple[str, ...], collector: EntropyCollector | None, rows: torch.Tensor
    ) -> None:
        super().__init__()
        self.unet = unet
        self.added_keys = added_keys
        self.collector = collector
        self.rows = rows

    def forward(self, sample, timesteps, embeds, *added):
        if self.collector is not None:
            self.collector.start(self.rows)  # this forward's values only (capture runs warm-up forwards first)
        cond = dict(zip(self.added_keys, added)) if self.added_keys else None
        prediction = self.unet(sample, timesteps, embeds, added_cond_kwargs=cond).sample  # (B, C, h, w)
        if self.collector is None:
            return prediction
        return prediction, self.collector.loss()


@dataclass
class Graph:
    """One capture: what it is valid for, and the graphed callable."""

    key: tuple
    function: Callable


class UNetRunner:
    """Runs the UNet of each micro-batch: ``__call__`` gives (prediction, entropy or None); ``after_backward`` once its
    backward ran. With ``mode="graphs"`` it replays CUDA graphs and re-captures when their inputs change; a capture
    that fails falls back to eager for the rest of the run, saying why. ``capture`` stands in for
    ``torch.cuda.make_graphed_callables`` (tests)."""

    def __init__(
        self,
        unet: nn.Module,
        collector: EntropyCollector | None,
        mode: str,
        autocast: dict,
        optimizer: torch.optim.Optimizer,
        capture: Callable | None = None,
    ) -> None:
        self.unet, self.collector, self.mode, self.optimizer = unet, collector, mode, optimizer
        self.eager_autocast = torch.autocast(**autocast)
        self.graph_autocast = torch.autocast(**autocast, cache_enabled=False)  # graph capture allows no cache
        self.capture = capture or torch.cuda.make_graphed_callables
        self.graph: Graph | None = None
        self.captures: list[dict] = []  # {"step", "reason", "seconds"} per capture
        self.fallback: str | None = None
        self.step = 0
        self.layers = [layer for layer in layers_of(unet) if layer.adaptive]
        if mode == "graphs":
            for layer in self.layers:
                layer.headroom = HEADROOM

    @property
    def graphs(self) -> bool:
        """Graphs are in use (not ``none``, and no fallback happened)."""
        return self.mode == "graphs" and self.fallback is None

    def disable(self, reason: str) -> None:
        """Run eagerly from now on, saying why (a combination the fast path does not cover)."""
        if self.graphs:
            logger.warning("--compile graphs: running eager: %s", reason)
            self.fallback, self.graph = reason, None
            _free_cached_memory()  # what a failed capture left behind

    def __call__(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: torch.Tensor,
        added: dict | None,
        rows: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The prediction (B, C, h, w) and the entropy term (0-d, None without it) of one micro-batch; ``rows``
        (B,) bool: the batch rows whose prompt holds the identifier."""
        added = added or {}
        inputs = (sample, timesteps, embeds, *added.values())
        if self.graphs:
            try:
                outputs = self._replay(tuple(added), inputs, rows)
            except (RuntimeError, AssertionError) as error:  # a kernel or an op that cannot be captured
                self.disable(f"capturing the UNet failed ({type(error).__name__}: {str(error).splitlines()[0]})")
            else:
                return outputs if self.collector is not None else (outputs, None)
        with self.eager_autocast:
            outputs = UNetCall(self.unet, tuple(added), self.collector, rows)(*inputs)
        return outputs if self.collector is not None else (outputs, None)

    def after_backward(self) -> None:
        """Eager: the entropy collector stops after the backward (gradient checkpointing recomputes through it)."""
        self.step += 1
        if self.collector is not None:
            self.collector.stop()

    def prepare_gradients(self, parameters: list[nn.Parameter]) -> None:
        """Before a graphed backward that accumulates (several micro-batches): gradients must exist, or autograd
        would adopt the graph's static gradient buffers as ``.grad`` and the next replay would overwrite them."""
        if self.graphs:
            for param in parameters:
                if param.grad is None:
                    param.grad = torch.zeros_like(param)

    # ------------------------------------------------------------------ graphs
    def _key(self, inputs: tuple[torch.Tensor, ...], rows: torch.Tensor) -> tuple:
        # re-allocated parameters are new objects; the captured graph keeps the old ones alive, so ids are not reused
        storage = tuple((id(layer.lora_A), id(layer.lora_B)) for layer in self.layers)
        shapes = tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in inputs)
        return storage, shapes, tuple(rows.tolist()) if self.collector is not None else ()

    def _replay(self, added_keys: tuple[str, ...], inputs: tuple[torch.Tensor, ...], rows: torch.Tensor):
        key = self._key(inputs, rows)
        if self.graph is None or self.graph.key != key:
            call = UNetCall(self.unet, added_keys, self.collector, rows)  # a fresh module: it is graphed in place
            self._capture(call, inputs, rows, self._reason(key))
        with self.graph_autocast:
            return self.graph.function(*inputs)

    def _reason(self, key: tuple) -> str:
        if self.graph is None:
            return "first step"
        old = self.graph.key
        reasons = [name for name, a, b in zip(("storage re-allocated", "input shapes", "identifier rows"), old, key)
                   if a != b]  # fmt: skip
        return ", ".join(reasons)

    def _capture(self, call: UNetCall, inputs: tuple[torch.Tensor, ...], rows: torch.Tensor, reason: str) -> None:
        self.release()
        self._top_up()
        static = tuple(t.detach().clone().requires_grad_(t.requires_grad) for t in inputs)  # the graph's own inputs
        start = time.perf_counter()
        try:
            with self.graph_autocast:
                # make_graphed_callables warms up (lazy initialisation, the Λ layout of new storage) before capturing
                function = self.capture(call, static, num_warmup_iters=1 if self.captures else 3,
                                        allow_unused_input=True)  # fmt: skip
        finally:
            if self.collector is not None:
                self.collector.stop()
        seconds = time.perf_counter() - start
        self.graph = Graph(self._key(inputs, rows), function)
        self.captures.append({"step": self.step, "reason": reason, "seconds": round(seconds, 3)})
        logger.info("CUDA graphs: captured the UNet at micro-step %d (%s) in %.1f s; %d captures",
                    self.step, reason, seconds, len(self.captures))  # fmt: skip

    def _top_up(self) -> None:
        """Give layers close to full their headroom back, in one go (each re-allocation would cost a capture)."""
        where = None
        for layer in self.layers:
            replaced = layer.reserve(math.ceil(TOP_UP * HEADROOM * layer.r))
            if replaced:
                if where is None:
                    groups = self.optimizer.param_groups
                    where = {id(p): (g["params"], i) for g in groups for i, p in enumerate(g["params"])}
                rebind_parameters(self.optimizer, replaced, where)

    def release(self) -> None:
        """Free the graph and its memory pool (before a re-capture, and after the last step)."""
        if self.graph is not None:
            self.graph = None
            _free_cached_memory()

    def summary(self) -> dict:
        """Captures of this run (count, seconds, each one's micro-step and reason) and the fallback, if any."""
        return {
            "mode": "graphs" if self.mode == "graphs" else "none",
            "captures": len(self.captures),
            "capture_seconds": round(sum(c["seconds"] for c in self.captures), 3),
            "fallback": self.fallback,
            "log": self.captures,
        }
