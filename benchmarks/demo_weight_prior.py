"""The demo with and without LoRA²'s weight prior, three seeds: evidence for the ``weight_reg_weight`` default.

Runs ``lora2.demo.demo`` (world subject target_circle, 150 steps, the trainer's defaults) with ``weight_reg_weight``
0 and 1e-4 for seeds 0, 1, 2 and writes each run's DINO / CLIP-I / CLIP-T to
benchmarks/results/demo_weight_prior.json (or ``--out``). The demo fixes its seed and prior, so this script wraps
the demo's TrainConfig to change only those two fields.

    python benchmarks/demo_weight_prior.py [--out FILE] [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import lora2.demo
from lora2.train.config import TrainConfig

OUT = Path(__file__).parent / "results" / "demo_weight_prior.json"
WEIGHTS = (0.0, 1e-4)
SEEDS = (0, 1, 2)


def run(work: Path, weight: float, seed: int) -> dict:
    """One demo with the weight prior ``weight`` and ``seed``; its fine-tuned metrics."""
    lora2.demo.TrainConfig = lambda **kw: TrainConfig(**kw).replace(weight_reg_weight=weight, seed=seed)
    try:
        shutil.rmtree(work, ignore_errors=True)
        files = lora2.demo.demo(work)
    finally:
        lora2.demo.TrainConfig = TrainConfig
    return {"weight_reg_weight": weight, "seed": seed, **json.loads(files["metrics"].read_text())["lora2"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora2_demo_weight_prior"))
    args = parser.parse_args()
    started = time.time()
    runs = [run(args.work, weight, seed) for seed in SEEDS for weight in WEIGHTS]
    mean = {
        str(weight): {k: sum(r[k] for r in runs if r["weight_reg_weight"] == weight) / len(SEEDS)
                      for k in ("dino", "clip_i", "clip_t")}
        for weight in WEIGHTS
    }  # fmt: skip
    result = {
        "command": "python benchmarks/demo_weight_prior.py",
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "wall_seconds": round(time.time() - started, 1),
        "mean": mean,
        "runs": runs,
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(mean, indent=1))


if __name__ == "__main__":
    main()
