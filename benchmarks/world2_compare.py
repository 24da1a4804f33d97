"""The second world's comparison (issue 19, point 3), run after its gate passed, in the gate's own bench folder.

Every method at its own best learning rate, seeds 0–2, every subject (``lora2 bench`` method names, see
``lora2.eval.bench.find_method``):

1. sweep: LoRA² with r_target ∈ ``TARGETS`` × ``LEARNING_RATES`` on seed 0 ("lora2-rt<r>-lr<rate>"); each target's
   best learning rate by mean DINO, as the gate chose the fixed ranks' (``world2_gate_cells.json``);
2. main (``main_methods``), seeds 0–2: the fixed ranks at their best rates (already run by the gate), LoRA² at each
   target; for each target the iso-size uniform LoRA ("iso-lr<rate>-<lora2>", trained at the rate of the fixed rank
   nearest r_target), the SVD truncations of fixed-128 to its per-layer ranks and to a uniform rank of its size;
   DoRA and AdaLoRA at the size of r_target ``REFERENCE_TARGET``; the ablations of that target (no rank
   regularization, λ_e ∈ {0, 1e-3, 1e-2} besides the default 1e-4, the weight prior on, Λ scaling sum / none, init
   rank 4 / 32, q 0.8 / 0.95);
3. analyze (``analyze``): per method the mean and standard error of DINO, CLIP-I, CLIP-T and the adapter size; the
   fixed-rank curve against the LoRA² curve (each LoRA² point against the fixed curve interpolated at its size, in
   log size); paired sign-flip tests with Holm's correction of LoRA² against its iso-size LoRA and its uniform SVD,
   and of every ablation against its base; the plot. Writes ``world2_compare.json`` and ``world2_pareto.png``.

usage:
    python benchmarks/world2_compare.py run --gate OUT_OF_THE_GATE --world DIR [--parallel 16] [--time-limit 540]
    python benchmarks/world2_compare.py analyze --gate OUT_OF_THE_GATE --json benchmarks/results/world2_compare.json \
        --plot docs/results/world2_pareto.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, str(Path(__file__).resolve().parent))
import world2_gate as gate  # noqa: E402  (the gate's bench plumbing: same folder, same protocol)

from lora2.eval.report import collect, paired_tests  # noqa: E402

logger = logging.getLogger("world2_compare")

TARGETS = (4, 8, 16, 32, 64)
LEARNING_RATES = gate.LEARNING_RATES
SEEDS = (0, 1, 2)
REFERENCE_TARGET = 16  # the ablations, DoRA and AdaLoRA are set around this LoRA²
SVD_SOURCE_RANK = 128
ABLATIONS = ("rr0", "le0", "le1e-3", "le1e-2", "wp1e-4", "scalesum", "scalenone", "init4", "init32", "q0.8", "q0.95")
METRICS = ("dino", "clip_i", "clip_t")
TITLES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T"}


# ---------------------------------------------------------------------- the plan (pure)
def lora2_name(target: int, learning_rate: str, ablation: str = "") -> str:
    """LoRA² at r_target ``target`` and ``learning_rate``, with one ablation suffix (e.g. "le1e-3")."""
    return f"lora2-rt{target}-lr{learning_rate}" + (f"-{ablation}" if ablation else "")


def sweep_methods(targets: tuple[int, ...], learning_rates: tuple[str, ...]) -> list[str]:
    return [lora2_name(target, lr) for target in targets for lr in learning_rates]


def nearest_rank(rank: float, ranks: list[int]) -> int:
    """The rank of ``ranks`` nearest ``rank`` in log scale."""
    return min(ranks, key=lambda r: abs(math.log(r / rank)))


def main_methods(best_fixed: dict[int, str], best_lora2: dict[int, str]) -> list[str]:
    """Every method of the comparison at its best learning rate (fixed ranks first: the others depend on them)."""
    if SVD_SOURCE_RANK not in best_fixed or REFERENCE_TARGET not in best_lora2:
        raise ValueError(f"the plan needs fixed rank {SVD_SOURCE_RANK} (have {sorted(best_fixed)}) and r_target "
                         f"{REFERENCE_TARGET} (have {sorted(best_lora2)})")  # fmt: skip
    fixed = [gate.fixed_rank_method(rank, lr).name for rank, lr in best_fixed.items()]
    source = gate.fixed_rank_method(SVD_SOURCE_RANK, best_fixed[SVD_SOURCE_RANK]).name
    methods = list(fixed)
    for target, lr in best_lora2.items():
        learned = lora2_name(target, lr)
        iso_lr = best_fixed[nearest_rank(target, list(best_fixed))]
        methods += [learned, f"iso-lr{iso_lr}-{learned}", f"svd-{source}-ranks-{learned}",
                    f"svd-{source}-uniform-{learned}"]  # fmt: skip
    reference_lr = best_lora2[REFERENCE_TARGET]
    peft_lr = best_fixed[nearest_rank(REFERENCE_TARGET, list(best_fixed))]
    methods += [
        f"dora-{REFERENCE_TARGET}-lr{peft_lr}",
        f"adalora-{2 * REFERENCE_TARGET}-{REFERENCE_TARGET}-lr{peft_lr}",
    ]
    methods += [lora2_name(REFERENCE_TARGET, reference_lr, ablation) for ablation in ABLATIONS]
    return methods


# ---------------------------------------------------------------------- the analysis (pure)
def method_points(cells: list[dict]) -> dict[str, dict]:
    """Method → mean and standard error over its cells of every metric and of the size (GiB, fp32); cells are
    ``report.collect`` results as dicts."""
    points = {}
    for method in dict.fromkeys(c["method"] for c in cells):
        mine = [c for c in cells if c["method"] == method and c["scores"]]
        if not mine:
            continue
        point = {"cells": len(mine)}
        for key in (*METRICS, "size_gb", "mean_rank"):
            values = [c["scores"][key] if key in METRICS else c[key] for c in mine]
            values = [v for v in values if v is not None]
            if values:
                spread = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0
                point[key] = {"mean": statistics.fmean(values), "se": spread}
        points[method] = point
    return points


def curve_at(curve: list[tuple[float, float]], size: float) -> float | None:
    """The curve (size, score) points interpolated linearly in log size at ``size`` (None outside its range)."""
    curve = sorted(curve)
    sizes = [math.log(s) for s, _ in curve]
    if not curve or not sizes[0] <= math.log(size) <= sizes[-1]:
        return None
    return float(np.interp(math.log(size), sizes, [v for _, v in curve]))


def against_fixed_curve(points: dict[str, dict], fixed: list[str], learned: list[str]) -> dict[str, dict]:
    """Each learned point's score minus the fixed-rank curve's at the same size, per metric."""
    result = {}
    for name in learned:
        if name not in points or "size_gb" not in points[name]:
            continue
        size = points[name]["size_gb"]["mean"]
        gaps = {}
        for metric in METRICS:
            curve = [
                (points[f]["size_gb"]["mean"], points[f][metric]["mean"]) for f in fixed if metric in points.get(f, {})
            ]
            at = curve_at(curve, size)
            gaps[metric] = None if at is None else points[name][metric]["mean"] - at
        result[name] = {"size_gb": size, "minus_fixed_curve": gaps}
    return result


def comparison_pairs(best_fixed: dict[int, str], best_lora2: dict[int, str]) -> list[tuple[str, str]]:
    """LoRA² against its iso-size LoRA and its uniform SVD at every target; each ablation against its base."""
    source = gate.fixed_rank_method(SVD_SOURCE_RANK, best_fixed[SVD_SOURCE_RANK]).name
    pairs = []
    for target, lr in best_lora2.items():
        learned = lora2_name(target, lr)
        iso_lr = best_fixed[nearest_rank(target, list(best_fixed))]
        pairs += [(learned, f"iso-lr{iso_lr}-{learned}"), (learned, f"svd-{source}-uniform-{learned}")]
    base = lora2_name(REFERENCE_TARGET, best_lora2[REFERENCE_TARGET])
    return pairs + [(lora2_name(REFERENCE_TARGET, best_lora2[REFERENCE_TARGET], a), base) for a in ABLATIONS]


def plot_pareto(points: dict[str, dict], fixed: list[str], learned: list[str], path: Path) -> None:
    """DINO, CLIP-I, CLIP-T against adapter size: the fixed-rank and LoRA² curves, other methods as points."""
    fig = Figure(figsize=(15, 4.2))
    for ax, metric in zip(fig.subplots(1, len(METRICS)), METRICS):
        for names, style, label in ((fixed, "o-", "fixed rank"), (learned, "*-", "LoRA² (r_target)")):
            shown = [n for n in names if metric in points.get(n, {}) and "size_gb" in points[n]]
            ax.errorbar([points[n]["size_gb"]["mean"] for n in shown], [points[n][metric]["mean"] for n in shown],
                        yerr=[points[n][metric]["se"] for n in shown], fmt=style, capsize=3, label=label)  # fmt: skip
        for name, point in points.items():
            if name not in fixed and name not in learned and metric in point and "size_gb" in point:
                ax.plot(point["size_gb"]["mean"], point[metric]["mean"], "x", color="grey")
                ax.annotate(name.split("-lora2")[0], (point["size_gb"]["mean"], point[metric]["mean"]), fontsize=6)
        ax.set_xscale("log")
        ax.set_xlabel("adapter size (GiB, fp32)")
        ax.set_title(TITLES[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def analyze(gate_out: Path, best_lora2: dict[int, str]) -> dict:
    """The comparison's numbers from the gate's bench folder (see the module docstring)."""
    details = json.loads((gate_out / "world2_gate_cells.json").read_text(encoding="utf-8"))
    best_fixed = {int(rank): lr for rank, lr in details["best_learning_rate"].items()}
    results = [c for c in collect(gate_out / "bench") if c.seed in SEEDS]
    points = method_points([vars(c) for c in results])
    fixed = [gate.fixed_rank_method(r, lr).name for r, lr in sorted(best_fixed.items())]
    learned = [lora2_name(t, lr) for t, lr in sorted(best_lora2.items())]
    return {
        "best_learning_rates": {"fixed": best_fixed, "lora2": best_lora2},
        "points": points,
        "lora2_against_fixed_curve": against_fixed_curve(points, fixed, learned),
        "paired": paired_tests(results, comparison_pairs(best_fixed, best_lora2)),
        "curves": {"fixed": fixed, "lora2": learned},
    }


# ---------------------------------------------------------------------- running
def best_lora2_rates(bench_dir: Path, targets: tuple[int, ...], subjects: list[str]) -> dict[int, str]:
    """Each target's learning rate of highest mean DINO on the sweep seed (ValueError while cells are missing)."""
    scores = gate.dino_scores(bench_dir)
    best = {}
    for target in targets:
        names = {lr: lora2_name(target, lr) for lr in LEARNING_RATES}
        missing = [(s, n) for n in names.values() for s in subjects if (s, n, gate.SWEEP_SEED) not in scores]
        if missing:
            raise ValueError(f"the LoRA² sweep lacks {len(missing)} cells, e.g. {missing[:3]}; run it again")
        means = {lr: statistics.fmean(scores[(s, n, gate.SWEEP_SEED)] for s in subjects) for lr, n in names.items()}
        best[target] = max(sorted(LEARNING_RATES, key=float), key=lambda lr: means[lr])
    return best


def run(args: argparse.Namespace) -> int:
    """Sweep, then every method on every seed; 0 when all cells are in, 3 when the next call must resume."""
    out = args.out = Path(args.gate)  # the gate's bench folder, protocol and subjects
    details = json.loads((out / "world2_gate_cells.json").read_text(encoding="utf-8"))
    if not details.get("discriminates"):
        raise ValueError(f"{out}: the gate did not pass; the comparison runs on a world that discriminates")
    deadline = time.time() + args.time_limit if args.time_limit else None
    world = gate._world(args, out)
    root = gate._subjects_root(args, out)
    subjects = list(args.subjects or gate.complexities(root))
    gate._bench(args, world, root, subjects, sweep_methods(TARGETS, LEARNING_RATES), (gate.SWEEP_SEED,), deadline)
    try:
        best_lora2 = best_lora2_rates(out / "bench", TARGETS, subjects)
    except ValueError as error:
        logger.warning("%s", error)
        return 3
    best_fixed = {int(rank): lr for rank, lr in details["best_learning_rate"].items()}
    states = gate._bench(args, world, root, subjects, main_methods(best_fixed, best_lora2), SEEDS, deadline)
    (out / "world2_compare_rates.json").write_text(json.dumps({str(t): lr for t, lr in best_lora2.items()}) + "\n")
    return 0 if states and set(states) <= {"done"} else 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compare = commands.add_parser("run", help="the sweep and the comparison grid (resumable)")
    compare.add_argument("--gate", required=True, help="the gate's output folder (bench/, world2_gate_cells.json)")
    compare.add_argument("--world", help="folder with the world2 base/, clip/, dino/ (default: the gate's tiny world)")
    compare.add_argument("--data-root", help="subject folders (default: those the gate wrote)")
    compare.add_argument("--subjects", nargs="+", help="subject names (default: all)")
    compare.add_argument("--steps", type=int, default=300, help="training steps of every cell (the gate's)")
    compare.add_argument("--parallel", type=int, default=1)
    compare.add_argument("--time-limit", type=float)
    compare.add_argument("--train-arg", action="append", default=list(gate.TRAIN_ARGS))
    compare.add_argument("--eval-arg", action="append", default=list(gate.EVAL_ARGS))
    report = commands.add_parser("analyze", help="world2_compare.json and the Pareto plot")
    report.add_argument("--gate", required=True)
    report.add_argument("--json", required=True)
    report.add_argument("--plot", required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "run":
            return run(args)
        rates = json.loads((Path(args.gate) / "world2_compare_rates.json").read_text(encoding="utf-8"))
        result = analyze(Path(args.gate), {int(t): lr for t, lr in rates.items()})
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        curves = result["curves"]
        plot_pareto(result["points"], curves["fixed"], curves["lora2"], Path(args.plot))
        return 0
    except ValueError as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
