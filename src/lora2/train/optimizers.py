"""The optimizer and learning-rate schedule of a run, over the parameter groups its adapter backend gives."""

from __future__ import annotations

import torch

from lora2.train.config import TrainConfig


def build_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """Adam or AdamW (optionally bitsandbytes' 8-bit versions) over ``groups`` (each with its own lr)."""
    kwargs = {"betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon}
    if config.optimizer.endswith("8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ValueError(f"--optimizer {config.optimizer} needs bitsandbytes: pip install bitsandbytes") from error
        cls = bnb.optim.AdamW8bit if config.optimizer == "adamw8bit" else bnb.optim.Adam8bit
    else:
        cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, **kwargs)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer):
    """diffusers' ``get_scheduler`` (the schedules of its training scripts), over ``max_train_steps``."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
