"""The interface between the training recipe and an adapter type (LoRA², DoRA, AdaLoRA, …).

The recipe (``lora2.train.recipe``) knows nothing of a type's layers: it asks its backend to inject itself into the
models, for parameter groups, for the regularization term of the loss, to act after each optimizer step (LoRA²:
ranks follow ν; AdaLoRA: budget allocation), for ranks and size (logs), for its state (checkpoints) and to write its
files. ``modules`` maps a diffusers component prefix ("unet", "text_encoder", "text_encoder_2") to the adapted model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from lora2.train.config import TrainConfig
    from lora2.train.run_folder import RunFolder

NU_GROUP = "log_nu"  # the "name" of ν's parameter group: it keeps its own learning rate under every optimizer


class AdapterBackend:
    """One adapter type. Subclasses set ``name``/``label`` and implement every method that raises here."""

    name: ClassVar[str] = ""
    label: ClassVar[str] = ""  # as shown in sample grids and model cards
    trains_text_encoder: ClassVar[bool] = False  # can adapt the text encoders too
    resumable: ClassVar[bool] = True  # its checkpoints restore the run exactly
    card_description: ClassVar[str] = ""  # one sentence for the model card

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.modules: dict[str, nn.Module] = {}

    @classmethod
    def check_config(cls, config: TrainConfig) -> None:
        """Validate the settings this type reads (``ValueError`` naming the option); called by ``TrainConfig``."""
        if config.train_text_encoder and not cls.trains_text_encoder:
            raise ValueError(f"train_text_encoder needs adapter_type 'lora2', got adapter_type {cls.name!r}")

    def inject(self, modules: dict[str, nn.Module]) -> None:
        """Adapt the models in place (the UNet, and the text encoders when they are trained)."""
        raise NotImplementedError

    def parameter_groups(self) -> list[dict]:
        """Optimizer parameter groups: ``{"params", "lr", "weight_decay"}`` each."""
        raise NotImplementedError

    def regularization(self) -> torch.Tensor:
        """The type's own loss term (0-d tensor; zero when it has none)."""
        return torch.zeros((), device=self.device)

    def method_entropy_weight(self) -> float:
        """λ_e of a run that leaves ``entropy_weight`` unset: the method's own (0: this type has no entropy term)."""
        return 0.0

    def after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        """Runs after every optimizer step, before the gradients are cleared (``step`` counts from 1)."""

    def ranks(self) -> dict[str, int]:
        """Current rank of every adapted module, keyed ``<prefix>.<module>``."""
        raise NotImplementedError

    def parameter_count(self) -> int:
        """Adapter parameters at the current ranks (what the files will hold)."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """Every adapter tensor a checkpoint must hold to continue exactly, keyed ``<prefix>.<name>``."""
        raise NotImplementedError

    def rank_axes(self) -> dict[str, tuple[str, int]]:
        """``state()`` keys whose size follows a rank: key → (module key of ``ranks()``, axis of the rank positions).
        Empty for types whose tensors keep their shapes."""
        return {}

    def restore(self, tensors: dict[str, torch.Tensor], ranks: dict[str, int]) -> None:
        """Take a checkpoint's ``state()`` back (before the optimizer is built over the parameters)."""
        raise NotImplementedError

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The base model: every adapter passes its input through the frozen layer only."""
        raise NotImplementedError
        yield

    def save(self, folder: RunFolder, formats: list[str], metadata: dict) -> dict[str, Path]:
        """Write the adapter files of the run; returns format → path."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return next(iter(self.modules.values())).device

    def check_names(self, saved: dict[str, int]) -> None:
        """``ValueError`` naming modules a checkpoint has and the model lacks, or the reverse."""
        expected = set(self.ranks())
        if set(saved) != expected:
            missing, extra = sorted(expected - set(saved)), sorted(set(saved) - expected)
            raise ValueError(
                f"checkpoint does not match the adapted modules: missing {missing[:5]}, extra {extra[:5]}"
            )
