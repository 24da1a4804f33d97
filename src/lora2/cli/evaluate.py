"""`lora2 eval`, `lora2 bench`, `lora2 report`: thin flag parsing around lora2.eval."""

from __future__ import annotations

import argparse
import json


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The generation and scoring options of `lora2 eval` (the fields of EvalConfig other than what is evaluated)."""
    parser.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="image j of every prompt uses seed + j")
    parser.add_argument("--num-inference-steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the run's, else 5.0")
    parser.add_argument("--resolution", type=int, default=None, help="default: the run's training resolution")
    parser.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N of the 25 prompts")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="images per pipeline call (default: 8 on the CPU, 64 on a GPU)"
    )
    parser.add_argument("--dino-model", default=None, help="ViT folder or hub id (default: world's, else dino-vits16)")
    parser.add_argument("--clip-model", default=None, help="CLIP folder or hub id (default: world's, else ViT-B/32)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))


def _run_eval(args: argparse.Namespace) -> int:
    from lora2.eval.evaluate import EvalConfig, evaluate

    keys = ("run", "base", "lora", "subject", "identifier", "num_images", "seed", "num_inference_steps",
            "guidance_scale", "resolution", "max_prompts", "batch_size", "dino_model", "clip_model", "device", "dtype",
            "output", "save_images")  # fmt: skip
    result = evaluate(EvalConfig(**{key: getattr(args, key) for key in keys}))
    print(json.dumps({"subject": result["subject"], **result["summary"]}, indent=1))
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from lora2.eval.bench import BenchConfig, bench

    config = BenchConfig(
        subjects=args.subjects, methods=args.methods, out=args.out, seeds=args.seeds, data_root=args.data_root,
        base=args.base, steps=args.steps, train_args=args.train_arg, eval_args=args.eval_arg, gpus=args.gpus,
        jobs_per_gpu=args.jobs_per_gpu, cpu_jobs=args.cpu_jobs, time_limit=args.time_limit,
        retry_failed=args.retry_failed, skip_eval=args.skip_eval,
    )  # fmt: skip
    states = bench(config)
    print(json.dumps(states))
    return 0 if set(states) <= {"done", "unsupported"} else 1


def _run_report(args: argparse.Namespace) -> int:
    from lora2.eval.report import report

    print(report(*args.dirs, out=args.out))
    return 0


def register(subparsers) -> None:
    """Add the eval, bench and report subcommands."""
    parser = subparsers.add_parser("eval", help="generate the 25 DreamBooth prompts and score DINO, CLIP-I, CLIP-T")
    parser.add_argument("--run", default=None, help="training run folder (adapter, base and subject from its config)")
    parser.add_argument("--base", default=None, help="base pipeline (hub id or folder)")
    parser.add_argument("--lora", default=None, help="LoRA file (diffusers format)")
    parser.add_argument("--subject", default=None, help="DreamBooth subject folder")
    parser.add_argument("--identifier", default=None, help="identifier token (default: the run's, else sks)")
    parser.add_argument("--output", default=None, help="JSON path (default <run>/eval.json)")
    parser.add_argument("--save-images", action="store_true", help="also save the generated images")
    add_eval_arguments(parser)
    parser.set_defaults(func=_run_eval)

    from lora2.eval.bench import method_registry

    methods = ", ".join(method_registry())
    parser = subparsers.add_parser("bench", help="train and evaluate subjects x methods x seeds over all GPUs")
    parser.add_argument(
        "--subjects", nargs="+", required=True, help="subject folders or names under --data-root, or 'all'"
    )
    families = (
        "fixed-<r>[-lr<rate>], lora2-<rt|lr|le|wp|rr|init|q|nulr><value>|scale<first|sum|none>…, dora-<r>[-lr<rate>], "
        "adalora-<init>-<target>[-lr<rate>], svd-<method>-<to|ranks|uniform>-<method>, iso[-lr<rate>]-<method>"
    )
    parser.add_argument(
        "--methods", nargs="+", required=True, help=f"method names or 'all': {methods}; families: {families}"
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", required=True, help="bench folder (resumable)")
    parser.add_argument("--data-root", default=None, help="DreamBooth root for subject names (default: the world's)")
    parser.add_argument("--base", default=None, help="base pipeline for every run (default: the trainer's)")
    parser.add_argument("--steps", type=int, default=None, help="training steps of every run")
    parser.add_argument("--train-arg", action="append", default=[], metavar="KEY=VALUE", help="extra train option")
    parser.add_argument("--eval-arg", action="append", default=[], metavar="KEY=VALUE", help="extra eval option")
    parser.add_argument("--gpus", nargs="+", type=int, default=None, help="GPU ids (default: all visible)")
    parser.add_argument("--jobs-per-gpu", type=int, default=1, help="jobs packed onto one GPU")
    parser.add_argument("--cpu-jobs", type=int, default=1, help="concurrent jobs without GPU")
    parser.add_argument("--time-limit", type=float, default=None, help="seconds; then stop (resume on next call)")
    parser.add_argument("--retry-failed", action="store_true", help="rerun cells that failed in an earlier call")
    parser.add_argument("--skip-eval", action="store_true", help="train only")
    parser.set_defaults(func=_run_bench)

    parser = subparsers.add_parser("report", help="results table (report.md) and plots of bench folders")
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="bench folder(s) of one protocol, pooled")
    parser.add_argument("--out", default=None, help="report folder (default: the bench folder, if only one)")
    parser.set_defaults(func=_run_report)
