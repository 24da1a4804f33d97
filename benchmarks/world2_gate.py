"""The second world's discrimination gate (issue 19): does fixed-rank LoRA at a low rank score below rank 64?

Measured before any method comparison, through ``lora2 bench`` (one bench folder, so it resumes and packs jobs on the
GPU like every grid):

1. sweep: fixed ranks ``RANKS`` × learning rates ``LEARNING_RATES`` on seed 0, every subject (methods named
   ``fixed-<rank>-lr<rate>``, ``lora2.eval.bench.fixed_rank_method``);
2. each rank's best learning rate: the highest mean DINO over the subjects at seed 0 (``best_learning_rates``);
3. confirm: each rank at its best learning rate on seeds 1 and 2, every subject; steps 1–3 run for ranks 4 and 64
   first, then 8, then the others (``rank_groups``), and the gate files are written after each group;
4. the gate (``gate_result``), on the confirmation seeds only: DINO of the low rank against rank 64, paired by
   (subject, seed); ``paired_diff`` = mean of (high − low), ``paired_se`` = its standard error (sample standard
   deviation / √n); ``spearman_gap_vs_complexity`` = Spearman ρ between each subject's mean gap and its complexity
   (``png_bits_per_pixel`` in the subjects' ``subjects.json``). The world discriminates (``discriminates``) when
   the paired difference is at least 3 standard errors and ρ > 0. The low rank is 4, or 8 when 4 does not pass.

``--multi`` makes the cell one adapter for all subjects at once (docs/WORLD.md, "Where capacity might bind"): a
bench over one training folder, ``MULTI_SUBJECT``, that holds every subject's instance images captioned "a
<identifier> <class>" with each subject's own identifier (``write_multi_subject``; metadata.jsonl), trained with the
protocol ``MULTI`` (61 passes over the 49 images, as 300 steps are over one subject's 5), and evaluated subject by
subject with its identifier (``eval-multi``, the bench's eval job: ``eval_<subject>.json`` each, and ``eval.json``
with every subject's scores and their means). The gate's pairs stay (subject, seed). ``--crowd`` does the same for the
thirty subjects of ``lora2.world.world2.CROWD_SUBJECTS`` (the ten and twenty drawn ones), protocol ``CROWD``, and
``--families`` for the thirty of ``FAMILY_SUBJECTS`` (six families of one class and colour, five levels each: the
members of a family differ only in their detail), protocol ``CROWD`` too, and ``--lookalikes`` for the thirty of
``LOOKALIKE_SUBJECTS`` (five groups of six look-alikes, one a level: six colours of a flat shape, then one shape and
colour told apart by their level's detail alone; at level 5 by a patterned surface beneath a shared bead ring and
glyph plaque), and ``--siblings`` for those of ``SIBLING_SUBJECTS`` (the same
groups, but each detailed group a stem of one to four parts and its redrawings of one part).

Writes ``<out>/world2_gate.json`` (exactly the issue's keys) and ``<out>/world2_gate_cells.json`` (best learning
rates, every rank's mean DINO, the verdict, the per-subject gaps). ``--tiny`` runs the same chain end to end at
smoke-test size (ranks 4 and 64, one learning rate, two subjects, two steps, one image per evaluation) against
``--world`` or, without it, a tiny world pretrained on the CPU (``pretrain_world(scale="tiny")``: 32 px, two steps
per phase): a test of the plumbing, not a measurement. ``describe`` prints (and ``--json`` writes) the world2 base
model's numbers computed from its configuration (parameters, fp16 size, latent shape, adapted layers by shape) and
its subjects' levels and measured complexity.

usage:
    python benchmarks/world2_gate.py run --world DIR --out DIR [--parallel 16] [--time-limit 540]
    python benchmarks/world2_gate.py run --multi --world DIR --out DIR [--parallel 16] [--time-limit 540]
    python benchmarks/world2_gate.py run --crowd --world DIR --out DIR [--parallel 16] [--time-limit 540]
    python benchmarks/world2_gate.py run --families --learning-rates 1e-3 3e-3 1e-2 --world DIR --out DIR
    python benchmarks/world2_gate.py run --lookalikes --learning-rates 1e-3 3e-3 1e-2 --world DIR --out DIR
    python benchmarks/world2_gate.py run --siblings --learning-rates 1e-3 3e-3 1e-2 --world DIR --out DIR
    python benchmarks/world2_gate.py run --tiny [--multi | --crowd] --out /tmp/gate_tiny [--world DIR]
    python benchmarks/world2_gate.py run --crowd --sweep-only --ranks 4 --learning-rates 1e-2 --world DIR --out DIR
    python benchmarks/world2_gate.py describe [--json benchmarks/results/world2_config.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import statistics
import sys
import time
from collections import Counter
from functools import partial
from pathlib import Path
from types import SimpleNamespace

from lora2.cli.evaluate import add_eval_arguments
from lora2.data.dreambooth import PROMPTS_FILE, load_subjects
from lora2.eval.bench import BenchConfig, bench, fixed_rank_method
from lora2.eval.report import collect, spearman

logger = logging.getLogger("world2_gate")

RANKS = (2, 4, 8, 16, 32, 64, 128)
LEARNING_RATES = ("3e-4", "1e-3", "3e-3")
SWEEP_SEED = 0
CONFIRM_SEEDS = (1, 2)
LOW_RANKS = (4, 8)  # the gate's low rank: the first that passes, else the first
HIGH_RANK = 64
MIN_Z = 3.0  # the paired difference must reach this many standard errors
MIN_SECONDS = 150.0  # a bench call with less time left than this is not started (a cell trains for 2-3 minutes)
GATE_KEYS = (
    "low_rank",
    "high_rank",
    "dino_low",
    "dino_high",
    "paired_diff",
    "paired_se",
    "n_pairs",
    "spearman_gap_vs_complexity",
)
# the world grid's protocol (benchmarks/gpu_bench.sh): 300 steps, samples of one step, no checkpoint inside a cell
TRAIN_ARGS = ("sample_steps=1", "checkpointing_steps=1000")
EVAL_ARGS = ("num_images=2",)
TINY = {
    "ranks": (4, 64),
    "learning_rates": ("1e-3",),
    "subjects": ("rust_triangle", "mosaic_star"),
    "steps": 2,
    "train_args": ("sample_steps=1", "checkpointing_steps=1000", "num_validation_images=1"),
    "eval_args": ("num_images=1", "max_prompts=1", "num_inference_steps=2"),
}

# one adapter for every subject: its training folder (under <out>/multi), the identifiers given to the subjects in
# their order (--subjects, else subjects.json's), and the protocol: 750 steps of 4 images are 61 passes over the ten
# subjects' 49 images, as the single cell's 300 steps of 1 are over one subject's 5 (batch 4, so that a cell trains
# within one device call: 154-178 s on one H200 with 4-6 cells packed). Every caption holds the word "a", so with
# identifier "a" the trainer keeps each caption as it is (lora2.train.captions).
MULTI_SUBJECT = "ten_subjects"
IDENTIFIERS = ("sks", "zwx", "qrv", "jkp", "vbn", "xtl", "wmf", "dgh", "pzk", "ykb",
               "fjc", "hwq", "lzm", "gtd", "bvx", "cnk", "mrj", "tpw", "dkz", "svq",
               "yhg", "nxb", "wcf", "kjt", "rqm", "pgv", "zdl", "xbh", "jmw", "qtn")  # fmt: skip
KEEP_CAPTIONS = ("identifier=a", "instance_prompt='a sks object'")
MULTI = {"steps": 750, "train_args": ("train_batch_size=4", *KEEP_CAPTIONS), "eval_args": EVAL_ARGS}
# --crowd: the thirty subjects of lora2.world.world2.CROWD_SUBJECTS in one adapter. Batch 12, so that 750 steps are
# again 60 passes over the images (150), and one image for each of the 25 prompts per subject in the evaluation, so
# that an adapter's thirty evaluations cost about what the ten subjects' two images a prompt cost. --families trains
# the thirty of FAMILY_SUBJECTS (six families, five levels each) the same way, --lookalikes and --siblings theirs.
CROWD_SUBJECT = "thirty_subjects"
THIRTY_SUBJECT_SETS = {  # flag -> what it trains (lora2.world.world2.SUBJECT_SETS)
    "crowd": "the thirty crowd subjects",
    "families": "the six families' thirty subjects",
    "lookalikes": "five groups of six look-alikes, one group a level",
    "siblings": "five groups of six siblings, a stem and redrawings",
}
CROWD = {"steps": 750, "train_args": ("train_batch_size=12", *KEEP_CAPTIONS), "eval_args": ("num_images=1",)}
SUBJECT_NAME = re.compile(r"[A-Za-z0-9_-]+")  # a subject name that may name a file (eval_<subject>.json)

Scores = dict[tuple[str, str, int], float]  # (subject, method, seed) -> DINO


# ---------------------------------------------------------------------- the plan (pure)
def sweep_methods(ranks: tuple[int, ...], learning_rates: tuple[str, ...]) -> list[str]:
    """Method names of the seed-0 sweep: every rank at every learning rate."""
    if len(set(learning_rates)) != len(learning_rates) or len(set(ranks)) != len(ranks):
        raise ValueError(f"ranks {ranks} and learning rates {learning_rates} must not repeat")
    return [fixed_rank_method(rank, lr).name for rank in ranks for lr in learning_rates]


def best_learning_rates(
    scores: Scores, ranks: tuple[int, ...], learning_rates: tuple[str, ...], subjects: list[str]
) -> dict[int, str]:
    """Each rank's learning rate of highest mean DINO over ``subjects`` at the sweep seed (ties: the smaller rate).

    Raises ValueError naming the missing cells when the sweep is incomplete (run the same command again to resume).
    """
    missing = [
        (subject, fixed_rank_method(rank, lr).name)
        for rank in ranks
        for lr in learning_rates
        for subject in subjects
        if (subject, fixed_rank_method(rank, lr).name, SWEEP_SEED) not in scores
    ]
    if missing:
        raise ValueError(f"the seed-{SWEEP_SEED} sweep lacks {len(missing)} cells, e.g. {missing[:3]}; run it again")
    best = {}
    for rank in ranks:
        means = {
            lr: statistics.fmean(scores[(s, fixed_rank_method(rank, lr).name, SWEEP_SEED)] for s in subjects)
            for lr in learning_rates
        }
        best[rank] = max(sorted(learning_rates, key=float), key=lambda lr: means[lr])
    return best


def confirm_methods(best: dict[int, str]) -> list[str]:
    """Method names of the confirmation: every rank at its best learning rate."""
    return [fixed_rank_method(rank, lr).name for rank, lr in best.items()]


# ---------------------------------------------------------------------- the statistics (pure)
def paired_difference(low: dict[tuple[str, int], float], high: dict[tuple[str, int], float]) -> dict[str, float]:
    """Mean of low, mean of high, mean of the paired differences high − low over their common (subject, seed) keys,
    its standard error (sample standard deviation / √n) and n. Needs n ≥ 2."""
    keys = sorted(set(low) & set(high))
    if len(keys) < 2:
        raise ValueError(f"a paired difference needs at least 2 common (subject, seed) pairs, got {len(keys)}")
    diffs = [high[k] - low[k] for k in keys]
    return {
        "dino_low": statistics.fmean(low[k] for k in keys),
        "dino_high": statistics.fmean(high[k] for k in keys),
        "paired_diff": statistics.fmean(diffs),
        "paired_se": statistics.stdev(diffs) / math.sqrt(len(keys)),
        "n_pairs": len(keys),
    }


def subject_gaps(low: dict[tuple[str, int], float], high: dict[tuple[str, int], float]) -> dict[str, float]:
    """Each subject's mean gap high − low over its seeds (common keys only)."""
    by_subject: dict[str, list[float]] = {}
    for key in sorted(set(low) & set(high)):
        by_subject.setdefault(key[0], []).append(high[key] - low[key])
    return {subject: statistics.fmean(gaps) for subject, gaps in by_subject.items()}


def gate_result(
    low: dict[tuple[str, int], float],
    high: dict[tuple[str, int], float],
    complexity: dict[str, float],
    low_rank: int,
    high_rank: int,
) -> dict[str, float | int]:
    """The gate's JSON record (``GATE_KEYS``) from per-(subject, seed) DINO of the two ranks."""
    stats = paired_difference(low, high)
    gaps = subject_gaps(low, high)
    missing = sorted(set(gaps) - set(complexity))
    if missing:
        raise ValueError(f"no complexity for subject(s) {missing}")
    rho = spearman([complexity[s] for s in gaps], list(gaps.values()))
    return {"low_rank": low_rank, "high_rank": high_rank, **stats, "spearman_gap_vs_complexity": rho}


def discriminates(result: dict[str, float | int], min_z: float = MIN_Z) -> bool:
    """The issue's criterion: high − low ≥ ``min_z`` standard errors of the paired difference, and ρ > 0."""
    rho = result["spearman_gap_vs_complexity"]
    return result["paired_diff"] >= min_z * result["paired_se"] and not math.isnan(rho) and rho > 0


def rank_scores(scores: Scores, rank: int, learning_rate: str, seeds: tuple[int, ...]) -> dict[tuple[str, int], float]:
    """DINO by (subject, seed) of one rank at one learning rate, over ``seeds``."""
    name = fixed_rank_method(rank, learning_rate).name
    return {(s, seed): v for (s, m, seed), v in scores.items() if m == name and seed in seeds}


def decide(
    scores: Scores, best: dict[int, str], complexity: dict[str, float], low_ranks=LOW_RANKS, high_rank=HIGH_RANK
) -> tuple[dict, bool]:
    """The gate record of the first low rank that passes (else of the first) against ``high_rank``, and the verdict."""
    high = rank_scores(scores, high_rank, best[high_rank], CONFIRM_SEEDS)
    results = []
    for low_rank in low_ranks:
        result = gate_result(rank_scores(scores, low_rank, best[low_rank], CONFIRM_SEEDS), high, complexity,
                             low_rank, high_rank)  # fmt: skip
        if discriminates(result):
            return result, True
        results.append(result)
    return results[0], False


# ---------------------------------------------------------------------- running it
def dino_scores(bench_dir: Path) -> Scores:
    """DINO of every evaluated cell of a bench folder."""
    return {(c.subject, c.method, c.seed): c.scores["dino"] for c in collect(bench_dir) if "dino" in c.scores}


def complexities(subjects_root: Path) -> dict[str, float]:
    """Subject → ``png_bits_per_pixel`` from ``subjects.json``."""
    meta = json.loads((subjects_root / "subjects.json").read_text(encoding="utf-8"))
    return {entry["name"]: float(entry["png_bits_per_pixel"]) for entry in meta["subjects"]}


def _world(args: argparse.Namespace, out: Path) -> dict[str, Path]:
    """base/clip/dino folders: ``--world``, else (``--tiny``) a tiny world pretrained on the CPU into ``out``."""
    if args.world is None:
        from lora2.world.evaluators import pretrain_world

        world = out / "tiny_world"
        if not (world / "dino" / "config.json").is_file():
            pretrain_world(world, scale="tiny", device="cpu")
    else:
        world = Path(args.world)
    paths = {name: world / name for name in ("base", "clip", "dino")}
    absent = [str(p) for p in paths.values() if not p.is_dir()]
    if absent:
        raise ValueError(f"--world {world} lacks {absent} (pretrain it: benchmarks/gpu_world2.sh)")
    return paths


def _subjects_root(args: argparse.Namespace, out: Path, subject_set: str = "designed") -> Path:
    """The world2 subject dataset ``subject_set`` (``lora2.world.world2.SUBJECT_SETS``), written once into
    ``out/subjects`` (deterministic), unless ``--data-root``. A folder written for another set is an error."""
    if args.data_root:
        return Path(args.data_root)
    from lora2.world.world2 import SUBJECT_SETS, write_world2_subjects

    root = out / "subjects"
    version = SUBJECT_SETS[subject_set][1]
    meta = root / "subjects.json"
    if not meta.is_file():
        write_world2_subjects(root, subject_set=subject_set)
    written = json.loads(meta.read_text(encoding="utf-8"))["version"]
    if written != version:
        raise ValueError(f"{root} holds the subjects of dataset {written}, not {version}: use a new --out")
    return root


def _bench(args, world, root, subjects, methods, seeds, deadline, eval_command=None) -> dict[str, int]:
    """One ``lora2 bench`` call: ``methods`` × ``subjects`` × ``seeds`` in ``<out>/bench``, within the time left;
    ``eval_command`` replaces ``lora2 eval`` as the cells' eval job."""
    left = None if deadline is None else deadline - time.time()
    if left is not None and left < MIN_SECONDS:
        logger.warning("%.0f s left: %d methods not started (the next call resumes)", left, len(methods))
        return {}
    config = BenchConfig(
        subjects=list(subjects),
        methods=methods,
        out=str(Path(args.out) / "bench"),
        seeds=list(seeds),
        data_root=str(root),
        base=str(world["base"]),
        steps=args.steps,
        train_args=list(args.train_arg),
        eval_args=[f"dino_model={world['dino']}", f"clip_model={world['clip']}", *args.eval_arg],
        jobs_per_gpu=args.parallel,
        cpu_jobs=args.parallel,
        time_limit=left,
        **({"eval_command": eval_command} if eval_command else {}),
    )
    return bench(config)


# ---------------------------------------------------------------------- one adapter for every subject (--multi)
def write_multi_subject(
    root: Path, subjects: list[str], out: Path, folder_name: str = MULTI_SUBJECT
) -> dict[str, str]:
    """The multi-subject training folder ``out/<folder_name>`` (a DreamBooth subject of class "object" beside its
    own prompts file): every image of ``subjects`` under ``root``, renamed ``<subject>_<file>``, captioned in
    metadata.jsonl with the subject's instance prompt for its own identifier (``IDENTIFIERS`` in order). Returns
    subject → identifier, also written to ``out/identifiers.json``; a folder written for other subjects is an
    error, not rewritten."""
    if len(subjects) > len(IDENTIFIERS):
        raise ValueError(f"{len(subjects)} subjects, but only {len(IDENTIFIERS)} identifiers: {IDENTIFIERS}")
    identifiers = dict(zip(subjects, IDENTIFIERS))
    record = out / "identifiers.json"
    if record.is_file():
        before = json.loads(record.read_text(encoding="utf-8"))
        if before != identifiers:
            raise ValueError(f"{out} was written for the subjects {before}, not {identifiers}: use a new --out")
        return identifiers
    loaded = load_subjects(root)
    unknown = [name for name in subjects if name not in loaded]
    if unknown:
        raise ValueError(f"subject(s) {unknown} are not under {root}")
    folder = out / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    captions = []
    for name, identifier in identifiers.items():
        for image in loaded[name].image_paths:
            shutil.copy(image, folder / f"{name}_{image.name}")
            captions.append({"file_name": f"{name}_{image.name}", "text": loaded[name].instance_prompt(identifier)})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(c) + "\n" for c in captions), encoding="utf-8")
    from lora2.world.subjects import prompts_and_classes_text  # the world's prompts (the folder's are unused)

    entry = SimpleNamespace(name=folder_name, class_name="object")
    (out / PROMPTS_FILE).write_text(prompts_and_classes_text((entry,)), encoding="utf-8")
    record.write_text(json.dumps(identifiers, indent=1) + "\n", encoding="utf-8")
    return identifiers


def evaluate_multi(run: Path, root: Path, identifiers: dict[str, str], options: dict) -> dict:
    """Evaluate one multi-subject run on each subject with its identifier (``lora2 eval``'s ``options``) into
    ``run/eval_<subject>.json``, keeping those an earlier call wrote, then ``run/eval.json``: each subject's summary
    under ``subjects`` and their means under ``summary`` (what ``lora2 report`` reads)."""
    from lora2.eval.evaluate import METRICS, EvalConfig, adapter_summary, evaluate
    from lora2.train.atomic import atomic_write_text
    from lora2.train.run_folder import RunFolder

    bad = [name for name in identifiers if not SUBJECT_NAME.fullmatch(name)]
    if bad:
        raise ValueError(f"subject name(s) {bad} in the identifiers cannot name a file")
    summaries = {}
    for name, identifier in identifiers.items():
        output = run / f"eval_{name}.json"
        if not output.is_file():
            config = EvalConfig(run=str(run), subject=str(root / name), identifier=identifier, output=str(output),
                                **options)  # fmt: skip
            evaluate(config)
        summaries[name] = json.loads(output.read_text(encoding="utf-8"))["summary"]
    means = {metric: {"mean": statistics.fmean(s[metric]["mean"] for s in summaries.values())} for metric in METRICS}
    record = {
        "subjects": {name: {"identifier": identifiers[name], "summary": summaries[name]} for name in identifiers},
        "summary": means,
        "adapter": adapter_summary(RunFolder(run).find_adapter()),
    }
    atomic_write_text(run / "eval.json", json.dumps(record, indent=1) + "\n")
    return record


def multi_scores(bench_dir: Path, name: str = MULTI_SUBJECT) -> Scores:
    """DINO by (subject, method, seed) of every evaluated cell of the multi-subject bench subject ``name``."""
    scores = {}
    for status_path in sorted((bench_dir / "cells" / name).glob("*/seed*/status.json")):
        eval_path = status_path.parent / "run" / "eval.json"
        if not eval_path.is_file():
            continue
        status = json.loads(status_path.read_text(encoding="utf-8"))
        evaluation = json.loads(eval_path.read_text(encoding="utf-8"))
        for name, entry in evaluation["subjects"].items():
            scores[(name, status["method"], int(status["seed"]))] = entry["summary"]["dino"]["mean"]
    return scores


def _eval_multi_command(root: Path, identifiers_path: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "eval-multi", "--subjects-root", str(root),
            "--identifiers", str(identifiers_path)]  # fmt: skip


def rank_groups(ranks: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The order in which ranks are swept and confirmed: the gate's first pair (low rank 4 and rank 64), then its
    fallback low rank (8), then the rest of the curve, so that a run cut short by its time limit has the verdict
    first."""
    order = [(LOW_RANKS[0], HIGH_RANK), LOW_RANKS[1:], tuple(r for r in ranks if r not in (*LOW_RANKS, HIGH_RANK))]
    return [group for group in (tuple(r for r in g if r in ranks) for g in order) if group]


def run(args: argparse.Namespace) -> int:
    """Sweep, choose, confirm and decide, group by group (``rank_groups``); the gate files are (re)written after each
    group. Returns 0 when every rank is confirmed, 3 when cells are still missing (the next call resumes). With
    ``--sweep-only``, only the seed-0 cells of ``--ranks`` × ``--learning-rates`` (a diagnostic: no gate files)."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.time_limit if args.time_limit else None
    world = _world(args, out)
    root = _subjects_root(args, out, args.subject_set)
    complexity = complexities(root)
    subjects = list(args.subjects or complexity)
    ranks, lrs = tuple(args.ranks), tuple(args.learning_rates)
    for needed in () if args.sweep_only else (*LOW_RANKS[:1], HIGH_RANK):
        if needed not in ranks:
            raise ValueError(f"--ranks {ranks} must include the gate's ranks {LOW_RANKS[0]} and {HIGH_RANK}")
    if args.multi:  # one bench subject, the folder of all of them; scores per subject from its eval job
        name = MULTI_SUBJECT if args.subject_set == "designed" else CROWD_SUBJECT
        write_multi_subject(root, subjects, out / "multi", name)
        bench_root, bench_subjects, scores_of = out / "multi", [name], partial(multi_scores, name=name)
        eval_command = _eval_multi_command(root, out / "multi" / "identifiers.json")
    else:
        bench_root, bench_subjects, scores_of, eval_command = root, subjects, dino_scores, None
    if args.sweep_only:
        _bench(
            args, world, bench_root, bench_subjects, sweep_methods(ranks, lrs), (SWEEP_SEED,), deadline, eval_command
        )
        return 0
    best: dict[int, str] = {}
    for group in rank_groups(ranks):
        logger.info("ranks %s: %d learning rates x %d subjects, seed %d", group, len(lrs), len(subjects), SWEEP_SEED)
        _bench(args, world, bench_root, bench_subjects, sweep_methods(group, lrs), (SWEEP_SEED,), deadline,
               eval_command)  # fmt: skip
        try:
            best |= best_learning_rates(scores_of(out / "bench"), group, lrs, subjects)
        except ValueError as error:
            logger.warning("%s", error)
            return 3
        logger.info("best learning rates: %s", best)
        _bench(args, world, bench_root, bench_subjects, confirm_methods(best), CONFIRM_SEEDS, deadline, eval_command)
        scores = scores_of(out / "bench")
        expected = len(best) * len(subjects) * len(CONFIRM_SEEDS)
        confirmed = sum(1 for (_, m, seed) in scores if seed in CONFIRM_SEEDS and m in confirm_methods(best))
        if confirmed < expected:
            logger.warning("confirmation: %d of %d cells evaluated; run the same command again", confirmed, expected)
            return 3
        result, verdict = decide(scores, best, complexity, tuple(r for r in LOW_RANKS if r in best))
        write_results(out, result, verdict, scores, best, complexity)
    return 0


def write_results(out: Path, result: dict, verdict: bool, scores: Scores, best: dict[int, str], complexity) -> None:
    """``world2_gate.json`` (the issue's keys, in order; an undefined ρ as null) and ``world2_gate_cells.json``
    (everything behind it)."""
    record = {k: None if isinstance(result[k], float) and math.isnan(result[k]) else result[k] for k in GATE_KEYS}
    (out / "world2_gate.json").write_text(json.dumps(record, indent=1) + "\n")
    means = {
        rank: statistics.fmean(rank_scores(scores, rank, lr, CONFIRM_SEEDS).values()) for rank, lr in best.items()
    }
    low = rank_scores(scores, result["low_rank"], best[result["low_rank"]], CONFIRM_SEEDS)
    high = rank_scores(scores, result["high_rank"], best[result["high_rank"]], CONFIRM_SEEDS)
    details = {
        "discriminates": verdict,
        "criterion": f"paired_diff >= {MIN_Z} * paired_se and spearman_gap_vs_complexity > 0",
        "best_learning_rate": {str(r): lr for r, lr in best.items()},
        "mean_dino_confirm_seeds": {str(r): m for r, m in means.items()},
        "subject_gap": subject_gaps(low, high),
        "complexity_png_bits_per_pixel": complexity,
        "cells": [{"subject": s, "method": m, "seed": seed, "dino": v} for (s, m, seed), v in sorted(scores.items())],
    }
    (out / "world2_gate_cells.json").write_text(json.dumps(details, indent=1) + "\n")
    logger.info("gate: %s -> %s", record, "discriminates" if verdict else "does not")


# ---------------------------------------------------------------------- describe
def describe(seed: int = 0) -> dict:
    """The world2 base model's numbers from its configuration (the architecture the first world's base is grown to;
    the weights play no part) and its subjects' levels and measured complexity."""
    from torch import nn

    from lora2.lora.config import DEFAULT_TARGETS, LoRA2Config
    from lora2.world.pretrain import SCALES, component_sizes, initial_pipeline
    from lora2.world.subjects import png_bits_per_pixel
    from lora2.world.world2 import PNG_ROTATIONS, SUBJECTS

    scale = SCALES["world2"]
    pipe = initial_pipeline(scale, seed)
    sizes = component_sizes(pipe, scale.image_size)
    targets = LoRA2Config()
    shapes = Counter(
        f"{module.in_features}->{module.out_features}"
        for name, module in pipe.unet.named_modules()
        if isinstance(module, nn.Linear) and targets.is_target(name)
    )
    unet = pipe.unet.config
    subjects = [
        {"name": subject.name, "class": subject.class_name, "level": subject.level, "parts": len(subject.layers),
         "png_bits_per_pixel": round(png_bits_per_pixel(subject, rotations=PNG_ROTATIONS), 4),
         "description": subject.description}
        for subject in SUBJECTS
    ]  # fmt: skip
    return {
        **sizes,
        "fp16_mb": sizes["fp16_bytes"] / 1e6,
        "unet_block_out_channels": list(unet.block_out_channels),
        "unet_transformer_layers_per_block": list(unet.transformer_layers_per_block),
        "unet_layers_per_block": unet.layers_per_block,
        "target_modules": list(DEFAULT_TARGETS),
        "adapted_layers": sum(shapes.values()),
        "adapted_layer_shapes": dict(sorted(shapes.items())),
        "subjects": subjects,
        "command": "python benchmarks/world2_gate.py describe --json benchmarks/results/world2_config.json",
    }


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gate = sub.add_parser("run", help="sweep, confirm and decide the gate")
    gate.add_argument("--out", required=True, help="output folder (bench/, subjects/, world2_gate*.json)")
    gate.add_argument("--world", help="folder with the world2 base/, clip/, dino/ (benchmarks/gpu_world2.sh)")
    gate.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny random world")
    gate.add_argument("--data-root", help="subject folders (default: the world2 subjects, written into OUT)")
    gate.add_argument("--subjects", nargs="+", help="subject names (default: all under the data root)")
    gate.add_argument("--multi", action="store_true", help="one adapter for all subjects (protocol MULTI)")
    thirty = gate.add_mutually_exclusive_group()  # the subject set (lora2.world.world2.SUBJECT_SETS)
    gate.set_defaults(subject_set="designed")
    for subject_set, subjects in THIRTY_SUBJECT_SETS.items():
        thirty.add_argument(f"--{subject_set}", dest="subject_set", action="store_const", const=subject_set,
                            help=f"--multi over {subjects} (CROWD)")  # fmt: skip
    gate.add_argument("--sweep-only", action="store_true", help="only the seed-0 cells of --ranks x --learning-rates")
    gate.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    gate.add_argument("--learning-rates", nargs="+", default=list(LEARNING_RATES))
    gate.add_argument("--steps", type=int, help=f"training steps of a cell (default 300, --multi {MULTI['steps']})")
    gate.add_argument("--parallel", type=int, default=1, help="concurrent jobs (per GPU, or on the CPU)")
    gate.add_argument("--time-limit", type=float, help="seconds for the whole command; the next call resumes")
    gate.add_argument("--train-arg", action="append", default=list(TRAIN_ARGS), help="KEY=VALUE for every train")
    gate.add_argument("--eval-arg", action="append", default=[], help="KEY=VALUE for every eval, after the protocol's")
    multi = sub.add_parser("eval-multi", help="evaluate a multi-subject run per subject (the bench's eval job)")
    multi.add_argument("--run", required=True, help="the run folder")
    multi.add_argument("--subjects-root", required=True, help="the subjects' DreamBooth root")
    multi.add_argument("--identifiers", required=True, help="identifiers.json (subject -> identifier)")
    add_eval_arguments(multi)
    info = sub.add_parser("describe", help="the world2 base model's numbers from its configuration")
    info.add_argument("--json", help="also write them to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = _parser().parse_args(argv)
    if args.command == "describe":
        numbers = describe()
        text = json.dumps(numbers, indent=1) + "\n"
        if args.json:
            Path(args.json).write_text(text)
        sys.stdout.write(text)
        return 0
    if args.command == "eval-multi":
        options = {k: v for k, v in vars(args).items() if k not in ("command", "run", "subjects_root", "identifiers")}
        identifiers = json.loads(Path(args.identifiers).read_text(encoding="utf-8"))
        evaluate_multi(Path(args.run), Path(args.subjects_root), identifiers, options)
        return 0
    if args.subject_set != "designed":  # thirty subjects, one adapter
        args.multi, protocol = True, CROWD
    else:
        protocol = MULTI if args.multi else {"steps": 300, "train_args": (), "eval_args": EVAL_ARGS}
    args.steps = args.steps or protocol["steps"]
    args.eval_arg = [*protocol["eval_args"], *args.eval_arg]
    if args.tiny:
        args.ranks, args.learning_rates = list(TINY["ranks"]), list(TINY["learning_rates"])
        args.subjects, args.steps = list(TINY["subjects"]), TINY["steps"]
        args.train_arg, args.eval_arg = list(TINY["train_args"]), list(TINY["eval_args"])
        args.parallel = max(args.parallel, 2)
    elif not args.world:
        raise SystemExit("run: give --world DIR (base/, clip/, dino/) or --tiny")
    args.train_arg = [*args.train_arg, *protocol["train_args"]]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
