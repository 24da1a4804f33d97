"""Several processes (``torchrun`` / ``accelerate launch``): joining the group, averaging gradients, checking ranks,
and the RNG states a checkpoint keeps per process.

Ranks change after optimizer steps, so parameters are re-allocated during training and the UNet is not wrapped in
DDP (its reducer holds fixed parameter lists): the gradients of all trainable parameters are averaged with one
flattened ``all_reduce`` after the backward, so ν, and thus every rank, stay identical on every process; the rank
vectors are compared across processes every ``rank_check_steps`` and at the end.
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


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average gradients over processes with one flattened all_reduce (a missing gradient counts as zero)."""
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset : offset + grad.numel()].view_as(param).clone()
        offset += grad.numel()


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
