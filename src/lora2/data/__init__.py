"""Datasets: DreamBooth subjects (folder layout, classes and evaluation prompts)."""

from lora2.data.dreambooth import LIVE_CLASSES, Subject, format_prompt, load_subject, load_subjects

__all__ = ["LIVE_CLASSES", "Subject", "format_prompt", "load_subject", "load_subjects"]
