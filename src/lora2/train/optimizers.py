"""The optimizer and learning-rate schedule of a run, over the parameter groups its adapter backend gives.

Prodigy (Mishchenko & Defazio 2023, the ``prodigyopt`` package: ``pip install 'lora2[prodigy]'``) estimates one step
size d for all its parameter groups (``--learning-rate`` multiplies it: 1.0, as diffusers and kohya advise) and refuses
groups with different learning rates. ν is not a weight: its step must stay ``nu_lr`` whatever scale d finds for the
adapter weights, or the ranks freeze (measured on the world model: docs/DESIGN.md, "Optimizers"). So with
``--optimizer prodigy`` the weights take Prodigy steps and ν's group (``NU_GROUP``) takes plain Adam steps at
``nu_lr``, inside one optimizer object: the LR schedule, checkpoints and rank re-allocation see one optimizer.
Prodigy's settings are those of diffusers' DreamBooth LoRA scripts: decoupled weight decay, bias correction and
safeguard warm-up on.
"""

from __future__ import annotations

import logging

import torch

from lora2.train.adapters.base import NU_GROUP
from lora2.train.config import TrainConfig

logger = logging.getLogger(__name__)


class ProdigyWithAdamNu(torch.optim.Optimizer):
    """Prodigy over the weight groups and Adam over ν's group, as one optimizer (one ``param_groups``, one ``state``,
    one ``state_dict``). The two inner optimizers hold the very same group dicts and state dict."""

    def __init__(self, groups: list[dict], betas: tuple[float, float], eps: float) -> None:
        try:
            from prodigyopt import Prodigy
        except ImportError as error:
            raise ValueError("--optimizer prodigy needs prodigyopt: pip install 'lora2[prodigy]'") from error
        super().__init__(groups, {})
        weights = [g for g in self.param_groups if g.get("name") != NU_GROUP]
        nus = [g for g in self.param_groups if g.get("name") == NU_GROUP]
        kwargs = {"decouple": True, "use_bias_correction": True, "safeguard_warmup": True}
        self.prodigy = Prodigy(weights, lr=weights[0]["lr"], betas=betas, eps=eps, **kwargs)
        self.adam = torch.optim.Adam(nus, betas=betas, eps=eps) if nus else None
        self._share()

    def _share(self) -> None:
        self.prodigy.param_groups = [g for g in self.param_groups if g.get("name") != NU_GROUP]
        self.prodigy.state = self.state
        if self.adam is not None:
            self.adam.param_groups = [g for g in self.param_groups if g.get("name") == NU_GROUP]
            self.adam.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.prodigy.step(closure)
        if self.adam is not None:
            self.adam.step()
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()  # loading replaced the group dicts and the state


def build_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    """Adam or AdamW (optionally bitsandbytes' 8-bit versions), or Prodigy, over ``groups`` (each with its lr)."""
    kwargs = {"betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon}
    if config.optimizer == "prodigy":
        if config.learning_rate < 0.1:
            logger.warning(
                "--optimizer prodigy with learning_rate %g: Prodigy finds the step size itself and the learning "
                "rate multiplies it; 1.0 is the usual value", config.learning_rate,
            )  # fmt: skip
        return ProdigyWithAdamNu(groups, **kwargs)
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
