"""The world tokenizer: every world word is one CLIP token, any other text still tokenizes."""

from __future__ import annotations

import numpy as np
import pytest
from transformers import CLIPTokenizer

from lora2.world import generator as g
from lora2.world.subjects import PROMPTS, SUBJECTS
from lora2.world.tokenizer import IDENTIFIER_TOKENS, build_tokenizer, vocabulary_words


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(path)
    return CLIPTokenizer.from_pretrained(path)  # plain transformers loading, offline


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def test_every_vocabulary_word_is_one_token(tokenizer):
    assert len(IDENTIFIER_TOKENS) >= 16
    words = vocabulary_words()
    assert set(g.world_words()) <= set(words) and set(IDENTIFIER_TOKENS) <= set(words)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and tokenizer.convert_ids_to_tokens(ids) == [word + "</w>"], word


def test_captions_and_prompts_are_one_token_per_word(tokenizer):
    rng = np.random.default_rng(0)
    texts = [g.caption(s) for s in g.sample_scenes(200, seed=0, held_out="include")]
    texts += [g.caption(s, rng) for s in g.sample_scenes(200, seed=1)]
    texts += [p.format(token, s.class_name) for p in PROMPTS for s in SUBJECTS for token in IDENTIFIER_TOKENS[:3]]
    for text in texts:
        assert _n_tokens(tokenizer, text) == len(text.split()), text


def test_special_tokens_padding_and_unknown_words(tokenizer):
    assert tokenizer.model_max_length == 77
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == len(tokenizer) - 1
    assert tokenizer.bos_token_id == len(tokenizer) - 2
    ids = tokenizer("a red star", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id and ids[4] == tokenizer.eos_token_id
    # words outside the world fall back to known sub-word pieces, never to the unknown token
    ids = tokenizer("a xylophone, 42!", add_special_tokens=False).input_ids
    assert len(ids) > 4 and tokenizer.unk_token_id not in ids


def test_second_tokenizer_pads_like_sdxl(tmp_path):
    tok = build_tokenizer(tmp_path / "tok2", pad_token="!")
    ids = tok("a star", padding="max_length", max_length=77).input_ids
    assert ids[4:] == [tok.convert_tokens_to_ids("!")] * 73
    with pytest.raises(ValueError, match="ASCII letters"):
        build_tokenizer(tmp_path / "bad", extra_words=["two words"])
