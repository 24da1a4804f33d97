"""DreamBooth training with LoRA² adapters: ``TrainConfig`` → ``train`` (``lora2 train``), and ``lora2 generate``.

The recipe is ``lora2.train.recipe``; adapter types are backends in ``lora2.train.adapters``; the run folder's layout
is ``lora2.train.run_folder``.
"""

from lora2.train.config import TrainConfig
from lora2.train.recipe import TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train"]
