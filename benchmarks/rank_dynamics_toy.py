"""How Λ's normalisation, ν's learning rate and the weight prior decide whether ranks travel (toy regression).

A frozen Linear(32, 32) must learn y = W0 x + U V x with a rank-`true_rank` U V. We record the final effective
rank and the fit for each setting. Writes benchmarks/results/rank_dynamics_toy.json.

    python benchmarks/rank_dynamics_toy.py
"""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import torch
from torch import nn

import lora2
from lora2 import LoRA2Config

OUT = Path(__file__).parent / "results" / "rank_dynamics_toy.json"


def run(scaling: str, nu_lr: float, weight_reg: float, true_rank: int, init_rank: int, steps: int = 600) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32))
    x = torch.randn(256, 32)  # (N, 32)
    target = model(x).detach() + x @ (torch.randn(32, true_rank) @ torch.randn(true_rank, 32)).T / 6  # (N, 32)
    config = LoRA2Config(
        target_modules=["0"],
        init_rank=init_rank,
        max_rank=32,
        chunk_size=4,
        lambda_scaling=scaling,
        rank_reg_weight=0.0,
        weight_reg_weight=weight_reg,
    )
    lora2.inject(model, config)
    layer = model[0]
    optimizer = torch.optim.Adam(
        [{"params": [layer.lora_A, layer.lora_B]}, {"params": [layer.log_nu], "lr": nu_lr}], lr=1e-2
    )
    for _ in range(steps):
        loss = (model(x) - target).square().mean() + lora2.regularization(model)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mse = (model(x) - target).square().mean().item()
    return {
        "lambda_scaling": scaling,
        "nu_lr": nu_lr,
        "weight_reg_weight": weight_reg,
        "true_rank": true_rank,
        "init_rank": init_rank,
        "final_rank": layer.r,
        "final_mse": round(mse, 5),
    }


def main() -> None:
    rows = []
    start = time.time()
    grid = itertools.product(["first", "sum", "none"], [1e-2], [0.0, 1e-4], [(6, 2), (20, 4), (4, 20)])
    for scaling, nu_lr, weight_reg, (true_rank, init_rank) in grid:
        rows.append(run(scaling, nu_lr, weight_reg, true_rank, init_rank))
        print(rows[-1], flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(
        json.dumps(
            {
                "command": "python benchmarks/rank_dynamics_toy.py",
                "rows": rows,
                "seconds": round(time.time() - start, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
