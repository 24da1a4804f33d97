"""Drop a third-party message for the duration of one call, where lora2 makes the call.

The libraries lora2 builds on say things that tell a lora2 user nothing: diffusers' "No LoRA keys associated to
CLIPTextModel …" when an adapter has no text-encoder part, its deprecation of ``torch_dtype`` (which lora2 still
passes: older diffusers take nothing else), transformers' notice that image processors fall back to PIL without
torchvision. None of them is silenced process-wide: a ``with`` block around the one call that triggers the message
drops that message, and the block leaves every logger and warning filter as it found it.

- ``dropped_log_messages(loggers, pattern)``: a ``logging.Filter`` on the loggers that emit the record (a filter on a
  logger sees only the records logged on it, not those its children propagate, so name the emitting module's
  logger); records whose message matches ``pattern`` (``re.search``) are dropped, all others pass.
- ``dropped_warnings(pattern, category)``: ``warnings.catch_warnings`` with one "ignore" filter.
- ``quiet_pipeline_load()``: both, for what ``DiffusionPipeline.from_pretrained`` says that is noise to a lora2 user.
- ``quiet_unet_lora_load()``: around ``pipe.load_lora_weights`` of a file with no text-encoder keys.
- ``quiet_half_precision_cast()``: around ``unet.to(dtype=…)`` of a model that keeps no module in fp32.
- ``no_load_progress_bars()``: diffusers' and transformers' "Loading …" bars off during one load, restored after
  (in a log file each bar is a line of carriage returns).
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

# recent diffusers' `deprecate("torch_dtype", ...)`; lora2 supports diffusers >= 0.32, whose from_pretrained takes
# `torch_dtype` (0.32 has no deprecation and no `dtype`)
TORCH_DTYPE_DEPRECATION = r"`torch_dtype` is deprecated"
# transformers 5 without torchvision, when diffusers imports CLIPImageProcessor / SiglipImageProcessor for pipelines'
# feature extractors, which lora2 never uses (its evaluators load their own processors)
TORCHVISION_FALLBACK = r"requires torchvision \(not installed\); falling back to"
TRANSFORMERS_IMPORT_LOGGERS = ("transformers.utils.import_utils",)
# pipe.load_lora_weights of a file without text-encoder keys (diffusers 0.42: lora_base; 0.32 says nothing)
NO_TEXT_ENCODER_LORA = r"No LoRA keys associated to \w+ found with the prefix='text_encoder"
DIFFUSERS_LORA_LOGGERS = ("diffusers.loaders.lora_base", "diffusers.loaders.peft")
# ModelMixin.to(dtype) warns even when its list of modules to keep in fp32 is empty (nothing to keep)
EMPTY_FP32_MODULES = r"should be kept in float32: \[\]"
DIFFUSERS_MODEL_LOGGERS = ("diffusers.models.modeling_utils",)


class _MessageFilter(logging.Filter):
    def __init__(self, pattern: re.Pattern[str]):
        super().__init__()
        self.pattern = pattern

    def filter(self, record: logging.LogRecord) -> bool:
        return self.pattern.search(record.getMessage()) is None


@contextmanager
def dropped_log_messages(loggers: Iterable[str], pattern: str) -> Iterator[None]:
    """Inside the block, drop the records of the named loggers whose message matches ``pattern`` (``re.search``)."""
    message_filter = _MessageFilter(re.compile(pattern))
    targets = [logging.getLogger(name) for name in loggers]
    for target in targets:
        target.addFilter(message_filter)
    try:
        yield
    finally:
        for target in targets:
            target.removeFilter(message_filter)


@contextmanager
def dropped_warnings(pattern: str, category: type[Warning] = Warning) -> Iterator[None]:
    """Inside the block, ignore ``warnings.warn`` messages of ``category`` that match ``pattern`` (``re.search``)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=f".*{pattern}", category=category)
        yield


@contextmanager
def no_load_progress_bars() -> Iterator[None]:
    """diffusers' and transformers' progress bars off inside the block, each restored to its former state."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    states = [(module, module.is_progress_bar_enabled()) for module in (diffusers_logging, transformers_logging)]
    for module, _ in states:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in states:
            if enabled:
                module.enable_progress_bar()


@contextmanager
def quiet_pipeline_load() -> Iterator[None]:
    """Around ``DiffusionPipeline.from_pretrained(..., torch_dtype=...)``: drop the ``torch_dtype`` deprecation and
    the torchvision fallback notice, and the loading progress bars; nothing else."""
    with ExitStack() as stack:
        stack.enter_context(dropped_warnings(TORCH_DTYPE_DEPRECATION, FutureWarning))
        stack.enter_context(dropped_log_messages(TRANSFORMERS_IMPORT_LOGGERS, TORCHVISION_FALLBACK))
        stack.enter_context(no_load_progress_bars())
        yield


@contextmanager
def quiet_half_precision_cast() -> Iterator[None]:
    """Around ``model.to(device, dtype)`` of a diffusers model: drop its warning about modules to keep in fp32 when
    there are none (the list it prints is empty); a non-empty list still warns."""
    with dropped_log_messages(DIFFUSERS_MODEL_LOGGERS, EMPTY_FP32_MODULES):
        yield


@contextmanager
def quiet_unet_lora_load() -> Iterator[None]:
    """Around ``pipe.load_lora_weights(file)`` for a file with no text-encoder keys: drop diffusers' notice that the
    text encoders got no LoRA keys (expected: the file has none), nothing else. For a file with text-encoder keys,
    call without this block: there the notice means a text encoder's part did not load."""
    with dropped_log_messages(DIFFUSERS_LORA_LOGGERS, NO_TEXT_ENCODER_LORA):
        yield
