"""DreamBooth training with LoRA² adapters: ``TrainConfig`` → ``train`` (``lora2 train``), plus generate and demo."""

from lora2.train.config import TrainConfig
from lora2.train.loop import TrainingDiverged, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingDiverged", "train"]
