"""DreamBooth training with LoRA² adapters: ``TrainConfig`` → ``train`` (``lora2 train``), and ``lora2 generate``.

The recipe is ``lora2.train.recipe``; adapter types are backends in ``lora2.train.adapters``; the run folder's layout
is ``lora2.train.run_folder``. The names below are imported on first use, so ``lora2.train.config`` (every CLI
command reads it to build its flags) does not import diffusers' training stack.
"""

import importlib

_EXPORTS = {
    "TrainConfig": "lora2.train.config",
    "TrainResult": "lora2.train.recipe",
    "TrainingDiverged": "lora2.train.recipe",
    "train": "lora2.train.recipe",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lora2.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
