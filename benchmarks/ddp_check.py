"""Multi-GPU check of the trainer: every process must end with the same ranks and bit-identical adapter weights.

Run under torchrun (one process per GPU); process 0 writes a JSON with each process's rank vector, a SHA-256 of its
adapter tensors, and the wall time of the run:

    torchrun --standalone --nproc_per_node 2 benchmarks/ddp_check.py --instance-data-dir DIR --output-dir DIR \
        --result ddp_check.json [KEY=VALUE ...]

KEY=VALUE pairs are TrainConfig fields (``max_train_steps=200``). The trainer joins the process group itself
(``WORLD_SIZE`` > 1); the group is created here first so that the results can be gathered after training.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import torch
import torch.distributed as dist

from lora2.train.config import TrainConfig
from lora2.train.recipe import train


def adapter_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the adapter tensors' names and bytes, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        digest.update(key.encode())
        digest.update(state[key].detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instance-data-dir", required=True)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("options", nargs="*", help="TrainConfig fields as KEY=VALUE")
    args = parser.parse_args()
    options = dict(item.split("=", 1) for item in args.options)  # parsed by TrainConfig's own option parser
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    config = TrainConfig.from_dict(
        {"instance_data_dir": args.instance_data_dir, "output_dir": args.output_dir, **options}
    )
    start = time.monotonic()
    result = train(config)
    seconds = time.monotonic() - start
    own = {
        "process": dist.get_rank(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "ranks": list(result.ranks.values()),
        "adapter_sha256": adapter_digest(result.adapter_state),
        "final_loss": result.losses[-1] if result.losses else None,
        "seconds": round(seconds, 2),
    }
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, own)
    if dist.get_rank() == 0:
        report = {
            "world_size": dist.get_world_size(),
            "local_world_size": int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            "config": options,
            "identical_ranks": all(p["ranks"] == gathered[0]["ranks"] for p in gathered),
            "identical_adapters": len({p["adapter_sha256"] for p in gathered}) == 1,
            "mean_rank": sum(gathered[0]["ranks"]) / max(1, len(gathered[0]["ranks"])),
            "processes": gathered,
            "torch": torch.__version__,
        }
        with open(args.result, "w") as handle:
            json.dump(report, handle, indent=2)
        print(json.dumps({k: v for k, v in report.items() if k != "processes"}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
