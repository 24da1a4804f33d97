"""``lora2 world ...``: the built-in world (paths of its models, its subject dataset).

Each sub-subcommand is one ``_add_<name>(world_subparsers)`` function registered in ``register``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _info(args: argparse.Namespace) -> int:
    from lora2.world import info

    result = info()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    for key, value in result.items():
        if key not in ("ready", "paths"):
            state = "" if key not in result["ready"] else ("  [ready]" if result["ready"][key] else "  [missing]")
            print(f"{key:16s} {value}{state}")
    return 0


def _subjects(args: argparse.Namespace) -> int:
    from lora2.world.subjects import write_subjects

    print(write_subjects(Path(args.out), size=args.size))
    return 0


def _sample(args: argparse.Namespace) -> int:
    from lora2.world.generator import write_samples

    print(write_samples(Path(args.out), n=args.n, seed=args.seed, size=args.size, held_out=args.held_out))
    return 0


def _pretrain(args: argparse.Namespace) -> int:
    from lora2.world.evaluators import pretrain_world
    from lora2.world.pretrain import pretrain_base

    if args.init_from:
        options = {"steps": args.steps, "device": args.device, "scale": args.scale, "seed": args.seed}
        print(pretrain_base(Path(args.out) / "base", init_from=args.init_from, **options))
        return 0
    print(pretrain_world(Path(args.out), scale=args.scale, device=args.device, steps=args.steps, seed=args.seed))
    return 0


def _add_pretrain(sub) -> None:
    parser = sub.add_parser("pretrain", help="pretrain the world's base model and evaluators (GPU: ~8 min on an H200)")
    parser.add_argument("--out", required=True, help="output folder: base/, clip/, dino/ are written there")
    parser.add_argument(
        "--scale",
        default="full",
        choices=("full", "tiny", "world2", "world2-tiny"),
        help="tiny: a CPU-sized smoke run; world2: the second world (128 px, docs/WORLD.md)",
    )
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--steps", type=int, default=None, help="UNet steps (wall-clock budgets still apply)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--init-from", help="continue the UNet + text encoders of this base pipeline (VAE kept) into OUT/base"
    )
    parser.set_defaults(func=_pretrain)


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _add_info(sub) -> None:
    parser = sub.add_parser("info", help="paths of the world's base model, evaluators and subjects")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=_info)


def _add_subjects(sub) -> None:
    parser = sub.add_parser("subjects", help="write the subject dataset (DreamBooth layout) to a folder")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    parser.set_defaults(func=_subjects)


def _add_sample(sub) -> None:
    parser = sub.add_parser("sample", help="write a grid of captioned world images (grid.png, captions.txt)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("-n", type=int, default=64, help="number of images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument(
        "--held-out",
        default="exclude",
        choices=("exclude", "only", "include"),
        help="held-out (shape, colour) pairs: never (pretraining), only, or either",
    )
    parser.set_defaults(func=_sample)


def register(subparsers) -> None:
    """Add ``lora2 world {info,subjects,sample,pretrain}``."""
    parser = subparsers.add_parser("world", help="the built-in offline world")
    sub = parser.add_subparsers(dest="world_command", required=True)
    for add in (_add_info, _add_subjects, _add_sample, _add_pretrain):
        add(sub)
