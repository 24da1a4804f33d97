"""How Λ's normalisation, ν's learning rate and the weight prior decide whether ranks travel (toy regression).

A frozen Linear(32, 32) must learn y = W0 x + U V x with a rank-`true_rank` U V. We record the final effective
rank and the fit for each setting. Writes benchmarks/results/rank_dynamics_toy.json (or ``--out``); ``--table`` prints
the Markdown table of a results file, with a re-run's final ranks and MSE beside it if a second file is given
(docs/DESIGN.md's toy table is this output).

    python benchmarks/rank_dynamics_toy.py [--out FILE]
    python benchmarks/rank_dynamics_toy.py --table benchmarks/results/rank_dynamics_toy.json \
        benchmarks/results/rank_dynamics_toy_42f58ff.json
"""

from __future__ import annotations

import argparse
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


def markdown_table(rows: list[dict], rerun: list[dict] | None = None) -> str:
    """One line per row of a results file, values as stored (MSE rounded to 5 decimals by ``run``); with ``rerun``
    (the rows of a second file of the same grid), its final rank and MSE in two more columns."""
    header = "| λ scaling | weight prior | true rank | init rank | final rank | final MSE |"
    if rerun is not None:
        if [_setting(r) for r in rerun] != [_setting(r) for r in rows]:
            raise ValueError("the re-run file holds another grid of settings than the first file")
        header += " final rank (re-run) | final MSE (re-run) |"
    lines = [header, "|" + "---|" * header.count(" |")]
    for index, row in enumerate(rows):
        cells = [row["lambda_scaling"], f"{row['weight_reg_weight']:g}", row["true_rank"], row["init_rank"]]
        cells += [row["final_rank"], f"{row['final_mse']:g}"]
        if rerun is not None:
            cells += [rerun[index]["final_rank"], f"{rerun[index]['final_mse']:g}"]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def _setting(row: dict) -> tuple:
    return row["lambda_scaling"], row["nu_lr"], row["weight_reg_weight"], row["true_rank"], row["init_rank"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"results file (default {OUT})")
    parser.add_argument(
        "--table",
        type=Path,
        nargs="+",
        default=None,
        help="only print the Markdown table of a results file [and a re-run]",
    )
    args = parser.parse_args()
    if args.table is not None:
        files = [json.loads(path.read_text())["rows"] for path in args.table]
        print(markdown_table(files[0], files[1] if len(files) > 1 else None))
        return
    rows = []
    start = time.time()
    grid = itertools.product(["first", "sum", "none"], [1e-2], [0.0, 1e-4], [(6, 2), (20, 4), (4, 20)])
    for scaling, nu_lr, weight_reg, (true_rank, init_rank) in grid:
        rows.append(run(scaling, nu_lr, weight_reg, true_rank, init_rank))
        print(rows[-1], flush=True)
    command = "python benchmarks/rank_dynamics_toy.py" + ("" if args.out == OUT else f" --out {args.out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"command": command, "rows": rows, "seconds": round(time.time() - start, 1)}, indent=2)
    )


if __name__ == "__main__":
    main()
