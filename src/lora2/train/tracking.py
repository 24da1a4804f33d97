"""What a run reports as it trains: log.jsonl, TensorBoard or Weights & Biases, and a progress line.

Per step the work does not grow with the number of adapted layers beyond one comparison of the rank vector: the
per-module ranks (560 entries at SDXL scale) are written to log.jsonl only at step 0 and when a rank changed
(``RunFolder.rank_history`` fills the steps between). The progress is a tqdm bar on a terminal and a plain log line
every few percent of the run (and at least every minute) when stderr is not one, so a log file stays readable.

Weights & Biases (``--report-to wandb``, an optional dependency): one wandb run per ``lora2 train`` call, in project
"lora2", named after the run folder, its local files in ``<run folder>/wandb/`` (``WANDB_MODE=offline`` keeps them
there, for ``wandb sync`` later); the same scalars as TensorBoard, the rank histogram and validation images.
"""

from __future__ import annotations

import logging
import sys
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from lora2.train.run_folder import TENSORBOARD_DIR, WANDB_DIR, RunFolder

logger = logging.getLogger(__name__)

TERMS = ("loss", "mse", "prior", "regularization", "entropy")
MIB = 2**20


class StepLog:
    """log.jsonl + TensorBoard + progress of one run (the main process writes; the others only count)."""

    def __init__(
        self, folder: RunFolder, report_to: str, total: int, start_step: int, main: bool, config: dict | None = None
    ) -> None:
        self.folder, self.total, self.main = folder, total, main
        self.last_ranks: dict[str, int] | None = None
        self.writer = self.wandb = None
        if main and report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            folder.record(TENSORBOARD_DIR)
            self.writer = SummaryWriter(str(folder.path(TENSORBOARD_DIR)), purge_step=start_step + 1)
        if main and report_to == "wandb":
            self.wandb = start_wandb(folder, config or {})
        self.progress = Progress(total, start_step, enabled=main)

    def start(self, step: int, ranks: dict[str, int]) -> None:
        """Step 0 of a new run records the initial ranks; a resumed run continues from the checkpoint's."""
        if self.main and step == 0:
            self.folder.append_log({"step": 0, "ranks": ranks})
        self.last_ranks = ranks

    def step(self, step: int, terms: torch.Tensor, lr: float, ranks: dict[str, int], parameters: int) -> None:
        """Record one optimizer step: the loss terms (``TERMS`` order), lr, ranks and adapter size."""
        total_rank = sum(ranks.values())
        self.progress.update(step, float(terms[0]), total_rank, len(ranks), parameters * 4 / MIB)
        if not self.main:
            return
        record = dict(zip(TERMS, terms.tolist()))
        record.update(step=step, lr=lr, total_rank=total_rank, adapter_params=parameters)
        changed = ranks != self.last_ranks
        if changed:
            record["ranks"] = ranks
            self.last_ranks = ranks
        self.folder.append_log(record)
        scalars = {f"train/{key}": record[key] for key in (*TERMS, "lr", "total_rank", "adapter_params")}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
            if changed:
                self.writer.add_histogram("train/ranks", torch.tensor(list(ranks.values())), step)
        if self.wandb is not None:
            if changed:
                scalars["train/ranks"] = self.wandb_module.Histogram(list(ranks.values()))
            self.wandb.log(scalars, step=step)

    def image(self, tag: str, image, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, np.asarray(image), step, dataformats="HWC")
        if self.wandb is not None:
            self.wandb.log({tag: self.wandb_module.Image(image)}, step=step)

    @property
    def wandb_module(self):
        import wandb

        return wandb

    def close(self) -> None:
        self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def start_wandb(folder: RunFolder, config: dict):
    """A wandb run whose local files go to ``<run folder>/wandb/`` (``ValueError`` when wandb is not installed)."""
    try:
        import wandb
    except ImportError as error:
        raise ValueError("--report-to wandb needs wandb: pip install 'lora2[wandb]'") from error
    folder.record(WANDB_DIR)
    folder.path(WANDB_DIR).mkdir(exist_ok=True)
    return wandb.init(project="lora2", name=folder.root.name, dir=str(folder.root), config=config)


class Progress:
    """A tqdm bar on a terminal; otherwise a log line every ~5 % of the run or every minute, whichever first."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.start, self.enabled = total, start, enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=start, desc="lora2 train", disable=not self.interactive)
        self.every = max(1, -(-total // 20))  # about 20 lines a run
        self.started = self.last_line = time.monotonic()

    def update(self, step: int, loss: float, total_rank: int, layers: int, size_mib: float) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self.bar.set_postfix(loss=f"{loss:.4f}", rank=total_rank, size=f"{size_mib:.1f}MiB", refresh=False)
            self.bar.update(1)
            return
        now = time.monotonic()
        if step % self.every and step != self.total and now - self.last_line < 60:
            return
        self.last_line = now
        per_step = (now - self.started) / max(1, step - self.start)
        logger.info(
            "step %d/%d  loss %.4f  total rank %d (mean %.1f over %d modules)  adapter %.1f MiB fp32  %.2f s/step",
            step, self.total, loss, total_rank, total_rank / max(1, layers), layers, size_mib, per_step,
        )  # fmt: skip

    def close(self) -> None:
        self.bar.close()
