"""Stand-ins for `lora2 train`, `lora2 eval` and `lora2 resize` used by the bench tests (fast, no models).

train: writes train_config.yaml and a LoRA file (fixed: init_rank everywhere, or as --rank-pattern says; adaptive:
ranks varying by layer and seed); exits 1 when --init-rank equals $FAKE_CRASH_RANK. eval scores 0.5 + 0.001 · mean
rank; a run trained with --learning-rate scores 0.5 + 0.001 · mean rank · len(subject folder name) / 10
− 0.01 · |log10(lr) + 3| instead (the best learning rate is 1e-3; the gap between ranks differs by subject). Every
invocation appends a line to $FAKE_CALLS.
With $FAKE_SPANS, train appends ["begin" | "end", pid, time] lines there; it first sleeps $FAKE_TRAIN_SECONDS, and
on SIGTERM takes $FAKE_TERM_SECONDS (a checkpoint being written) before it exits with 143.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from safetensors.numpy import load_file, save_file

MODULES = [
    f"{block}.attentions.0.transformer_blocks.0.{attn}.{proj}"
    for block in ("down_blocks.1", "mid_block", "up_blocks.0")
    for attn in ("attn1", "attn2")
    for proj in ("to_q", "to_k", "to_v", "to_out.0")
]


def seed_of(name: str) -> float:
    return 0.01 * (sum(map(ord, name)) % 17)


def _write(path: Path, ranks: dict[str, int]) -> None:
    tensors = {}
    for name, rank in ranks.items():
        tensors[f"unet.{name}.lora_A.weight"] = np.full((rank, 8), 0.1 + seed_of(name), np.float32)
        tensors[f"unet.{name}.lora_B.weight"] = np.eye(8, rank, dtype=np.float32)
    save_file(tensors, str(path))


def _span(event: str) -> None:
    if "FAKE_SPANS" in os.environ:
        with open(os.environ["FAKE_SPANS"], "a") as handle:
            handle.write(json.dumps([event, os.getpid(), time.time()]) + "\n")


def _on_sigterm(number, frame) -> None:
    time.sleep(float(os.environ.get("FAKE_TERM_SECONDS", "0")))
    _span("end")
    sys.exit(143)


def main(argv: list[str]) -> int:
    stage, argv = argv[0], argv[1:]
    with open(os.environ["FAKE_CALLS"], "a") as handle:
        handle.write(json.dumps([stage, *argv]) + "\n")
    if "FAKE_THREADS" in os.environ:
        with open(os.environ["FAKE_THREADS"], "a") as handle:
            handle.write(os.environ.get("OMP_NUM_THREADS", "unset") + "\n")
    parser = argparse.ArgumentParser()
    if stage == "train":
        for flag in ("--instance-data-dir", "--output-dir", "--seed", "--base", "--max-train-steps", "--device",
                     "--rank-mode", "--init-rank", "--max-rank", "--entropy-weight", "--rank-reg-weight", "--resume",
                     "--resolution", "--adapter-type", "--target-rank", "--learning-rate", "--rank-pattern",
                     "--weight-reg-weight", "--quantile", "--nu-lr"):  # fmt: skip
            parser.add_argument(flag)
        parser.add_argument("--overwrite", action="store_true")
        args = parser.parse_args(argv)
        if args.init_rank and args.init_rank == os.environ.get("FAKE_CRASH_RANK"):
            print("Traceback: CUDA out of memory (fake)", file=sys.stderr)
            return 1
        _span("begin")
        signal.signal(signal.SIGTERM, _on_sigterm)
        time.sleep(float(os.environ.get("FAKE_TRAIN_SECONDS", "0")))
        run = Path(args.output_dir)
        run.mkdir(parents=True, exist_ok=True)
        config = {"base": args.base, "instance_data_dir": args.instance_data_dir, "identifier": "sks"}
        if args.learning_rate:
            config["learning_rate"] = float(args.learning_rate)
        (run / "train_config.yaml").write_text(yaml.safe_dump(config))
        seed = int(args.seed)
        if args.rank_mode == "fixed":
            pattern = json.loads(args.rank_pattern or "{}")
            ranks = {m: next((r for p, r in pattern.items() if re.search(rf"(^|\.){p}$", m)), int(args.init_rank))
                     for m in MODULES}  # fmt: skip
        else:
            ranks = {m: 1 + (3 * i + seed) % 7 for i, m in enumerate(MODULES)}
        _write(run / "pytorch_lora_weights.safetensors", ranks)
        _span("end")
        return 0
    if stage == "resize":
        parser.add_argument("source")
        parser.add_argument("--ranks-from")
        parser.add_argument("--output")
        parser.add_argument("--allocation")
        args = parser.parse_args(argv)
        target = load_file(args.ranks_from)
        ranks = {k[len("unet.") : -len(".lora_A.weight")]: v.shape[0] for k, v in target.items() if "lora_A" in k}
        load_file(args.source)
        _write(Path(args.output), ranks)
        return 0
    if stage == "eval":
        parser.add_argument("--run")
        parser.add_argument("--device")
        parser.add_argument("--num-images")
        parser.add_argument("--dino-model")
        parser.add_argument("--clip-model")
        args = parser.parse_args(argv)
        run = Path(args.run)
        tensors = load_file(str(run / "pytorch_lora_weights.safetensors"))
        ranks = [v.shape[0] for k, v in tensors.items() if "lora_A" in k]
        score = 0.5 + 0.001 * sum(ranks) / len(ranks)
        config = yaml.safe_load((run / "train_config.yaml").read_text())
        if "learning_rate" in config:
            subject = Path(config["instance_data_dir"]).name
            lr_penalty = 0.01 * abs(np.log10(config["learning_rate"]) + 3)
            score = 0.5 + 0.001 * sum(ranks) / len(ranks) * len(subject) / 10 - lr_penalty
        summary = {m: {"mean": score, "std": 0.01} for m in ("dino", "clip_i", "clip_t")}
        (run / "eval.json").write_text(json.dumps({"summary": summary}))
        return 0
    raise SystemExit(f"unknown stage {stage}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
