"""The subject dataset: DreamBooth layout, parseable prompts valid in the world, graded complexity, determinism."""

from __future__ import annotations

import json
import logging
import re

import numpy as np
import pytest
from PIL import Image

from lora2.cli import main
from lora2.world import generator as g
from lora2.world.subjects import PALETTE, PROMPTS, SUBJECTS, render_subject, write_subjects
from lora2.world.tokenizer import vocabulary_words


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_subjects(tmp_path_factory.mktemp("subjects") / "world", size=64)


def test_layout_like_dreambooth(root):
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    assert [f.name for f in folders] == sorted(s.name for s in SUBJECTS) and len(folders) >= 12
    for folder in folders:
        files = sorted(p.name for p in folder.iterdir())
        assert 4 <= len(files) <= 6
        assert files == [f"{i:02d}.jpg" for i in range(len(files))]
        for name in files:
            with Image.open(folder / name) as image:
                assert image.format == "JPEG" and image.mode == "RGB" and image.size == (64, 64)
    assert {p.name for p in root.iterdir() if p.is_file()} == {"prompts_and_classes.txt", "subjects.json"}


def _section(text: str, title: str) -> list[str]:
    block = text.split(f"\n{title}\n", 1)[1].split("]", 1)[0]
    return re.findall(r"^'(.*)'\.format\(unique_token, class_token\),?$", block, flags=re.M)


def test_prompts_file_has_dreambooth_structure(root):
    text = (root / "prompts_and_classes.txt").read_text()
    assert text.startswith("Classes\n\nsubject_name,class\n")
    table = text.split("subject_name,class\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert dict(line.split(",") for line in table) == {s.name: s.class_name for s in SUBJECTS}
    assert "\nPrompts\n" in text
    for title in ("Object Prompts", "Live Subject Prompts"):
        assert _section(text, title) == list(PROMPTS) and len(PROMPTS) == 25


def test_project_loader_reads_it(root):
    dreambooth = pytest.importorskip("lora2.data.dreambooth")
    loaded = dreambooth.load_subjects(root)
    assert set(loaded) == {s.name for s in SUBJECTS}
    for subject in SUBJECTS:
        assert loaded[subject.name].class_name == subject.class_name
        assert loaded[subject.name].prompts == list(PROMPTS)


def test_prompts_are_valid_in_the_world():
    vocabulary = set(vocabulary_words())
    changes = 0
    for template in PROMPTS:
        assert template.startswith("a ") and template.count("{0} {1}") == 1
        for subject in SUBJECTS:
            prompt = template.format("sks", subject.class_name)
            assert set(prompt.split()) <= vocabulary, prompt
            named = g.caption_attributes(prompt)
            assert named["shape"] == subject.class_name and len(named) >= 2, prompt
        changes += any(k in g.caption_attributes(template) for k in ("color", "size", "position", "pattern"))
    assert 5 <= changes <= 20  # both recontextualisations and property changes
    recolours = {g.caption_attributes(t).get("color") for t in PROMPTS} - {None}
    assert not any(pair[1] in recolours for pair in g.HELD_OUT_PAIRS)  # recoloured subjects stay in-distribution


def test_subjects_are_graded_and_not_describable(root):
    meta = json.loads((root / "subjects.json").read_text())
    records = meta["subjects"]
    assert [r["name"] for r in records] == [s.name for s in SUBJECTS]
    complexity = [r["complexity"] for r in records]
    assert complexity == sorted(complexity) and complexity[0] == 1 and complexity[-1] >= 12
    assert len(set(complexity)) >= 6
    assert all(r["description"] and 4 <= r["num_images"] <= 6 for r in records)
    for subject in SUBJECTS:
        assert subject.class_name in g.SHAPES
        assert subject.colors <= set(PALETTE)  # no colour of the subject can be named by a caption


def test_instances_vary_and_generation_is_deterministic(root, tmp_path):
    again = write_subjects(tmp_path / "again", size=64)
    for subject in SUBJECTS[:3] + SUBJECTS[-2:]:
        first = [np.asarray(Image.open(p)) for p in sorted((root / subject.name).glob("*.jpg"))]
        second = [np.asarray(Image.open(p)) for p in sorted((again / subject.name).glob("*.jpg"))]
        assert all(np.array_equal(a, b) for a, b in zip(first, second))
        assert all(np.abs(first[0].astype(int) - other).mean() > 5 for other in first[1:])
    assert (root / "subjects.json").read_text() == (again / "subjects.json").read_text()


def test_subject_is_more_than_its_class():
    """The rendered subject differs from every world rendering of its class in the same place."""
    for subject in SUBJECTS:
        ref = np.asarray(render_subject(subject, 64, radius=0.35)).astype(int)
        scenes = [
            g.Scene(subject.class_name, color, "solid", "white background", "large", "center", 0.5, 0.5, 0.35, 0.0)
            for color in g.COLORS
        ]
        world = g.render_batch(scenes, 64).numpy().astype(int)  # colours x 64 x 64 x 3
        assert np.abs(world - ref).mean(axis=(1, 2, 3)).min() > 3, subject.name


@pytest.mark.parametrize("size", ["0", "-3"])
def test_a_size_below_one_pixel_is_one_clear_error(size, tmp_path, caplog):
    with caplog.at_level(logging.ERROR, logger="lora2"):
        assert main(["world", "subjects", "--out", str(tmp_path / "w"), "--size", size]) == 2
    assert [r.getMessage() for r in caplog.records] == [
        f"size (--size) must be a positive number of pixels, got {size}"
    ]
    assert not (tmp_path / "w").exists()
