"""`lora2 bench`: the grid subjects × methods × seeds, trained and evaluated in subprocesses over all GPUs.

Every cell (subject, method, seed) is a chain of jobs: ``train`` (``lora2 train`` through ``LORA2_COMMAND``; for
the ``svd-512-*`` methods instead an SVD truncation of the fixed-512 adapter to the lora2 cell's size,
``svd_resize``), then ``eval`` (``lora2 eval --run``). Jobs run as subprocesses with ``CUDA_VISIBLE_DEVICES`` set to
one GPU; ``jobs_per_gpu`` jobs share a GPU (the world's models are small); with no GPU, ``cpu_jobs`` run on the CPU.
A job dies with its bench: it gets SIGTERM (and checkpoints) when the bench ends, even by SIGKILL
(``lockfile.die_with_parent``, Linux). One cell never runs two jobs at once: the bench takes the cell's ``job.lock``
before starting a job and waits while another live process holds it (a job of a killed bench still ending,
another bench on the same folder); a lock whose processes are gone is replaced.

Folder layout (resumable: a job whose marker exists is skipped; a job that fails is retried once, then the cell is
recorded as failed with its error and skipped by later calls unless ``retry_failed``)::

    out/
        bench.json                      # the grid: subjects, methods, seeds, steps, extra train/eval args
        cells.jsonl                     # append-only: one line per finished, failed or skipped job attempt
        cells/<subject>/<method>/seed<k>/
            status.json                 # state (pending|running|done|failed|unsupported|interrupted), attempts
            job.lock                    # while a job runs: host, pids and start times of the bench and the job
            train.done  eval.done       # markers of finished jobs
            train.log   eval.log        # stdout + stderr of the last attempt
            run/                        # the training run folder (train_config.yaml, adapter, eval.json)
"""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from lora2.data import load_subject, load_subjects
from lora2.eval.evaluate import adapter_summary, default_base, resolve_evaluators, world_info
from lora2.lockfile import LockFile, die_with_parent
from lora2.lora.config import LORA2_ENTROPY_WEIGHT
from lora2.rank.budget import uniform_ranks
from lora2.train.run_folder import CONFIG_FILE, MAIN_ADAPTER

logger = logging.getLogger(__name__)

FIXED_RANKS = (8, 16, 32, 64, 128, 256, 512)
# fixed-rank LoRA of any power-of-two rank, optionally at its own learning rate: "fixed-4", "fixed-4-lr3e-4"
NUMBER = r"\d+(?:\.\d+)?(?:e-?\d+)?"
FIXED_NAME = re.compile(rf"fixed-(\d+)(?:-lr({NUMBER}))?")
# LoRA² with some options changed, each as a suffix: "lora2-rt16", "lora2-rt16-lr3e-4", "lora2-le1e-3-wp1e-4"
LORA2_OPTIONS = {"rt": "target_rank", "lr": "learning_rate", "le": "entropy_weight", "wp": "weight_reg_weight",
                 "rr": "rank_reg_weight", "init": "init_rank", "q": "quantile", "nulr": "nu_lr"}  # fmt: skip
LORA2_OPTION = re.compile(rf"-(?:({'|'.join(LORA2_OPTIONS)})({NUMBER})|scale(first|sum|none))")  # Λ scaling by name
LORA2_NAME = re.compile(rf"lora2((?:{LORA2_OPTION.pattern})+)")
# the peft baselines at any size: "dora-16", "dora-16-lr1e-3", "adalora-32-16" (init rank → mean final rank)
PEFT_NAME = re.compile(rf"(dora|adalora)-(\d+)(?:-(\d+))?(?:-lr({NUMBER}))?")
# an SVD truncation of one method's adapter sized after another's: "svd-<source>-<allocation>-<target>"
SVD_NAME = re.compile(r"svd-(.+?)-(to|ranks|uniform)-(.+)")
SVD_ALLOCATIONS = {"to": "budget", "ranks": "layers", "uniform": "uniform"}
ALLOCATIONS = ("budget", "layers", "uniform")
# uniform LoRA trained at another method's parameter count: "iso-<target>", "iso-lr3e-4-<target>"
ISO_NAME = re.compile(rf"iso(?:-lr({NUMBER}))?-(.+)")
ISO_RANK_OPTIONS = ("init_rank", "max_rank", "rank_pattern")  # what ``iso_rank_options`` sets on an iso cell
# the "lora2" method as the first world's cells ran it: λ_e 1e-4 (the trainer's default since issue 19) and no weight
# prior (the default), spelled out so that a cell's arguments do not change with a default
LORA2_ARGS = {"rank_mode": "adaptive", "entropy_weight": LORA2_ENTROPY_WEIGHT, "weight_reg_weight": 0.0}
# sizes of the peft baselines, comparable to lora2's measured mean rank of about 24 (docs/RESULTS.md)
DORA_RANK = 32
ADALORA_RANKS = (32, 16)  # init_r → target_r (mean final rank per layer)
MAX_ATTEMPTS = 2
CELL_LOCK = "job.lock"  # held (lockfile.LockFile) by the bench and the job it runs in the cell
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# BenchConfig fields that change results: a bench folder refuses a call that changes them
PROTOCOL_KEYS = ("base", "steps", "train_args", "eval_args")
# ``python -m lora2.cli`` needs a cli/__main__.py; this works with only the package on PYTHONPATH (no install)
LORA2_COMMAND = (sys.executable, "-c", "import sys; from lora2.cli import main; sys.exit(main())")
RESIZE_COMMAND = (
    sys.executable,
    "-c",
    "import sys; from lora2.eval.bench import resize_main; sys.exit(resize_main())",
)


@dataclass(frozen=True)
class Method:
    """One row of the benchmark.

    train_args: ``lora2 train`` options (TrainConfig field names) that define the method; for "resize" methods the
        options of ``svd_resize``.
    kind: "train" (a training run), "iso" (a training run whose ranks come from another cell's adapter,
        ``iso_rank_options``), "resize" (SVD truncation of another cell's adapter), or "unsupported" (recorded as
        such with ``reason``, never run; no built-in method is unsupported any more).
    depends_on: methods of the same subject and seed whose adapters this one needs.
    """

    name: str
    description: str
    train_args: dict = field(default_factory=dict)
    kind: str = "train"
    depends_on: tuple[str, ...] = ()
    reason: str = ""


def fixed_rank_method(rank: int, learning_rate: str | None = None) -> Method:
    """LoRA of rank ``rank`` (a power of two, as in ``FIXED_RANKS``) in every layer ("fixed-<rank>").

    With ``learning_rate`` (as written, e.g. "3e-4") the method trains at that learning rate and is named
    "fixed-<rank>-lr<learning_rate>": a learning-rate sweep in one grid (a bench refuses ``train_args`` that set
    learning_rate beside it, ``Bench._check_train_args``).
    """
    if rank < 1 or rank & (rank - 1):
        raise ValueError(f"a fixed-rank method's rank must be a power of two, got {rank}")
    args = {"rank_mode": "fixed", "init_rank": rank, "max_rank": max(512, rank)}
    if learning_rate is None:
        return Method(f"fixed-{rank}", f"LoRA, rank {rank} in every layer", args)
    if not float(learning_rate) > 0:
        raise ValueError(f"a fixed-rank method's learning rate must be > 0, got {learning_rate!r}")
    return Method(
        f"fixed-{rank}-lr{learning_rate}",
        f"LoRA, rank {rank} in every layer, learning rate {learning_rate}",
        {**args, "learning_rate": float(learning_rate)},
    )


def lora2_variant(name: str) -> Method | None:
    """LoRA² with the options its name's suffixes set (``LORA2_OPTIONS``: "lora2-rt16-lr3e-4"), else None."""
    match = LORA2_NAME.fullmatch(name)
    if match is None:
        return None
    args: dict = dict(LORA2_ARGS)
    for key, value, scaling in LORA2_OPTION.findall(match[1]):
        if scaling:
            args["lambda_scaling"] = scaling
            continue
        option = LORA2_OPTIONS[key]
        args[option] = int(value) if option == "init_rank" else float(value)
    settings = ", ".join(f"{key} {value}" for key, value in args.items() if key != "rank_mode")
    return Method(name, f"LoRA² with {settings}", args)


def peft_method(name: str) -> Method | None:
    """ "dora-<r>[-lr<rate>]" (DoRA of rank r) or "adalora-<init>-<target>[-lr<rate>]" (AdaLoRA pruned from ``init`` to
    a mean rank ``target``), else None."""
    match = PEFT_NAME.fullmatch(name)
    if match is None or (match[1] == "adalora") != (match[3] is not None):
        return None
    args: dict = {"adapter_type": match[1], "init_rank": int(match[2])}
    if match[3] is not None:
        args["target_rank"] = int(match[3])
    if match[4] is not None:
        args["learning_rate"] = float(match[4])
    return Method(name, f"peft {match[1]} with {', '.join(f'{k} {v}' for k, v in args.items())}", args)


def svd_method(name: str) -> Method | None:
    """ "svd-<source>-<to|ranks|uniform>-<target>": ``source``'s adapter truncated by SVD to ``target``'s size (to:
    its total rank where σ² is largest; ranks: its rank in every layer; uniform: one rank at its parameter count)."""
    match = SVD_NAME.fullmatch(name)
    if match is None:
        return None
    source, how, target = match[1], match[2], match[3]
    description = {"to": "to {t}'s total rank, kept where σ² is largest", "ranks": "to {t}'s rank in every layer",
                   "uniform": "to one rank in every layer at {t}'s parameter count"}[how]  # fmt: skip
    return Method(name, f"{source} adapter truncated by SVD " + description.format(t=target),
                  {"allocation": SVD_ALLOCATIONS[how]}, kind="resize", depends_on=(source, target))  # fmt: skip


def iso_method(name: str) -> Method | None:
    """ "iso-<target>" (or "iso-lr<rate>-<target>"): LoRA of one rank in every layer (⌊r*⌋ or ⌈r*⌉), trained, with the
    parameter count of ``target``'s adapter of the same subject and seed."""
    match = ISO_NAME.fullmatch(name)
    if match is None:
        return None
    args: dict = {"rank_mode": "fixed"}
    if match[1] is not None:
        args["learning_rate"] = float(match[1])
    return Method(name, f"LoRA, uniform rank at {match[2]}'s parameter count", args, kind="iso",
                  depends_on=(match[2],))  # fmt: skip


def method_registry() -> dict[str, Method]:
    """All known methods by name (fixed-rank methods of other ranks and learning rates: ``resolve_methods``)."""
    methods = [fixed_rank_method(r) for r in FIXED_RANKS]
    lora2 = dict(LORA2_ARGS)
    methods += [
        Method("lora2", "LoRA² (learned ranks, rank regularisation and entropy term)", lora2),
        Method("lora2-noreg", "LoRA² without rank regularisation (λ_r = 0)", {**lora2, "rank_reg_weight": 0.0}),
        Method("lora2-noentropy", "LoRA² without the entropy term (λ_e = 0)", {**lora2, "entropy_weight": 0.0}),
        # "first" is the default Λ scaling, so the Λ-scaling ablation is lora2 / lora2-sum / lora2-none
        Method("lora2-none", "LoRA² with the paper's unnormalised Λ", {**lora2, "lambda_scaling": "none"}),
        Method("lora2-sum", "LoRA² with Λ normalised by its sum (AWNN)", {**lora2, "lambda_scaling": "sum"}),
        Method(
            "svd-512-to-lora2",
            "fixed-512 adapter truncated by SVD to the lora2 cell's total rank, kept where σ² is largest",
            {"allocation": "budget"},
            kind="resize",
            depends_on=("fixed-512", "lora2"),
        ),
        Method(
            "svd-512-lora2-ranks",
            "fixed-512 adapter truncated by SVD to the lora2 cell's rank in every layer",
            {"allocation": "layers"},
            kind="resize",
            depends_on=("fixed-512", "lora2"),
        ),
    ]
    # the peft baselines bracket LoRA²'s measured mean rank (~24, docs/RESULTS.md): AdaLoRA ends below it, DoRA above
    methods += [
        Method(
            "adalora",
            f"peft AdaLoRA, init rank {ADALORA_RANKS[0]} pruned to a mean rank of {ADALORA_RANKS[1]} per layer "
            "(budget schedule over the middle 70 % of the steps, orthogonal regularisation 0.5)",
            {"adapter_type": "adalora", "init_rank": ADALORA_RANKS[0], "target_rank": ADALORA_RANKS[1]},
        ),
        Method(
            "dora",
            f"peft DoRA, rank {DORA_RANK} in every layer plus one magnitude per output feature",
            {"adapter_type": "dora", "init_rank": DORA_RANK},
        ),
    ]
    return {m.name: m for m in methods}


@dataclass
class BenchConfig:
    """Settings of ``lora2 bench``.

    subjects: subject folders, or names under ``data_root`` ("all" = every subject there).
    data_root: DreamBooth root for subject names (default: the world's subjects when built).
    base: base pipeline passed to train (default: the trainer's default, the world model).
    steps: --max-train-steps of every training job (None: the trainer's default).
    train_args / eval_args: extra ``KEY=VALUE`` options for every train / eval job (``resolution=256``).
    gpus: GPU ids to use (default: all visible); jobs_per_gpu: jobs packed on one GPU; cpu_jobs: without GPU.
    time_limit: seconds after which no job is started and running ones get SIGTERM (the trainer checkpoints);
        the next call resumes.
    retry_failed: rerun cells recorded as failed by an earlier call.
    train_command / eval_command / resize_command: the subprocess command prefixes (tests substitute fakes).
    """

    subjects: list[str]
    methods: list[str]
    out: str
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    data_root: str | None = None
    base: str | None = None
    steps: int | None = None
    train_args: list[str] = field(default_factory=list)
    eval_args: list[str] = field(default_factory=list)
    gpus: list[int] | None = None
    jobs_per_gpu: int = 1
    cpu_jobs: int = 1
    time_limit: float | None = None
    retry_failed: bool = False
    skip_eval: bool = False
    poll_seconds: float = 2.0
    train_command: list[str] = field(default_factory=lambda: [*LORA2_COMMAND, "train"])
    eval_command: list[str] = field(default_factory=lambda: [*LORA2_COMMAND, "eval"])
    resize_command: list[str] = field(default_factory=lambda: list(RESIZE_COMMAND))

    def __post_init__(self) -> None:
        if not self.subjects:
            raise ValueError("--subjects: give at least one subject folder or name")
        if not self.methods:
            raise ValueError("--methods: give at least one method")
        if not self.seeds:
            raise ValueError("--seeds: give at least one seed")
        if self.jobs_per_gpu < 1 or self.cpu_jobs < 1:
            raise ValueError(f"jobs_per_gpu and cpu_jobs must be >= 1, got {self.jobs_per_gpu}, {self.cpu_jobs}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        for option in self.train_args + self.eval_args:
            if "=" not in option:
                raise ValueError(f"extra option {option!r} must be KEY=VALUE")


# ---------------------------------------------------------------------- validation (before any GPU time)
def find_method(name: str, registry: dict[str, Method] | None = None) -> Method | None:
    """The method of a name: a registry entry, or a name of the parametric families (fixed-rank, LoRA² variants, SVD
    truncations, iso-size LoRA); None when it is neither."""
    registry = method_registry() if registry is None else registry
    if name in registry:
        return registry[name]
    match = FIXED_NAME.fullmatch(name)
    if match:
        rank = int(match[1])
        return fixed_rank_method(rank, match[2]) if rank >= 1 and not rank & (rank - 1) else None
    return lora2_variant(name) or peft_method(name) or svd_method(name) or iso_method(name)


def resolve_methods(names: list[str]) -> list[Method]:
    """Registry entries for ``names`` ("all" = every method), and fixed-rank methods of any power-of-two rank and
    learning rate ("fixed-4", "fixed-2-lr3e-4"); dependencies must be in the grid too."""
    registry = method_registry()
    if names == ["all"]:
        return list(registry.values())
    for name in names:
        method = find_method(name, registry)
        if method is not None:
            registry[name] = method
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown}; known: {', '.join(registry)}, fixed-<power of two>[-lr<rate>], "
            f"lora2-<{'|'.join(LORA2_OPTIONS)}><value>|scale<first|sum|none>…, dora-<r>[-lr<rate>], "
            "adalora-<init>-<target>[-lr<rate>], svd-<method>-<to|ranks|uniform>-<method>, iso[-lr<rate>]-<method>"
        )
    methods = [registry[n] for n in dict.fromkeys(names)]
    for method in methods:
        missing = [d for d in method.depends_on if d not in names]
        if missing:
            raise ValueError(f"method {method.name!r} needs {missing} in --methods too")
    return methods


def _world_subjects_dir() -> Path | None:
    info = world_info(materialize=True)
    return Path(info["subjects_dir"]) if info and info.get("subjects_dir") else None


def resolve_subjects(items: list[str], data_root: str | None) -> dict[str, Path]:
    """Subject name → folder; each must load (images, prompts file, classes table) or a ValueError names it."""
    root = Path(data_root) if data_root else None
    if items == ["all"]:
        root = root or _world_subjects_dir()
        if root is None:
            raise ValueError("--subjects all needs --data-root (or the built world)")
        return {name: Path(root) / name for name in load_subjects(root)}
    folders: dict[str, Path] = {}
    for item in items:
        folder = Path(item)
        if not folder.is_dir():
            base = root or _world_subjects_dir()
            if base is None or not (base / item).is_dir():
                raise ValueError(f"subject {item!r} is neither a folder nor a subject under --data-root {base}")
            folder = base / item
        subject = load_subject(folder)
        if subject.name in folders:
            raise ValueError(f"subject name {subject.name!r} given twice ({folders[subject.name]}, {folder})")
        folders[subject.name] = folder.resolve()
    return folders


def _parse_options(options: list[str]) -> list[str]:
    """``["key_name=a b"]`` → ``["--key-name", "a", "b"]``: the value is split like a shell line (list values;
    quote a value that holds spaces: ``instance_prompt='a sks dog'``)."""
    flags = []
    for option in options:
        key, value = option.split("=", 1)
        flags += [f"--{key.strip().replace('_', '-')}", *shlex.split(value)]
    return flags


def _method_flags(args: dict) -> list[str]:
    """A method's TrainConfig overrides as ``lora2 train`` flags (dicts as JSON)."""
    flags = []
    for key, value in args.items():
        flags += [f"--{key.replace('_', '-')}", json.dumps(value) if isinstance(value, dict) else str(value)]
    return flags


# ---------------------------------------------------------------------- jobs
@dataclass
class Cell:
    """One (subject, method, seed) of the grid and its folder."""

    subject: str
    method: Method
    seed: int
    folder: Path

    @property
    def key(self) -> str:
        return f"{self.subject}/{self.method.name}/seed{self.seed}"

    @property
    def run(self) -> Path:
        return self.folder / "run"

    def status(self) -> dict:
        """The cell's status.json (a pending status when there is none)."""
        path = self.folder / "status.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))
        return {
            "subject": self.subject,
            "method": self.method.name,
            "seed": self.seed,
            "state": "pending",
            "attempts": [],
        }

    def write_status(self, **updates) -> dict:
        """Update status.json atomically (write a temporary file, rename)."""
        status = {**self.status(), **updates}
        tmp = self.folder / "status.json.tmp"
        tmp.write_text(json.dumps(status, indent=1), encoding="utf-8")
        tmp.replace(self.folder / "status.json")
        return status


@dataclass
class Job:
    """One subprocess of a cell: its command (built at launch), the jobs it waits for and its output check."""

    cell: Cell
    stage: str  # "train" | "resize" | "eval"
    command: Callable[[], list[str]]  # built at launch (a resize reads its dependency's adapter then)
    deps: list[str]
    check: Callable[[], str | None]  # after exit 0: None if the output is complete, else what is missing
    attempts: int = 0

    @property
    def key(self) -> str:
        return f"{self.cell.key}:{self.stage}"

    @property
    def marker(self) -> Path:
        return self.cell.folder / f"{'train' if self.stage == 'resize' else self.stage}.done"


def _tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


class Bench:
    """Builds the job graph of a grid and runs it over the device slots."""

    def __init__(self, config: BenchConfig):
        self.config = config
        self.threads_per_job = 1  # set by run() from the number of concurrent jobs
        self._waiting: set[str] = set()  # jobs whose cell lock another process holds (warned once)
        self.out = Path(config.out)
        self.methods = resolve_methods(config.methods)
        self.subjects = resolve_subjects(config.subjects, config.data_root)
        if config.base and Path(config.base).exists() and not (Path(config.base) / "model_index.json").is_file():
            raise ValueError(f"--base {config.base} has no model_index.json (not a diffusers pipeline folder)")
        if not config.base:
            default_base()  # the trainer's default: the world model, which must be ready
        self._check_train_args()
        if not config.skip_eval:
            self._check_evaluators()
        # seed-major: a grid stopped by its time limit has whole seeds done over every subject and method
        self.cells = [
            Cell(subject, method, seed, self.out / "cells" / subject / method.name / f"seed{seed}")
            for seed in config.seeds
            for subject in self.subjects
            for method in self.methods
        ]
        self.log_path = self.out / "cells.jsonl"
        self._check_same_settings()

    def _check_train_args(self) -> None:
        """Every training method's ``lora2 train`` options, with --steps and --train-arg, must make a valid
        TrainConfig (e.g. AdaLoRA's schedule must fit the step count): parsed as the train job will parse them."""
        import argparse

        from lora2.train.config import add_config_arguments, config_from_args

        parser = argparse.ArgumentParser(prog="lora2 train", exit_on_error=False)
        add_config_arguments(parser)
        steps = ["--max-train-steps", str(self.config.steps)] if self.config.steps else []
        bench_keys = {option.split("=", 1)[0].strip().replace("-", "_") for option in self.config.train_args}
        for method in self.methods:
            if method.kind not in ("train", "iso"):
                continue
            # the job's command line lists the method's options, then --train-arg, then an iso cell's ranks: the
            # later flag wins, so an option set twice would train something other than what the method's name says
            own = set(method.train_args) | (set(ISO_RANK_OPTIONS) if method.kind == "iso" else set())
            overlap = sorted(bench_keys & own)
            if overlap:
                raise ValueError(
                    f"method {method.name!r} sets {overlap} itself (its options: {method.train_args}); with "
                    f"--train-arg {overlap[0]}=… as well, one of the two would go unused: leave it out of --train-arg"
                )
            flags = _method_flags(method.train_args) + _parse_options(self.config.train_args) + steps
            try:
                config_from_args(parser.parse_args(flags))
            except (argparse.ArgumentError, ValueError) as error:
                raise ValueError(f"method {method.name!r}: invalid training options {flags}: {error}") from error
            except SystemExit as error:  # argparse exits on unknown flags even with exit_on_error=False
                raise ValueError(f"method {method.name!r}: invalid training options {flags}") from error

    def _check_evaluators(self) -> None:
        """Local evaluator folders must exist; a hub id (no network on GPU hosts) gets a warning before training."""
        options = dict(option.split("=", 1) for option in self.config.eval_args)
        explicit = [options.get(key, options.get(key.replace("_", "-"))) for key in ("dino_model", "clip_model")]
        for subject, folder in self.subjects.items():
            for name in resolve_evaluators(folder, *explicit):
                looks_local = name.startswith((".", "/", "~")) or Path(name).exists()
                if looks_local and not Path(name).expanduser().is_dir():
                    raise ValueError(f"evaluator folder {name} (for subject {subject!r}) does not exist")
                if not looks_local:
                    logger.warning("subject %s is evaluated with hub model %s: it must be downloadable or cached, "
                                   "else pass --eval-arg dino_model=DIR / clip_model=DIR", subject, name)  # fmt: skip

    def _check_same_settings(self) -> None:
        """A bench folder holds one protocol: settings that change results must match those of earlier calls."""
        path = self.out / "bench.json"
        if not path.is_file():
            return
        before = json.loads(path.read_text(encoding="utf-8"))
        now = asdict(self.config)
        changed = {key: (before.get(key), now[key]) for key in PROTOCOL_KEYS if before.get(key) != now[key]}
        if changed:
            details = ", ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in changed.items())
            raise ValueError(f"{self.out} was run with other settings ({details}); use a new --out or the same ones")

    # ---- job construction
    def _train_command(self, cell: Cell) -> list[str]:
        config = self.config
        command = [*config.train_command, "--instance-data-dir", str(self.subjects[cell.subject])]
        command += ["--output-dir", str(cell.run), "--seed", str(cell.seed)]
        if config.base:
            command += ["--base", config.base]
        if config.steps:
            command += ["--max-train-steps", str(config.steps)]
        command += _method_flags(cell.method.train_args) + _parse_options(config.train_args)
        if cell.method.kind == "iso":
            target = self._cell(cell.subject, cell.method.depends_on[0], cell.seed)
            command += _method_flags(iso_rank_options(target.run / MAIN_ADAPTER))
        # AdaLoRA cannot resume (its importance statistics are not checkpointed): an interrupted cell starts again
        resumable = cell.method.train_args.get("adapter_type") != "adalora"
        if resumable and any(p.name.startswith("checkpoint-") for p in cell.run.glob("checkpoint-*")):
            command += ["--resume", "latest"]
        elif cell.run.is_dir() and any(cell.run.iterdir()):
            command += ["--overwrite"]
        return command

    def _resize_command(self, cell: Cell) -> list[str]:
        source, target = (self._cell(cell.subject, name, cell.seed) for name in cell.method.depends_on)
        cell.run.mkdir(parents=True, exist_ok=True)
        # the truncated adapter is evaluated like the lora2 run it is sized after (same base, subject, identifier)
        shutil.copy(target.run / CONFIG_FILE, cell.run / CONFIG_FILE)
        return [
            *self.config.resize_command,
            str(source.run / MAIN_ADAPTER),
            "--ranks-from",
            str(target.run / MAIN_ADAPTER),
            "--output",
            str(cell.run / MAIN_ADAPTER),
            "--allocation",
            cell.method.train_args["allocation"],
        ]

    def _eval_command(self, cell: Cell) -> list[str]:
        return [*self.config.eval_command, "--run", str(cell.run), *_parse_options(self.config.eval_args)]

    def _cell(self, subject: str, method: str, seed: int) -> Cell:
        return next(c for c in self.cells if (c.subject, c.method.name, c.seed) == (subject, method, seed))

    def _check_adapter(self, cell: Cell) -> str | None:
        missing = [name for name in (MAIN_ADAPTER, CONFIG_FILE) if not (cell.run / name).is_file()]
        if missing:
            return f"exited 0 but {cell.run} has no {', '.join(missing)} (training interrupted?)"
        try:
            adapter_summary(cell.run / MAIN_ADAPTER)
        except ValueError as error:
            return str(error)
        return None

    def _check_eval(self, cell: Cell) -> str | None:
        return None if (cell.run / "eval.json").is_file() else f"exited 0 but wrote no {cell.run / 'eval.json'}"

    @staticmethod
    def _first_stage(cell: Cell) -> str:
        """The key of the job that writes ``cell``'s adapter."""
        return f"{cell.key}:{'resize' if cell.method.kind == 'resize' else 'train'}"

    def jobs(self) -> list[Job]:
        """The job graph (unsupported cells get no job)."""
        jobs = []
        for cell in self.cells:
            if cell.method.kind == "unsupported":
                continue
            deps = [self._first_stage(self._cell(cell.subject, d, cell.seed)) for d in cell.method.depends_on]
            if cell.method.kind == "resize":
                command, stage = self._resize_command, "resize"
            else:
                command, stage = self._train_command, "train"
            first = Job(cell, stage, lambda c=cell, f=command: f(c), deps, lambda c=cell: self._check_adapter(c))
            jobs.append(first)
            if not self.config.skip_eval:
                jobs.append(
                    Job(
                        cell,
                        "eval",
                        lambda c=cell: self._eval_command(c),
                        [first.key],
                        lambda c=cell: self._check_eval(c),
                    )
                )
        return jobs

    # ---- bookkeeping
    def _record(self, job: Job | None, cell: Cell, event: str, **fields) -> None:
        line = {"time": time.time(), "cell": cell.key, "stage": job.stage if job else None, "event": event, **fields}
        with self.log_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(line) + "\n")

    def _slots(self) -> list[str | None]:
        """One entry per concurrent job: a GPU id (string) or None for the CPU."""
        if self.config.gpus is not None:
            gpus = [str(g) for g in self.config.gpus]
        elif os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
            # entries as given (ids or GPU-/MIG- UUIDs); CUDA ignores everything after an invalid entry such as -1
            gpus = []
            for entry in os.environ["CUDA_VISIBLE_DEVICES"].split(","):
                if not entry.strip() or entry.strip().startswith("-"):
                    break
                gpus.append(entry.strip())
        else:
            import torch

            gpus = [str(g) for g in range(torch.cuda.device_count())]
        if not gpus:
            return [None] * self.config.cpu_jobs
        return [g for g in gpus for _ in range(self.config.jobs_per_gpu)]

    def _launch(self, job: Job, slot: str | None) -> tuple[subprocess.Popen, float]:
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = slot if slot is not None else ""
        env.setdefault("OMP_NUM_THREADS", str(self.threads_per_job))  # a user's setting wins
        src = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
        command = job.command()
        if slot is None and job.stage != "resize":
            command += ["--device", "cpu"]
        log = job.cell.folder / f"{'train' if job.stage == 'resize' else job.stage}.log"
        with log.open("w", encoding="utf-8") as handle:
            handle.write("$ " + " ".join(command) + "\n")
            handle.flush()
            # own session: a terminal's Ctrl-C reaches only the bench, which stops its jobs with SIGTERM;
            # die_with_parent: a bench killed outright (SIGKILL, OOM killer) still takes its jobs with it
            process = subprocess.Popen(
                command,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent(),
            )
        self._lock(job.cell).add_process(process.pid, stage=job.stage)
        job.attempts += 1
        job.cell.write_status(state="running", stage=job.stage, device=slot or "cpu")
        logger.info("start %s on %s (attempt %d)", job.key, f"cuda:{slot}" if slot else "cpu", job.attempts)
        return process, time.time()

    def _finish(self, job: Job, returncode: int, started: float, interrupted: bool) -> str:
        """Record an ended attempt; returns "done", "retry", "failed" or "interrupted"."""
        seconds = time.time() - started
        log = job.cell.folder / f"{'train' if job.stage == 'resize' else job.stage}.log"
        problem = None if returncode == 0 else f"exit code {returncode}"
        problem = problem or job.check()
        attempt = {"stage": job.stage, "returncode": returncode, "seconds": seconds, "error": problem}
        attempts = job.cell.status()["attempts"] + [attempt]
        if problem is None:
            job.marker.write_text(json.dumps({"seconds": seconds, "finished": time.time()}), encoding="utf-8")
            extra = {"train_seconds": seconds} if job.stage in ("train", "resize") else {}
            done = job.stage == "eval" or self.config.skip_eval
            job.cell.write_status(state="done" if done else "trained", attempts=attempts, error=None, **extra)
            self._record(job, job.cell, "done", seconds=seconds)
            return "done"
        if interrupted:
            job.cell.write_status(state="interrupted", attempts=attempts)
            self._record(job, job.cell, "interrupted", seconds=seconds)
            return "interrupted"
        error = f"{problem}\n{_tail(log)}"
        if job.attempts < MAX_ATTEMPTS:
            job.cell.write_status(state="retrying", attempts=attempts, error=error)
            self._record(job, job.cell, "retry", error=error)
            logger.warning("%s failed (%s); retrying once", job.key, problem)
            return "retry"
        job.cell.write_status(state="failed", attempts=attempts, error=error)
        self._record(job, job.cell, "failed", error=error)
        logger.error("%s failed twice: %s (log: %s)", job.key, problem, log)
        return "failed"

    @staticmethod
    def _lock(cell: Cell) -> LockFile:
        return LockFile(cell.folder / CELL_LOCK)

    def _claim(self, pending: dict[str, Job], running: set[str], done: set[str], progress) -> Job | None:
        """The first ready job whose cell lock this bench takes. A cell whose lock a live process holds (the job
        of a killed bench still ending, or another bench on the same folder) is waited for, so one cell never has
        two jobs at once; a job finished by that process meanwhile counts as done."""
        for key, job in list(pending.items()):
            if key in running or not set(job.deps) <= done:
                continue
            lock = self._lock(job.cell)
            holder = lock.acquire(stage=job.stage)
            if holder is not None:
                if key not in self._waiting:
                    self._waiting.add(key)
                    logger.warning(
                        "%s: waiting for %s, held by pids %s on %s (remove it if none of them runs)",
                        key, lock.path, [pid for pid, _ in holder.get("pids") or []], holder.get("host"),
                    )  # fmt: skip
                continue
            if job.marker.is_file():
                lock.release()
                pending.pop(key)
                done.add(key)
                progress.update()
                continue
            return job
        return None

    def _drop_unreachable(self, pending: dict[str, Job], done: set[str], failed: set[str], running: set[str]) -> None:
        """Remove jobs whose dependency failed (or was skipped as failed); record it on the cell unless the failed
        dependency is the cell's own train job, whose error stays the cell's error."""
        for key, job in list(pending.items()):
            broken = [d for d in job.deps if d not in done and (d in failed or d not in pending)]
            if not broken or key in running:
                continue
            pending.pop(key)
            failed.add(key)
            if any(not d.startswith(job.cell.key + ":") for d in broken):
                error = f"dependency failed: {', '.join(broken)}"
                job.cell.write_status(state="failed", error=error)
                self._record(job, job.cell, "failed", error=error)

    # ---- the scheduler
    def run(self) -> dict[str, int]:
        """Run every unfinished job; returns the count of cells per final state."""
        self.out.mkdir(parents=True, exist_ok=True)
        grid = asdict(self.config) | {"subject_folders": {k: str(v) for k, v in self.subjects.items()}}
        (self.out / "bench.json").write_text(json.dumps(grid, indent=1), encoding="utf-8")
        for cell in self.cells:
            cell.folder.mkdir(parents=True, exist_ok=True)
            (cell.folder / "cell.json").write_text(
                json.dumps({"subject": cell.subject, "method": asdict(cell.method), "seed": cell.seed}, indent=1)
            )
            if cell.method.kind == "unsupported" and cell.status()["state"] != "unsupported":
                cell.write_status(state="unsupported", error=cell.method.reason)
                self._record(None, cell, "unsupported", error=cell.method.reason)

        pending: dict[str, Job] = {}
        done: set[str] = set()
        for job in self.jobs():
            state = job.cell.status()["state"]
            if job.marker.is_file():
                done.add(job.key)
            elif state == "failed" and not self.config.retry_failed:
                self._record(job, job.cell, "skipped-failed")
            else:
                pending[job.key] = job
        devices = self._slots()
        # jobs share the host's cores: more intra-op threads than cores stalls every job (OpenMP spin-waits; measured
        # on 2 cores: two jobs of 2 threads each slowed from 4 to 0.1 steps/s for minutes at a time)
        self.threads_per_job = max(1, (os.cpu_count() or 1) // len(devices))
        deadline = time.time() + self.config.time_limit if self.config.time_limit else None
        progress = tqdm(total=len(pending), desc="bench jobs", unit="job")
        logger.info("%d jobs to run (%d already done) on %d slot(s)", len(pending), len(done), len(devices))
        # SIGINT/SIGTERM (Ctrl-C, a scheduler's time limit) stop the grid like --time-limit: the jobs run in their own
        # sessions, so they get SIGTERM from here (the trainer then checkpoints) and are recorded as interrupted
        signalled: list[int] = []
        handlers = {sig: signal.signal(sig, lambda number, frame: signalled.append(number)) for sig in _STOP_SIGNALS}
        try:
            self._loop(pending, done, devices, deadline, signalled, progress)
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            progress.close()
        states: dict[str, int] = {}
        for cell in self.cells:
            state = cell.status()["state"]
            states[state] = states.get(state, 0) + 1
        logger.info("bench %s: %s", self.out, states)
        return states

    def _loop(self, pending: dict[str, Job], done: set[str], devices: list[str | None], deadline: float | None,
              signalled: list[int], progress) -> None:  # fmt: skip
        """Launch ready jobs on free slots and reap finished ones until nothing is pending."""
        failed: set[str] = set()
        slots: list[tuple[Job, subprocess.Popen, float] | None] = [None] * len(devices)
        stopping = False
        while pending:
            if not stopping and (signalled or (deadline and time.time() > deadline)):
                stopping = True
                reason = f"signal {signalled[0]}" if signalled else "time limit reached"
                logger.warning("%s: stopping running jobs (they resume on the next call)", reason)
                for entry in filter(None, slots):
                    os.killpg(entry[1].pid, signal.SIGTERM)
            for index, entry in enumerate(slots):
                if entry is None or entry[1].poll() is None:
                    continue
                job, process, started = entry
                slots[index] = None
                outcome = self._finish(job, process.returncode, started, interrupted=stopping)
                self._lock(job.cell).release()
                if outcome != "retry":
                    pending.pop(job.key)
                    progress.update()
                    (done if outcome == "done" else failed if outcome == "failed" else set()).add(job.key)
            running = {entry[0].key for entry in filter(None, slots)}
            if stopping:
                pending = {key: job for key, job in pending.items() if key in running}
            self._drop_unreachable(pending, done, failed, running)
            for index, device in enumerate(devices):
                ready = None if slots[index] is not None or stopping else self._claim(pending, running, done, progress)
                if ready is not None:
                    slots[index] = (ready, *self._launch(ready, device))
                    running.add(ready.key)
            if pending:
                time.sleep(self.config.poll_seconds)


def bench(config: BenchConfig) -> dict[str, int]:
    """Validate the grid (subjects, methods, base) before any job starts, then run it; returns cell states."""
    return Bench(config).run()


# ---------------------------------------------------------------------- the iso-size and SVD baselines
def uniform_allocation(modules: dict, ranks: dict, max_rank: int | None = None) -> dict:
    """One rank per module of ``modules`` (key → LoraModule), ⌊r*⌋ or ⌈r*⌉, at the parameter count that ``ranks``
    (key → rank) has on their shapes (``lora2.rank.budget.uniform_ranks``)."""
    costs = {key: module.in_features + module.out_features for key, module in modules.items()}
    return uniform_ranks(costs, sum(rank * costs[key] for key, rank in ranks.items()), max_rank)


def iso_rank_options(adapter: str | Path) -> dict:
    """``lora2 train`` options of a fixed-rank LoRA with one rank in every layer (⌊r*⌋, some layers ⌈r*⌉) at the
    parameter count of ``adapter`` (``lora2.rank.budget.uniform_ranks``); UNet adapters only."""
    from lora2.export.formats import read_adapter

    loaded = read_adapter(adapter)
    others = sorted(set(loaded.adapter) - {"unet", ""})
    if others:
        raise ValueError(f"{adapter}: an iso-size baseline adapts the UNet only, this adapter also adapts {others}")
    modules = {name: module for component in loaded.adapter.values() for name, module in component.items()}
    ranks = uniform_allocation(modules, {name: module.rank for name, module in modules.items()})
    base = min(ranks.values())
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != base}
    options = {"init_rank": base, "max_rank": max(512, base + 1), "rank_pattern": pattern}
    assert tuple(options) == ISO_RANK_OPTIONS
    return options


def svd_resize(source: str | Path, ranks_from: str | Path, output: str | Path, allocation: str = "budget") -> Path:
    """Truncate the adapter ``source`` by SVD to the size of ``ranks_from`` (Eckart–Young per module).

    allocation "budget": total rank Σ_ℓ r_ℓ of ``ranks_from``, spent on the globally largest singular values σ²
    (``lora2.tools.merge.recompress``: the least total squared error Σ_ℓ Σ_{i>k_ℓ} σ_i² for that budget);
    "layers": each module gets exactly its rank in ``ranks_from``; "uniform": one rank everywhere (⌊r*⌋ or ⌈r*⌉,
    ``lora2.rank.budget.uniform_ranks``) with the parameter count of ``ranks_from``.
    """
    from lora2.export.formats import read_adapter
    from lora2.tools.merge import recompress
    from lora2.tools.output import output_format, write_result
    from lora2.tools.svd import lowrank_svd, truncate

    if allocation not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {allocation!r}")
    src, target = read_adapter(source), read_adapter(ranks_from)
    ranks = {(c, n): m.rank for c, modules in target.adapter.items() for n, m in modules.items()}
    entries = {(c, n): m for c, modules in src.adapter.items() for n, m in modules.items()}
    if set(ranks) != set(entries):
        raise ValueError(f"{source} and {ranks_from} adapt different modules: {sorted(set(ranks) ^ set(entries))[:5]}")
    if allocation == "budget":
        resized = recompress(src.adapter, rank_budget=sum(ranks.values()))
    else:
        if allocation == "uniform":
            ranks = uniform_allocation(entries, ranks, max_rank=min(m.rank for m in entries.values()))
        resized = {}
        for (component, name), module in entries.items():
            resized.setdefault(component, {})[name] = truncate(module, *lowrank_svd(module), ranks[(component, name)])
    step = {"op": "svd_resize", "input": str(source), "ranks_from": str(ranks_from), "allocation": allocation}
    return write_result(resized, output, output_format([src], None), [src], step)


def resize_main(argv: list[str] | None = None) -> int:
    """Entry point of a bench resize job: ``SOURCE --ranks-from FILE --output FILE --allocation ALLOCATION``."""
    import argparse

    parser = argparse.ArgumentParser(prog="lora2-bench-resize", description=svd_resize.__doc__)
    parser.add_argument("source")
    parser.add_argument("--ranks-from", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--allocation", default="budget", choices=ALLOCATIONS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    svd_resize(args.source, args.ranks_from, args.output, args.allocation)
    return 0
