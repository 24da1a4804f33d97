"""Prodigy and ν: which optimizer of ν's parameter group lets LoRA² ranks move (world model, CPU).

Prodigy (prodigyopt) estimates one step size d for all its groups and refuses groups whose learning rates differ
(other than 0). Two ways to train ν with it, run here on the built-in world model:

* ``adam_nu`` (what ``--optimizer prodigy`` does, ``lora2.train.optimizers.ProdigyWithAdamNu``): the adapter weights
  take Prodigy steps, ν's group plain Adam steps at ``nu_lr``;
* ``prodigy_nu``: ν's group inside Prodigy with the weights' learning rate (the only way Prodigy takes it): ν moves
  by about d per step, and its gradients enter d's estimate;

and, for reference, ``adamw`` (AdamW at the world's usual lr 1e-3, ν at ``nu_lr``). Recorded per run: total rank per
step (log.jsonl), the final mean rank and loss, and Prodigy's d at the end.

usage: PYTHONPATH=src python benchmarks/prodigy_nu.py [--subject badge_cross] [--steps 100] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from lora2.train import recipe
from lora2.train.config import TrainConfig
from lora2.train.run_folder import RunFolder
from lora2.world import info

ROOT = Path(__file__).resolve().parent
VARIANTS = ("adam_nu", "prodigy_nu", "adamw")


def prodigy_over_every_group(config, groups):
    """ν's group inside Prodigy, at the weights' learning rate (Prodigy refuses another one)."""
    from prodigyopt import Prodigy

    for group in groups:
        group["lr"] = config.learning_rate
    return Prodigy(groups, lr=config.learning_rate, decouple=True, use_bias_correction=True, safeguard_warmup=True)


def run(variant: str, subject_dir: Path, steps: int, out: Path) -> dict:
    optimizer = "adamw" if variant == "adamw" else "prodigy"
    config = TrainConfig.from_dict(
        {
            "instance_data_dir": str(subject_dir),
            "output_dir": str(out),
            "optimizer": optimizer,
            "learning_rate": 1e-3 if variant == "adamw" else 1.0,
            "max_train_steps": steps,
            "checkpointing_steps": steps,
            "sample_prompts": ["{instance}"],
            "sample_steps": 2,
            "report_to": "none",
            "export_formats": ["diffusers"],
            "device": "cpu",
        }
    )
    original, built = recipe.build_optimizer, {}

    def build(config, groups):
        builder = prodigy_over_every_group if variant == "prodigy_nu" else original
        built["optimizer"] = builder(config, groups)
        return built["optimizer"]

    recipe.build_optimizer = build
    start = time.perf_counter()
    try:
        result = recipe.train(config)
    finally:
        recipe.build_optimizer = original
    seconds = time.perf_counter() - start
    optimizer = built["optimizer"]
    inner = getattr(optimizer, "prodigy", optimizer)
    steps_logged, history = RunFolder(out).rank_history()
    return {
        "variant": variant,
        "optimizer": type(optimizer).__name__,
        "learning_rate": config.learning_rate,
        "nu_lr": config.nu_lr,
        "init_rank": config.lora.init_rank,
        "total_rank_per_step": [sum(ranks.values()) for ranks in history],
        "steps": steps_logged,
        "final_mean_rank": sum(result.ranks.values()) / len(result.ranks),
        "final_loss_mean_last_10": sum(result.losses[-10:]) / len(result.losses[-10:]),
        "prodigy_d": inner.param_groups[0].get("d"),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subject", default="badge_cross")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "results" / "prodigy_nu_world_cpu.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(2)
    subject_dir = Path(info(materialize=True)["subjects_dir"]) / args.subject
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in VARIANTS:
            rows.append(run(variant, subject_dir, args.steps, Path(tmp) / variant))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "total_rank_per_step"}))
    result = {
        "command": f"PYTHONPATH=src python benchmarks/prodigy_nu.py --subject {args.subject} --steps {args.steps}",
        "base": "the built-in world model (CPU, fp32, 64 px)",
        "runs": rows,
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
