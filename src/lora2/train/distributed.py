"""Several processes (``torchrun`` / ``accelerate launch``): joining the group, averaging gradients, checking ranks,
and the RNG states a checkpoint keeps per process.

Ranks change after optimizer steps, so parameters are re-allocated during training and the UNet is not wrapped in
DDP (its reducer holds fixed parameter lists): ``GradientReducer`` averages the gradients of all trainable parameters
in buckets whose ``all_reduce`` starts during the backward, as DDP's does, and rebuilds its buckets when the
parameters change; ν, and thus every rank, stay identical on every process. The rank vectors are compared across
processes every ``rank_check_steps`` and at the end.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Processes:
    """This process's place among the training processes (one process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    created_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.created_group:
            dist.destroy_process_group()


def init_processes() -> Processes:
    """Join the process group of torchrun / accelerate launch (env WORLD_SIZE > 1), or reuse an initialised one."""
    if dist.is_available() and dist.is_initialized():
        return Processes(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return Processes(dist.get_rank(), dist.get_world_size(), created_group=True)
    return Processes()


def training_device(name: str) -> torch.device:
    """The device of this process: ``name``, or for "auto" its own GPU (LOCAL_RANK), else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # NCCL collectives of this process use its own GPU
        return device
    return torch.device("cpu")


class GradientReducer:
    """Averages gradients over processes while the backward still runs (overlap), in buckets of ~``bucket_mb``.

    Parameters are grouped into buckets in reverse order (the backward produces the last layers' gradients first).
    ``arm(params)`` before the backward of the last micro-batch registers a post-accumulate-grad hook on each
    parameter; when every gradient of a bucket has arrived, the bucket is flattened and its ``all_reduce`` starts
    asynchronously — buckets start in index order on every process, so the collectives match. ``finish()`` starts
    the buckets whose gradients never came (a missing gradient counts as zero), waits, and sets each ``.grad`` to its
    average. Re-allocated parameters (a rank change) are new objects: ``arm`` builds the buckets again when the
    parameter list changed. A sum of the same numbers in the same order: the result equals one flattened all_reduce.
    """

    def __init__(self, world_size: int, bucket_mb: float = 25.0) -> None:
        self.world_size = world_size
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.params: list[nn.Parameter] = []
        self.buckets: list[list[int]] = []
        self.handles: list = []

    def _build(self, params: list[nn.Parameter]) -> None:
        self.params = list(params)
        self.buckets, current, size = [], [], 0
        for index in reversed(range(len(params))):
            current.append(index)
            size += params[index].numel() * params[index].element_size()
            if size >= self.bucket_bytes:
                self.buckets.append(current)
                current, size = [], 0
        if current:
            self.buckets.append(current)
        self.bucket_of = {index: b for b, bucket in enumerate(self.buckets) for index in bucket}

    def arm(self, params: list[nn.Parameter]) -> None:
        """Start overlapping for the coming backward (the last micro-batch of an optimizer step)."""
        if self.world_size == 1:
            return
        if len(params) != len(self.params) or any(a is not b for a, b in zip(params, self.params)):
            self._build(params)
        self.arrived = [0] * len(self.buckets)
        self.flats: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.next_bucket = 0
        self.hooks = [
            param.register_post_accumulate_grad_hook(lambda p, i=index: self._arrived(i))
            for index, param in enumerate(self.params)
        ]

    def _arrived(self, index: int) -> None:
        bucket = self.bucket_of[index]
        self.arrived[bucket] += 1
        while self.next_bucket < len(self.buckets) and self.arrived[self.next_bucket] == len(
            self.buckets[self.next_bucket]
        ):
            self._start(self.next_bucket)
            self.next_bucket += 1

    def _start(self, bucket: int) -> None:
        params = [self.params[i] for i in self.buckets[bucket]]
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
        self.flats[bucket] = flat
        self.handles.append(dist.all_reduce(flat, async_op=True))

    def finish(self) -> None:
        """Wait for every bucket and set each gradient to the average over processes."""
        if self.world_size == 1:
            return
        for hook in self.hooks:
            hook.remove()
        while self.next_bucket < len(self.buckets):
            self._start(self.next_bucket)
            self.next_bucket += 1
        for handle in self.handles:
            handle.wait()
        self.handles = []
        for bucket, flat in zip(self.buckets, self.flats):
            flat /= self.world_size
            offset = 0
            for index in bucket:
                param = self.params[index]
                param.grad = flat[offset : offset + param.numel()].view_as(param)
                offset += param.numel()


def average_terms(
    terms: torch.Tensor, stop: bool, processes: Processes, device: torch.device
) -> tuple[torch.Tensor, bool]:
    """Loss terms averaged over processes, and whether any process asked to stop (one all_reduce)."""
    if processes.world_size == 1:
        return terms, stop
    stats = torch.cat([terms, torch.tensor([float(stop)], dtype=terms.dtype)]).to(device)
    dist.all_reduce(stats)
    return stats[:-1].cpu() / processes.world_size, bool(stats[-1] > 0)


def verify_ranks(ranks: dict[str, int], world_size: int, step: int, device: torch.device) -> None:
    """All-gather every process's rank vector; ``RuntimeError`` if any process differs."""
    if world_size == 1:
        return
    vector = torch.tensor(list(ranks.values()), dtype=torch.long, device=device)  # (L,)
    gathered = [torch.empty_like(vector) for _ in range(world_size)]
    dist.all_gather(gathered, vector)
    for process, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            diff = (other != gathered[0]).nonzero().flatten().tolist()[:5]
            raise RuntimeError(f"step {step}: LoRA² ranks differ between process 0 and {process} at layers {diff}")


def rng_states(generator: torch.Generator, device: torch.device, processes: Processes) -> dict[str, torch.Tensor]:
    """The RNG states of every process (global CPU and CUDA, and the trainer's generator), keyed ``rank<p>.<kind>``."""
    own = {"cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    if processes.world_size == 1:
        return {f"rank0.{k}": v for k, v in own.items()}
    gathered: list = [None] * processes.world_size
    dist.all_gather_object(gathered, own)
    return {f"rank{p}.{k}": v for p, states in enumerate(gathered) for k, v in states.items()}


def restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator, device, processes: Processes) -> None:
    """Set this process's RNG states from a checkpoint (``ValueError`` when the process count differs)."""
    key = f"rank{processes.rank}"
    if f"{key}.cpu" not in states or f"rank{processes.world_size}.cpu" in states:
        saved = len({k.split(".")[0] for k in states})
        raise ValueError(
            f"checkpoint was written by {saved} processes; resume with the same number (now {processes.world_size})"
        )
    torch.set_rng_state(states[f"{key}.cpu"])
    generator.set_state(states[f"{key}.generator"])
    if device.type == "cuda" and f"{key}.cuda" in states:
        torch.cuda.set_rng_state(states[f"{key}.cuda"], device)
