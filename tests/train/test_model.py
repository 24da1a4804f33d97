"""Prompt encoding and conditioning match diffusers' own SDXL pipeline; the identifier's token positions."""

from __future__ import annotations

import pytest
import torch

from lora2.train.model import add_time_ids, encode_prompts, identifier_positions, load_components


def test_encoding_matches_the_sdxl_pipeline(tiny_base):
    components = load_components(str(tiny_base))
    assert components.kind == "sdxl" and components.prediction_type == "epsilon"
    with torch.no_grad():
        embeds, pooled = encode_prompts(components, ["a sks dog", "a dog"])
        expected, _, expected_pooled, _ = components.pipe.encode_prompt(
            ["a sks dog", "a dog"], do_classifier_free_guidance=False
        )
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, expected_pooled)
    ids = components.pipe._get_add_time_ids((48, 40), (0, 4), (32, 32), torch.float32, 32)
    torch.testing.assert_close(add_time_ids((48, 40), (0, 4), (32, 32))[None], ids)


def test_identifier_positions(tiny_base):
    tokenizer = load_components(str(tiny_base)).tokenizers[0]
    assert identifier_positions(tokenizer, "a sks dog", "sks") == [2]
    with pytest.raises(ValueError, match="does not occur"):
        identifier_positions(tokenizer, "a dog", "sks")


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(ValueError, match="model_index.json"):
        load_components(str(tmp_path))
