"""``lora2 train``, ``lora2 generate`` and ``lora2 demo``: parse flags into a config, call one library function."""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger("lora2")


# exit codes of `lora2 train` (README): 0 done, 2 bad input (cli.main), 3 diverged, 128 + signal when interrupted
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = {"SIGINT": 130, "SIGTERM": 143}


def _train(args: argparse.Namespace) -> int:
    from lora2.train.config import config_from_args
    from lora2.train.recipe import TrainingDiverged, train

    # storage that grows and shrinks with the ranks, cached latents, parked encoders and final samples fragment the
    # CUDA caching allocator; expandable segments let freed memory be reused (read at the first CUDA allocation)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    config = config_from_args(args)
    try:
        result = train(config)
    except TrainingDiverged as error:
        logger.error("%s", error)
        return EXIT_DIVERGED
    if result.status == "interrupted":
        logger.warning("interrupted at step %d; continue with --resume latest: %s", result.step, result.output_dir)
        return EXIT_INTERRUPTED.get(result.signal_name, 143)
    logger.info("finished at step %d; outputs in %s:", result.step, result.output_dir)
    for key, path in result.files.items():
        logger.info("  %-13s %s", key, path)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lora2.train.generate import GenerateConfig, generate

    options = {k: v for k, v in vars(args).items() if k in GenerateConfig.__dataclass_fields__ and v is not None}
    generate(GenerateConfig(**options))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from lora2.demo import DEMO_SUBJECT, demo

    demo(args.out, max_train_steps=args.steps, overwrite=args.overwrite, subject=args.subject or DEMO_SUBJECT)
    return 0


def register(subparsers) -> None:
    """Add the ``train``, ``generate`` and ``demo`` subcommands."""
    from lora2.train.config import add_config_arguments

    train = subparsers.add_parser(
        "train",
        help="DreamBooth fine-tuning with LoRA² (or fixed-rank LoRA)",
        description="Every TrainConfig field is a flag (--max-train-steps or --max_train_steps); flags override "
        "the values of --config FILE.yaml.",
    )
    train.add_argument("--config", help="YAML file of TrainConfig fields")
    add_config_arguments(train)
    train.set_defaults(func=_train)

    generate = subparsers.add_parser("generate", help="images from a base pipeline with a LoRA file")
    generate.add_argument("--base", default="", help="pipeline hub id or folder (default: the world model)")
    generate.add_argument("--lora", help="adapter file or folder, loaded with pipe.load_lora_weights")
    generate.add_argument("--prompt", dest="prompts", action="append", required=True, help="repeat for more prompts")
    generate.add_argument("--negative-prompt", dest="negative_prompt")
    generate.add_argument("--seed", type=int, default=0, help="image j of each prompt uses seed + j")
    generate.add_argument("--num-images", dest="num_images", type=int, default=1)
    generate.add_argument("--steps", type=int, default=25)
    generate.add_argument("--guidance", type=float, default=5.0)
    generate.add_argument("--height", type=int)
    generate.add_argument("--width", type=int)
    generate.add_argument("--device", default="auto")
    generate.add_argument("--out", required=True, help="a .png file (one image) or a folder")
    generate.set_defaults(func=_generate)

    demo = subparsers.add_parser("demo", help="personalise a built-in world subject on CPU (offline, minutes)")
    demo.add_argument("--out", default="lora2_demo", help="output folder")
    demo.add_argument("--steps", type=int, default=150, help="training steps")
    demo.add_argument("--overwrite", action="store_true", help="replace an earlier demo run in --out")
    demo.add_argument("--subject", default=None, help="world subject (default target_circle; lora2 world subjects)")
    demo.set_defaults(func=_demo)
