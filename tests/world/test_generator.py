"""The procedural world: determinism, captions that match the scenes, geometry of the attributes."""

from __future__ import annotations

import numpy as np
import pytest

from lora2.world import generator as g


def test_same_seed_same_bytes_different_seed_different():
    images, captions, scenes = g.sample_batch(24, seed=5, size=48, varied_captions=True)
    again = g.sample_batch(24, seed=5, size=48, varied_captions=True)
    other = g.sample_batch(24, seed=6, size=48, varied_captions=True)
    assert images.dtype == np.uint8 and images.shape == (24, 48, 48, 3)
    assert images.tobytes() == again[0].tobytes()
    assert captions == again[1] and scenes == again[2]
    assert images.tobytes() != other[0].tobytes()
    assert captions != other[1]


def test_render_is_independent_of_batch_mates():
    _, _, scenes = g.sample_batch(12, seed=1, size=32)
    batch = g.render_batch(scenes, 40).numpy()
    for i in (0, 5, 11):
        np.testing.assert_array_equal(np.asarray(g.render(scenes[i], 40)), batch[i])


def test_canonical_caption_names_every_attribute():
    for scene in g.sample_scenes(300, seed=2, held_out="include"):
        text = g.caption(scene)
        assert text.startswith("a photo of ")
        expected = {k: getattr(scene, k) for k in ("shape", "color", "size", "position", "background")}
        if scene.pattern != "solid":
            expected["pattern"] = scene.pattern
        assert g.caption_attributes(text) == expected, text


def test_varied_captions_never_contradict_the_scene():
    rng = np.random.default_rng(0)
    lengths = set()
    for scene in g.sample_scenes(300, seed=3):
        text = g.caption(scene, rng)
        lengths.add(len(text.split()))
        named = g.caption_attributes(text)
        assert named["shape"] == scene.shape
        assert all(getattr(scene, key) == value for key, value in named.items()), text
    assert len(lengths) > 5  # attributes really are dropped


def test_example_caption():
    scene = g.Scene("star", "red", "striped", "blue background", "small", "left", 0.2, 0.5, 0.15, 0.0)
    assert g.caption(scene) == "a photo of a small red striped star on the left on a blue background"
    orange = g.Scene("ring", "orange", "solid", "orange background", "large", "top", 0.5, 0.3, 0.3, 0.0)
    assert g.caption(orange) == "a photo of a large orange ring at the top on an orange background"


def test_held_out_pairs_split():
    train = g.sample_scenes(3000, seed=4, held_out="exclude")
    test = g.sample_scenes(200, seed=4, held_out="only")
    assert not any((s.shape, s.color) in g.HELD_OUT_PAIRS for s in train)
    assert all((s.shape, s.color) in g.HELD_OUT_PAIRS for s in test)
    assert {s.shape for s in train} == set(g.SHAPES) and {s.color for s in train} == set(g.COLORS)
    assert {s.shape for s in test} == set(g.SHAPES)
    assert all(s.background != f"{s.color} background" for s in train)


def test_attribute_tables_are_large_enough():
    assert len(g.SHAPES) >= 8 and len(g.COLORS) >= 8 and len(g.PATTERNS) >= 4
    assert set(g.POSITIONS) == {"left", "right", "center", "top", "bottom"} and set(g.SIZES) == {"small", "large"}


def _masks(scenes: list[g.Scene], size: int = 64) -> np.ndarray:
    """Object masks (n x size x size) of scenes on plain backgrounds: pixels away from the background colour."""
    images = g.render_batch(scenes, size).numpy().astype(float) / 255
    backgrounds = np.asarray([g.COLORS[s.background.removesuffix(" background")] for s in scenes])
    return np.abs(images - backgrounds[:, None, None]).sum(-1) > 0.1


@pytest.mark.parametrize("shape", g.SHAPES)
def test_shapes_are_drawn_where_and_as_large_as_named(shape):
    rng = np.random.default_rng(0)
    scenes = []
    for size in g.SIZES:
        for position in g.POSITIONS:
            x, y, radius = g.place(size, position, rng)
            scenes.append(g.Scene(shape, "red", "solid", "white background", size, position, x, y, radius, 0.0))
    areas = {}
    for scene, mask in zip(scenes, _masks(scenes)):
        rows, cols = np.nonzero(mask)
        cy, cx = (rows.min() + rows.max() + 1) / 128, (cols.min() + cols.max() + 1) / 128  # bounding box
        assert 0.25 < mask.sum() / (np.pi * (scene.radius * 64) ** 2) < 1.05  # fills a good part of its disc
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())  # inside
        if scene.position == "left":
            assert cx < 0.42
        elif scene.position == "right":
            assert cx > 0.58
        elif scene.position == "top":
            assert cy < 0.42
        elif scene.position == "bottom":
            assert cy > 0.58
        else:
            assert abs(cx - 0.5) < 0.1 and abs(cy - 0.5) < 0.1
        areas.setdefault(scene.size, []).append(mask.sum())
    assert max(areas["small"]) < min(areas["large"])


def test_shapes_are_distinct_and_colours_right():
    scenes = [
        g.Scene(shape, "blue", "solid", "white background", "large", "center", 0.5, 0.5, 0.3, 0.0)
        for shape in g.SHAPES
    ]
    masks = dict(zip(g.SHAPES, _masks(scenes)))
    images = g.render_batch(scenes, 64).numpy().astype(float) / 255
    for shape, image in zip(g.SHAPES, images):
        inside = image[masks[shape]]
        # most covered pixels are exactly the named colour (edges are antialiased)
        assert np.mean(np.abs(inside - np.asarray(g.COLORS["blue"])).max(-1) < 0.01) > 0.7
    for a in g.SHAPES:
        for b in g.SHAPES:
            if a < b:
                assert (masks[a] ^ masks[b]).sum() > 40, (a, b)


@pytest.mark.parametrize("pattern", [p for p in g.PATTERNS if p != "solid"])
def test_patterns_use_two_tones(pattern):
    scene = g.Scene("square", "green", pattern, "white background", "large", "center", 0.5, 0.5, 0.32, 0.0)
    image = np.asarray(g.render(scene, 64)).astype(float) / 255
    inside = image[24:40, 24:40].reshape(-1, 3)
    dist_primary = np.abs(inside - np.asarray(g.COLORS["green"])).max(-1)
    dist_secondary = np.abs(inside - np.asarray(g.shade(g.COLORS["green"]))).max(-1)
    assert (dist_primary < 0.02).mean() > 0.15 and (dist_secondary < 0.02).mean() > 0.1


def test_every_background_renders_and_differs():
    images = {}
    for background in g.BACKGROUNDS:
        scene = g.Scene("circle", "red", "solid", background, "small", "center", 0.5, 0.5, 0.15, 0.0, 0.3)
        images[background] = np.asarray(g.render(scene, 32)).astype(int)
    names = list(images)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(images[a] - images[b]).mean() > 5, (a, b)


def test_bad_attribute_is_rejected():
    with pytest.raises(ValueError, match="unknown shape 'blob'"):
        g.Scene("blob", "red", "solid", "beach", "small", "left", 0.5, 0.5, 0.1, 0.0)
    with pytest.raises(ValueError, match="held_out"):
        g.sample_scene(np.random.default_rng(0), held_out="nope")


def test_samples_below_one_pixel_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match="size \\(--size\\) must be a positive number of pixels, got 0"):
        g.write_samples(tmp_path / "s", n=2, size=0)
    assert not (tmp_path / "s").exists()
