"""Two processes (gloo, CPU) train with changing ranks and end with identical ranks and weights."""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from train_helpers import fast_config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, base: str, instance: str, out: str, result_dir: str) -> None:
    import os

    from lora2.train.recipe import train

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        config = fast_config(
            base,
            instance,
            out,
            max_train_steps=3,
            init_rank=3,
            chunk_size=2,
            nu_lr=0.5,
            learning_rate=1e-2,
            random_flip=True,
            rank_check_steps=1,
            sample_steps=1,
        )
        result = train(config)
        ranks = torch.tensor(list(result.ranks.values()))
        save_file({**result.adapter_state, "__ranks__": ranks}, f"{result_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_keep_identical_ranks_and_weights(tiny_base, instance_dir, tmp_path):
    out, result_dir = tmp_path / "run", tmp_path / "results"
    result_dir.mkdir()
    args = (_free_port(), str(tiny_base), str(instance_dir), str(out), str(result_dir))
    mp.spawn(_worker, args=args, nprocs=2, join=True)
    first, second = (load_file(result_dir / f"rank{r}.safetensors") for r in range(2))
    assert not torch.equal(first["__ranks__"], torch.full_like(first["__ranks__"], 3)), "ranks should move"
    assert torch.equal(first["__ranks__"], second["__ranks__"])
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert (out / "pytorch_lora_weights.safetensors").is_file()  # written once, by process 0


def _reducer_worker(rank: int, port: int, result_dir: str) -> None:
    import os

    from lora2.train.distributed import GradientReducer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        layers = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])
        unused = torch.nn.Parameter(torch.ones(3))  # never gets a gradient: counts as zero
        params = [*layers.parameters(), unused]
        reducer = GradientReducer(world_size=2, bucket_mb=2e-3)  # ~2 kB: several buckets
        results = {}
        for step in range(2):
            if step == 1:  # a re-allocated parameter (as after a rank change): new buckets
                params[0] = torch.nn.Parameter(torch.randn(16, 16, generator=torch.Generator().manual_seed(5)))
                layers[0].weight = params[0]
            x = torch.randn(4, 16, generator=torch.Generator().manual_seed(10 * step + rank))
            reducer.arm(params)
            layers(x).square().sum().backward()
            reducer.finish()
            results.update({f"{step}.{i}": p.grad.clone() for i, p in enumerate(params) if p.grad is not None})
            for p in params:
                p.grad = None
        assert len(reducer.buckets) > 2
        save_file(results, f"{result_dir}/rank{rank}.safetensors")
    finally:
        dist.destroy_process_group()


def test_gradient_reducer_averages_during_the_backward(tmp_path):
    mp.spawn(_reducer_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    first, second = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert first.keys() == second.keys() and "0.12" in first  # the unused parameter got a zero average
    for key in first:
        assert torch.equal(first[key], second[key]), key
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(6)])
    expected = []
    for rank in range(2):  # step 0 by hand: the mean of both processes' gradients
        layers.zero_grad()
        layers(torch.randn(4, 16, generator=torch.Generator().manual_seed(rank))).square().sum().backward()
        expected.append([p.grad.clone() for p in layers.parameters()])
    for i, (a, b) in enumerate(zip(*expected)):
        torch.testing.assert_close(first[f"0.{i}"], (a + b) / 2)
    assert torch.equal(first["0.12"], torch.zeros(3))
