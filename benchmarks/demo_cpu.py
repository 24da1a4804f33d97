"""Wall time, peak memory and metrics of ``lora2 demo`` on this machine's CPU (issue 6 bounds it at 10 minutes).

Runs ``python -m lora2.cli demo --out DIR`` in a child process with CUDA hidden and records its wall-clock time, its
peak resident memory (``getrusage`` of the children), the load average before and after (the machine may be shared),
the demo's ``metrics.json`` and its ranks line. Writes benchmarks/results/demo_cpu.json (or ``--out``).

    python benchmarks/demo_cpu.py [--out FILE] [--demo-out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).parent / "results" / "demo_cpu.json"


def run_demo(demo_out: Path) -> dict:
    """One ``lora2 demo`` into a fresh ``demo_out``; its time, memory, load and outputs."""
    shutil.rmtree(demo_out, ignore_errors=True)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    load_before = os.getloadavg()
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "lora2.cli", "demo", "--out", str(demo_out)], env=env, capture_output=True, text=True
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"lora2 demo failed ({done.returncode}):\n{done.stderr[-2000:]}")
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux: KiB
    ranks = [line for line in done.stderr.splitlines() if "ranks: total" in line]
    return {
        "wall_seconds": round(seconds, 1),
        "peak_rss_gib": round(peak_kib / 2**20, 2),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "metrics": json.loads((demo_out / "metrics.json").read_text()),
        "ranks": ranks[-1].split("ranks: ", 1)[1] if ranks else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"results file (default {OUT})")
    parser.add_argument("--demo-out", type=Path, default=Path("/tmp/lora2_demo_bench"), help="the demo's folder")
    args = parser.parse_args()
    import torch

    result = {
        "command": "python benchmarks/demo_cpu.py" + ("" if args.out == OUT else f" --out {args.out}"),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **run_demo(args.demo_out),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
