"""Metric properties: self-similarity 1, normalised features, determinism, and agreement with a direct computation;
evaluators load without transformers' load report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_image
from log_capture import Messages

import lora2.world
from lora2.eval.metrics import ClipEncoder, DinoEncoder, SubjectScorer, mean_paired_cosine, mean_pairwise_cosine

WORLD_DINO = Path(lora2.world.__file__).parent / "assets" / "dino"


@pytest.fixture(scope="module")
def scorer(evaluators):
    dino, clip = evaluators
    return SubjectScorer(DinoEncoder.from_pretrained(dino), ClipEncoder.from_pretrained(clip))


def test_image_against_itself_scores_one(scorer):
    image = random_image(0)
    scores = scorer.score([image], "a dog", scorer.reference([image]))
    assert scores["dino"] == pytest.approx(1.0, abs=1e-5)
    assert scores["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert -1.0 <= scores["clip_t"] <= 1.0


def test_features_are_l2_normalised(scorer):
    images = [random_image(i, size=20 + 10 * i) for i in range(3)]
    for features in (
        scorer.dino.encode(images),
        scorer.clip.encode_images(images),
        scorer.clip.encode_texts(["a", "a red dog on a beach"]),
    ):
        torch.testing.assert_close(features.norm(dim=-1), torch.ones(len(features)))


def test_deterministic_and_batch_independent(scorer):
    images = [random_image(i) for i in range(5)]
    first = scorer.dino.encode(images)
    scorer.dino.batch_size = 2
    try:
        torch.testing.assert_close(scorer.dino.encode(images), first, rtol=0, atol=1e-6)
    finally:
        scorer.dino.batch_size = 16
    reference = scorer.reference(images[:2])
    assert scorer.score(images[2:], "a toy", reference) == scorer.score(images[2:], "a toy", reference)


def test_scores_match_direct_computation(scorer, evaluators):
    """Judge: the transformers models called directly, cosine by F.cosine_similarity."""
    from transformers import CLIPModel, CLIPProcessor

    _, clip_dir = evaluators
    model, processor = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    generated, real = [random_image(1), random_image(2)], [random_image(3), random_image(4), random_image(5)]
    with torch.no_grad():
        inputs = processor(text=["a red toy"], images=generated + real, return_tensors="pt", padding=True)
        out = model(**inputs)
    img, txt = out.image_embeds, out.text_embeds  # (5, d), (1, d)
    clip_i = torch.stack([F.cosine_similarity(img[g], img[r], dim=0) for g in range(2) for r in range(2, 5)]).mean()
    clip_t = F.cosine_similarity(img[:2], txt.expand(2, -1)).mean()
    scores = scorer.score(generated, "a red toy", scorer.reference(real))
    assert scores["clip_i"] == pytest.approx(float(clip_i), abs=1e-5)
    assert scores["clip_t"] == pytest.approx(float(clip_t), abs=1e-5)


def test_cosine_helpers():
    a = F.normalize(torch.randn(3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert mean_pairwise_cosine(a[:1], a[:1]) == pytest.approx(1.0)
    assert mean_paired_cosine(a, a) == pytest.approx(1.0)
    assert mean_paired_cosine(a, -a) == pytest.approx(-1.0)


def test_unloadable_evaluator_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot load the CLIP evaluator"):
        ClipEncoder.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="cannot load the DINO evaluator"):
        DinoEncoder.from_pretrained(tmp_path / "missing")


@pytest.fixture
def transformers_warnings():
    """Warnings logged by transformers (its loggers do not propagate to the root logger)."""
    handler = Messages()
    logging.getLogger("transformers").addHandler(handler)
    yield handler.messages
    logging.getLogger("transformers").removeHandler(handler)


@pytest.mark.skipif(not (WORLD_DINO / "model.safetensors").is_file(), reason="world models not committed")
def test_world_dino_loads_without_a_report_and_with_unchanged_features(transformers_warnings):
    from transformers import ViTModel

    image = random_image(3, size=64)
    # the load lora2 used before: no pooler built, so the saved pooler's weights are reported as unused
    previous = DinoEncoder(ViTModel.from_pretrained(WORLD_DINO, add_pooling_layer=False), None)
    assert any("pooler" in message for message in transformers_warnings)
    transformers_warnings.clear()

    encoder = DinoEncoder.from_pretrained(WORLD_DINO)
    assert transformers_warnings == []
    assert encoder.model.pooler is not None  # built because the checkpoint has it; never run
    previous.processor = encoder.processor
    plain = DinoEncoder(ViTModel.from_pretrained(WORLD_DINO), encoder.processor)  # WORLD.md's plain load
    features = encoder.encode([image])
    assert torch.equal(features, previous.encode([image]))
    assert torch.equal(features, plain.encode([image]))


def test_dino_checkpoint_without_pooler_loads_without_a_report(evaluators, transformers_warnings):
    dino, _ = evaluators  # saved without a pooler, as facebook/dino-vits16
    encoder = DinoEncoder.from_pretrained(dino)
    assert encoder.model.pooler is None
    assert transformers_warnings == []
