"""lora2.logs: a message is dropped inside the block, on the named loggers only; other messages and the state after the
block are untouched."""

from __future__ import annotations

import logging
import warnings

import pytest
from log_capture import Messages

from lora2.logs import dropped_log_messages, dropped_warnings, quiet_pipeline_load, quiet_unet_lora_load

NOTICE = (
    "No LoRA keys associated to CLIPTextModelWithProjection found with the prefix='text_encoder_2'. This is safe to "
    "ignore if LoRA state dict didn't originally have any CLIPTextModelWithProjection related params."
)


@pytest.fixture
def records():
    """Every record that reaches the test's own logger tree ``lora2_test``."""
    handler = Messages(logging.DEBUG)
    root = logging.getLogger("lora2_test")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler.messages
    root.removeHandler(handler)


def test_matching_records_are_dropped_inside_the_block_only(records):
    emitter = logging.getLogger("lora2_test.emitter")
    filters_before = list(emitter.filters)
    emitter.warning("noise: nothing to see")  # before: passes
    with dropped_log_messages(["lora2_test.emitter"], r"^noise:"):
        emitter.warning("noise: nothing to see")
        emitter.warning("a real problem")
        logging.getLogger("lora2_test.other").warning("noise: from another logger")
    emitter.warning("noise: after the block")
    assert records == [
        "noise: nothing to see",
        "a real problem",
        "noise: from another logger",
        "noise: after the block",
    ]
    assert emitter.filters == filters_before


def test_unet_lora_load_drops_the_text_encoder_notice_and_nothing_else():
    emitter = logging.getLogger("diffusers.loaders.lora_base")
    handler = Messages(logging.DEBUG)
    emitter.addHandler(handler)
    try:
        with quiet_unet_lora_load():
            emitter.warning(NOTICE)
            emitter.warning(NOTICE.replace("CLIPTextModelWithProjection", "CLIPTextModel").replace("_2'", "'"))
            emitter.warning("No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'.")
        emitter.warning(NOTICE)
    finally:
        emitter.removeHandler(handler)
    assert handler.messages == [
        "No LoRA keys associated to UNet2DConditionModel found with the prefix='unet'.",
        NOTICE,
    ]


def test_matching_warnings_are_ignored_inside_the_block_only():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with dropped_warnings(r"`torch_dtype` is deprecated", FutureWarning):
            warnings.warn(
                "`torch_dtype` is deprecated and will be removed in version 1.0.0.", FutureWarning, stacklevel=1
            )
            warnings.warn("`torch_dtype` is deprecated (another category)", DeprecationWarning, stacklevel=1)
            warnings.warn("something else", FutureWarning, stacklevel=1)
        warnings.warn("`torch_dtype` is deprecated, after the block", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [
        "`torch_dtype` is deprecated (another category)",
        "something else",
        "`torch_dtype` is deprecated, after the block",
    ]


def test_pipeline_load_drops_the_dtype_deprecation_and_the_torchvision_notice():
    notice = logging.getLogger("transformers.utils.import_utils")
    handler = Messages(logging.DEBUG)
    notice.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with quiet_pipeline_load():
                warnings.warn(
                    "`torch_dtype` is deprecated and will be removed in version 1.0.0.", FutureWarning, stacklevel=1
                )
                notice.warning(
                    "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                    "`CLIPImageProcessorPil` for backward compatibility."
                )
                notice.warning("`Foo` could not be imported")
    finally:
        notice.removeHandler(handler)
    assert caught == []
    assert handler.messages == ["`Foo` could not be imported"]
