"""The second world (issue 19): its base model (the first world's grown, before any training), its graded subjects,
and the first world left as it was."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from torch import nn

import lora2.world
from lora2.lora.config import LoRA2Config
from lora2.world import world2
from lora2.world.grow import WORLD2_DEPTHS
from lora2.world.pretrain import FULL_UNET, SCALES, component_sizes, initial_pipeline
from lora2.world.subjects import SUBJECTS, glyph_bitmap, png_bits_per_pixel, render_subject

ROOT = Path(__file__).resolve().parents[2]
CONFIG_FILE = ROOT / "benchmarks" / "results" / "world2_config.json"
ASSETS = Path(lora2.world.__file__).parent / "assets"


@pytest.fixture(scope="module")
def base():
    scale = SCALES["world2"]
    pipe = initial_pipeline(scale)  # the architecture the first world's base is grown to
    return pipe, component_sizes(pipe, scale.image_size)


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> Path:
    return world2.write_world2_subjects(tmp_path_factory.mktemp("world2") / "subjects", size=64)


def _adapted(unet: nn.Module) -> dict[str, tuple[int, int]]:
    targets = LoRA2Config()  # lora2's default target modules
    return {
        name: (m.in_features, m.out_features)
        for name, m in unet.named_modules()
        if isinstance(m, nn.Linear) and targets.is_target(name)
    }


def test_world2_is_the_first_world_grown_to_128_px(base):
    pipe, sizes = base
    scale = SCALES["world2"]
    assert scale.grown and sizes["image_size"] == 128 and sizes["latent_shape"] == [4, 32, 32]
    assert scale.unet_config == {**FULL_UNET, "transformer_layers_per_block": WORLD2_DEPTHS}
    first = json.loads((ASSETS / "base" / "unet" / "config.json").read_text())
    assert list(pipe.unet.config.block_out_channels) == first["block_out_channels"]


def test_world2_unet_has_hundreds_of_adapted_layers_of_several_widths(base):
    pipe, _ = base
    unet = pipe.unet
    assert len(unet.config.block_out_channels) == 3
    assert all(depth > 1 for depth in unet.config.transformer_layers_per_block[1:])  # the attention levels
    layers = _adapted(unet)
    assert len(layers) >= 200
    assert len(set(layers.values())) >= 4  # self- and cross-attention at two widths
    first_world = SCALES["full"].unet_config
    assert first_world == FULL_UNET and first_world["transformer_layers_per_block"] == (1, 1, 1)


@pytest.mark.parametrize(
    ("subjects", "min_psnr"),
    [
        (world2.SUBJECTS, world2.VAE_MIN_PSNR),
        (world2.CROWD_SUBJECTS[10:], world2.DRAWN_VAE_MIN_PSNR),
        (world2.FAMILY_SUBJECTS, world2.VAE_MIN_PSNR),
        (world2.LOOKALIKE_SUBJECTS, world2.DRAWN_VAE_MIN_PSNR),
        (world2.SIBLING_SUBJECTS, world2.DRAWN_VAE_MIN_PSNR),
    ],
    ids=["designed", "drawn", "families", "lookalikes", "siblings"],
)
def test_world2_detail_survives_the_base_vae(subjects, min_psnr):
    """Each subject's detail is drawn at a scale the VAE carries: its 128-px render on white comes back through the
    first world's VAE (world2's) with at least ``min_psnr``."""
    vae = AutoencoderKL.from_pretrained(ASSETS / "base" / "vae", torch_dtype=torch.float32).eval()
    renders = [np.asarray(render_subject(s, 128, radius=0.3, rotation=20.0)) for s in subjects]
    x = torch.from_numpy(np.stack(renders)).permute(0, 3, 1, 2).float() / 127.5 - 1  # N×3×128×128 in [-1, 1]
    with torch.no_grad():
        back = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    psnr = {s.name: 10 * math.log10(4 / float((a - b).square().mean())) for s, a, b in zip(subjects, x, back)}
    assert min(psnr.values()) >= min_psnr, psnr


def test_the_crowd_is_the_designed_ten_and_twenty_drawn_graded_subjects():
    crowd = world2.CROWD_SUBJECTS
    assert crowd[:10] == world2.SUBJECTS and len(crowd) == 30
    assert world2.crowd_subjects() == crowd[10:]  # drawn from a fixed seed
    assert len({s.name for s in crowd}) == 30 and all(re.fullmatch(r"[a-z0-9_]+", s.name) for s in crowd)
    assert [s.level for s in crowd[10:]] == [level for level in range(1, 6) for _ in range(world2.CROWD_PER_LEVEL)]
    pairs = [(s.layers[0].shape, s.layers[0].color) for s in crowd]
    assert len(set(pairs)) == 30  # no two on the same shape of the same colour
    for subject in crowd[10:]:
        assert all(layer.color2 != layer.color for layer in subject.layers if layer.pattern != "solid")
    bits = {s.name: png_bits_per_pixel(s, rotations=world2.PNG_ROTATIONS) for s in crowd}
    means = [statistics.fmean(bits[s.name] for s in crowd if s.level == level) for level in range(1, 6)]
    assert means == sorted(means) and len(set(means)) == 5  # the measured complexity grows with the level


def test_the_crowd_is_written_as_its_own_dataset(tmp_path):
    root = world2.write_world2_subjects(tmp_path / "crowd", size=32, subject_set="crowd")
    meta = json.loads((root / "subjects.json").read_text())
    assert meta["version"] == world2.CROWD_DATASET_VERSION != world2.DATASET_VERSION
    assert [entry["name"] for entry in meta["subjects"]] == [s.name for s in world2.CROWD_SUBJECTS]


def test_the_families_are_six_shapes_of_one_colour_each_at_five_levels():
    families = world2.FAMILY_SUBJECTS
    assert world2.family_subjects() == families and len(families) == 30  # drawn from a fixed seed
    assert len({s.name for s in families}) == 30 and all(re.fullmatch(r"[a-z0-9_]+", s.name) for s in families)
    assert [s.level for s in families] == [level for _ in range(world2.FAMILY_COUNT) for level in range(1, 6)]
    heads = [families[k : k + 5] for k in range(0, 30, 5)]
    assert len({f[0].class_name for f in heads}) == len({f[0].layers[0].color for f in heads}) == 6
    for family in heads:  # one class and one colour, whose flat shape is the family's first member
        assert {s.class_name for s in family} == {family[0].class_name} and family[0].layers == family[0].layers[:1]
        assert {s.layers[0].color for s in family} == {family[0].layers[0].color}
    bits = {s.name: png_bits_per_pixel(s, rotations=world2.PNG_ROTATIONS) for s in families}
    means = [statistics.fmean(bits[s.name] for s in families if s.level == level) for level in range(1, 6)]
    assert means == sorted(means) and len(set(means)) == 5  # the measured complexity grows with the level
    with pytest.raises(ValueError, match="families must lie"):
        world2.family_subjects(families=8)


@pytest.mark.parametrize(
    ("subjects", "draw"),
    [(world2.LOOKALIKE_SUBJECTS, world2.lookalike_subjects), (world2.SIBLING_SUBJECTS, world2.sibling_subjects)],
    ids=["lookalikes", "siblings"],
)
def test_a_set_of_look_alike_groups_is_five_groups_of_six_one_a_level(subjects, draw):
    assert draw() == subjects and len(subjects) == 30  # drawn from a fixed seed
    assert len({s.name for s in subjects}) == 30 and all(re.fullmatch(r"[a-z0-9_]+", s.name) for s in subjects)
    groups = [subjects[k : k + 6] for k in range(0, 30, 6)]
    assert [{s.level for s in group} for group in groups] == [{1}, {2}, {3}, {4}, {5}]
    assert len({group[0].class_name for group in groups}) == 5  # one class a group, none shared
    flat, *detailed = groups
    assert all(s.layers == s.layers[:1] for s in flat) and len({s.layers[0].color for s in flat}) == 6
    for group in detailed:  # one shape of one colour, no colour of another group, six different subjects
        assert len({s.layers[0].color for s in group}) == 1 and len({s.layers for s in group}) == 6
        assert group[0].layers[0].color not in {s.layers[0].color for s in subjects if s not in group}
    bits = {s.name: png_bits_per_pixel(s, rotations=world2.PNG_ROTATIONS) for s in subjects}
    means = [statistics.fmean(bits[s.name] for s in group) for group in groups]
    assert means == sorted(means) and len(set(means)) == 5  # the measured complexity grows with the level
    for size in (1, 9):
        with pytest.raises(ValueError, match="group_size must lie"):
            draw(group_size=size)


def test_a_sibling_is_its_stem_with_one_part_redrawn():
    groups = [world2.SIBLING_SUBJECTS[k : k + 6] for k in range(6, 30, 6)]
    for level, group in enumerate(groups, start=2):
        stem, parts = set(group[0].layers), world2.SIBLING_PARTS[level]
        for sibling in group[1:]:  # the other parts' layers are the stem's
            kept = set(sibling.layers) & stem
            assert kept != stem and (len(parts) == 1 or len(kept) > 1)


def test_level_five_look_alikes_share_beads_and_glyphs_and_differ_in_their_surface():
    group = world2.LOOKALIKE_SUBJECTS[24:]
    assert {s.layers[1:] for s in group} == {group[0].layers[1:]}  # one bead ring and one glyph plaque for all
    assert any(layer.pattern == "glyphs" for layer in group[0].layers[1:])
    surfaces = [s.layers[0] for s in group]
    assert len(set(surfaces)) == 6 and all(layer.pattern != "solid" for layer in surfaces)


def test_an_unknown_subject_set_is_named(tmp_path):
    with pytest.raises(ValueError, match="'nope'"):
        world2.write_world2_subjects(tmp_path / "x", size=32, subject_set="nope")


def test_committed_world2_numbers_are_what_the_code_gives(base, written):
    """benchmarks/results/world2_config.json (docs/WORLD.md's numbers) is what the configuration and subjects give."""
    pipe, sizes = base
    recorded = json.loads(CONFIG_FILE.read_text())
    assert recorded["parameters"] == sizes["parameters"]
    assert recorded["fp16_bytes"] == sizes["fp16_bytes"]
    assert recorded["adapted_layers"] == len(_adapted(pipe.unet))
    meta = json.loads((written / "subjects.json").read_text())
    measured = {entry["name"]: (entry["level"], entry["png_bits_per_pixel"]) for entry in meta["subjects"]}
    assert {s["name"]: (s["level"], s["png_bits_per_pixel"]) for s in recorded["subjects"]} == measured


def test_world2_subjects_are_graded_by_level_and_measured_complexity(written):
    meta = json.loads((written / "subjects.json").read_text())
    assert meta["version"] == world2.DATASET_VERSION
    by_level: dict[int, list[float]] = {}
    for entry in meta["subjects"]:
        by_level.setdefault(entry["level"], []).append(entry["png_bits_per_pixel"])
    assert sorted(by_level) == [1, 2, 3, 4, 5]
    means = [statistics.fmean(by_level[level]) for level in sorted(by_level)]
    assert means == sorted(means) and len(set(means)) == 5  # strictly growing with the level
    for level in (1, 2, 3, 4):
        assert max(by_level[level]) < min(by_level[level + 1])
    table = (written / "prompts_and_classes.txt").read_text()
    assert all(f"{s.name},{s.class_name}" in table for s in world2.SUBJECTS)
    assert all(len(list((written / s.name).glob("*.jpg"))) >= 4 for s in world2.SUBJECTS)


def test_world2_subjects_render_deterministically():
    for subject in world2.SUBJECTS:
        a = np.asarray(render_subject(subject, 48, rotation=12.0))
        b = np.asarray(render_subject(subject, 48, rotation=12.0))
        np.testing.assert_array_equal(a, b)


def test_glyph_strings_are_fixed_bitmaps_and_distinct():
    bitmap = glyph_bitmap("K7Q")
    assert bitmap.shape == (7, 13)
    torch.testing.assert_close(bitmap, glyph_bitmap("K7Q"))
    assert set(bitmap.unique().tolist()) <= {0.0, 1.0}
    assert bitmap[0].sum() == 0 and bitmap[-1].sum() == 0 and bitmap[:, 0].sum() == 0  # blank margin
    glyphs = {tuple(glyph_bitmap(c)[1:6, 1:4].flatten().tolist()) for c in "K7Q2XPLUM8"}
    assert len(glyphs) == 10


def test_a_glyph_layer_without_text_is_one_clear_error():
    from dataclasses import replace

    plaque = next(s for s in world2.SUBJECTS if s.name == "glyph_plaque")
    broken = replace(plaque, layers=(replace(plaque.layers[1], text=""),))
    with pytest.raises(ValueError, match="glyphs pattern needs a layer text"):
        render_subject(broken, 32)


def test_first_world_subjects_carry_no_level():
    assert all(s.level == 0 for s in SUBJECTS)
    assert {s.name for s in SUBJECTS}.isdisjoint(s.name for s in world2.SUBJECTS)


def test_detail_siblings_differ_in_exactly_one_detail():
    for index in range(40):
        rng = np.random.default_rng([5, index])
        subject, slots = world2.detail_subject(rng)
        sibling = world2.detail_sibling(subject, slots, rng)
        assert 1 <= len(slots) <= 2 and len(sibling.layers) == len(subject.layers) == slots[-1][2]
        changed = {i for i, (a, b) in enumerate(zip(subject.layers, sibling.layers)) if a != b}
        assert changed, subject  # a sibling is never the same subject
        assert any(changed <= set(range(first, end)) for _, first, end in slots)  # the body and one slot kept
        texts = {layer.text for layer in (*subject.layers, *sibling.layers) if layer.text}
        assert texts.isdisjoint(world2.EVALUATION_TEXTS)


def test_detail_pairs_are_deterministic_and_siblings_adjacent():
    view_a, view_b = world2.detail_pairs(3, seed=1, size=32)
    assert view_a.shape == view_b.shape == (6, 3, 32, 32) and view_a.dtype == torch.uint8
    again_a, again_b = world2.detail_pairs(3, seed=1, size=32, workers=2)
    assert torch.equal(view_a, again_a) and torch.equal(view_b, again_b)
    assert not torch.equal(view_a, view_b)  # two views of each instance
    assert not torch.equal(world2.detail_pairs(3, seed=2, size=32)[0], view_a)


def test_world2_dino_trains_on_detail_siblings_at_128_px(tmp_path):
    from transformers import ViTModel

    from lora2.world.evaluators import train_evaluators
    from lora2.world.replay import PretrainRecord

    record = PretrainRecord()
    paths = train_evaluators(tmp_path, "world2-tiny", parts=("dino",), record=record)
    assert set(paths) == {"dino"} and not (tmp_path / "clip").exists()
    assert ViTModel.from_pretrained(paths["dino"]).config.image_size == 128
    without = PretrainRecord()
    train_evaluators(tmp_path / "plain", replace_scale("world2-tiny", detail_families=0), parts=("dino",),
                     record=without)  # fmt: skip
    assert record.phases["dino"]["data_fingerprint"] != without.phases["dino"]["data_fingerprint"]


def replace_scale(name: str, **changes):
    from dataclasses import replace

    return replace(SCALES[name], **changes)
