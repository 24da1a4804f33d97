"""Does a run on the fast path train as an eager run does? Loss curves and ranks over 200 steps (issue 17).

Three ``lora2 train`` runs of the same settings (SDXL pipeline built by ``benchmarks/full_scale.py build``, the
DreamBooth dog, 1024 px, bf16, batch 1, lr 1e-4, LoRA² defaults): eager (``--compile none``) and graphs
(``--compile graphs``) with seed 0, and graphs with seed 1 (the seed-to-seed spread to compare with). They run at
the same time on one GPU (this measures training, not speed). From each run's ``log.jsonl``: the MSE term smoothed
over ``--window`` steps, the total rank per step and the final rank of every layer. ``eager_vs_graphs`` and
``seed_to_seed`` hold the mean absolute differences of those; the fast path matches eager when each difference of
``eager_vs_graphs`` is within the seed-to-seed one (``within_seed_spread``).

    python benchmarks/fast_path_curves.py --base /tmp/fs/sdxl --instance .gpu/dreambooth/dog --work /tmp/curves \\
        --out $OUT/fast_path_curves.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RUNS = {"eager_s0": ("none", 0), "graphs_s0": ("graphs", 0), "graphs_s1": ("graphs", 1)}


def command(args: argparse.Namespace, run_dir: Path, mode: str, seed: int) -> list[str]:
    return [sys.executable, "-m", "lora2.cli", "train", "--base", args.base, "--instance-data-dir", args.instance,
            "--instance-prompt", "a sks dog", "--output-dir", str(run_dir), "--overwrite",
            "--resolution", str(args.resolution), "--max-train-steps", str(args.steps), "--train-batch-size", "1",
            "--learning-rate", "1e-4", "--lr-scheduler", "constant", "--mixed-precision", "bf16",
            "--seed", str(seed), "--compile", mode, "--sample-prompts", "{instance}", "--sample-steps", "2",
            "--report-to", "none", "--export-formats", "diffusers",
            "--checkpointing-steps", str(args.steps)]  # fmt: skip


def read_log(path: Path) -> tuple[list[float], list[int], dict[str, int]]:
    """MSE per step, total rank per step, the last ranks record."""
    mse, total, ranks = [], [], {}
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        ranks = record.get("ranks", ranks)
        if "mse" in record:  # step 0 holds the initial ranks only
            mse.append(record["mse"])
            total.append(record["total_rank"])
    return mse, total, ranks


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps."""
    return [sum(values[max(0, i - window + 1) : i + 1]) / len(values[max(0, i - window + 1) : i + 1])
            for i in range(len(values))]  # fmt: skip


def mean_abs_diff(a: list[float], b: list[float]) -> float:
    return sum(abs(x - y) for x, y in zip(a, b)) / min(len(a), len(b))


def differences(a: dict, b: dict) -> dict:
    layers = sorted(a["ranks"])
    return {
        "smoothed_mse": mean_abs_diff(a["mse_smooth"], b["mse_smooth"]),
        "total_rank": mean_abs_diff(a["total_rank"], b["total_rank"]),
        "final_rank_per_layer": mean_abs_diff([a["ranks"][k] for k in layers], [b["ranks"][k] for k in layers]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--instance", required=True)
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--window", type=int, default=20)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    processes = {}
    for name, (mode, seed) in RUNS.items():
        cmd = command(args, args.work / name, mode, seed)
        log = (args.work / f"{name}.txt").open("w")
        processes[name] = (cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    runs = {}
    for name, (cmd, process) in processes.items():
        code = process.wait()
        entry = {"command": cmd, "exit_code": code}
        if code == 0:
            mse, total, ranks = read_log(args.work / name / "log.jsonl")
            curve = smooth(mse, args.window)
            entry.update(mse_smooth=curve, total_rank=total, ranks=ranks, final_mse_smooth=curve[-1],
                         final_mean_rank=sum(ranks.values()) / len(ranks))  # fmt: skip
        else:
            entry["log_tail"] = (args.work / f"{name}.txt").read_text(encoding="utf-8")[-2000:]
        runs[name] = entry
    result = {"steps": args.steps, "window": args.window, "wall_s": round(time.time() - start, 1)}
    if all(run["exit_code"] == 0 for run in runs.values()):
        eager_vs_graphs = differences(runs["eager_s0"], runs["graphs_s0"])
        seed_to_seed = differences(runs["graphs_s0"], runs["graphs_s1"])
        within = {key: eager_vs_graphs[key] <= seed_to_seed[key] for key in seed_to_seed}
        result.update(eager_vs_graphs=eager_vs_graphs, seed_to_seed=seed_to_seed, within_seed_spread=within)
    for run in runs.values():  # keep the file small: every 5th step of the curves
        for key in ("mse_smooth", "total_rank"):
            if key in run:
                run[key] = run[key][::5]
        run.pop("ranks", None)
    result["runs"] = runs
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(json.dumps({key: result.get(key) for key in ("eager_vs_graphs", "seed_to_seed", "within_seed_spread")},
                     indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
