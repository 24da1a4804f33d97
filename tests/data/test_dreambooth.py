"""DreamBooth layout: the real dataset loads; malformed folders raise clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from lora2.data import format_prompt, load_subject, load_subjects

DATASET = Path(__file__).resolve().parents[3] / "shared" / "datasets" / "dreambooth"
PROMPTS = """Classes

subject_name,class
toy1,toy
pup,dog

Prompts

Object Prompts

prompt_list = [
'a {0} {1} in the jungle'.format(unique_token, class_token),
'a red {0} {1}'.format(unique_token, class_token)
]

Live Subject Prompts

prompt_list = [
'a {0} {1} wearing a red hat'.format(unique_token, class_token),
]
"""


def _write_root(root: Path, prompts: str = PROMPTS, subjects=("toy1", "pup")) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "prompts_and_classes.txt").write_text(prompts)
    for name in subjects:
        (root / name).mkdir()
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(root / name / f"{i:02d}.png")
    return root


@pytest.mark.skipif(not DATASET.is_dir(), reason="shared DreamBooth dataset not present")
def test_real_dataset_loads():
    subjects = load_subjects(DATASET)
    assert len(subjects) == 30
    assert sum(len(s.image_paths) for s in subjects.values()) == 158
    assert all(len(s.prompts) == 25 for s in subjects.values())
    live = {name for name, s in subjects.items() if s.live}
    assert live == {"cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"}
    assert subjects["bear_plushie"].class_name == "stuffed animal" and not subjects["bear_plushie"].live
    assert subjects["dog6"].eval_prompts("sks")[10] == "a sks dog wearing a red hat"
    assert subjects["vase"].eval_prompts("sks")[0] == "a sks vase in the jungle"
    assert subjects["vase"].class_prompts()[-1] == "a cube shaped vase"
    single = load_subject(DATASET / "clock")
    assert single == subjects["clock"]


def test_format_prompt_is_not_str_format():
    assert format_prompt("a {0} {1} on a rug", "sks", "dog") == "a sks dog on a rug"
    assert format_prompt("a red {0} {1}", "", "stuffed animal") == "a red stuffed animal"
    # attribute access in a template is left as text, never evaluated
    assert format_prompt("{0.__class__} {1}", "x", "y") == "{0.__class__} y"


def test_synthetic_root_sections_and_live(tmp_path):
    subjects = load_subjects(_write_root(tmp_path / "db"))
    assert subjects["toy1"].prompts == ["a {0} {1} in the jungle", "a red {0} {1}"] and not subjects["toy1"].live
    assert subjects["pup"].live and subjects["pup"].prompts == ["a {0} {1} wearing a red hat"]
    assert subjects["pup"].instance_prompt("zwx") == "a zwx dog"


def test_live_column_overrides_class(tmp_path):
    text = PROMPTS.replace(
        "subject_name,class\ntoy1,toy\npup,dog", "subject_name,class,live\ntoy1,toy,true\npup,dog,false"
    )
    subjects = load_subjects(_write_root(tmp_path / "db", text))
    assert subjects["toy1"].live and not subjects["pup"].live


def test_no_images(tmp_path):
    root = _write_root(tmp_path / "db")
    shutil.rmtree(root / "toy1")
    (root / "toy1").mkdir()
    (root / "toy1" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="toy1.*no images"):
        load_subject(root / "toy1")


def test_missing_prompts_file(tmp_path):
    root = _write_root(tmp_path / "db")
    (root / "prompts_and_classes.txt").unlink()
    with pytest.raises(ValueError, match="prompts file not found"):
        load_subjects(root)


def test_subject_not_in_table(tmp_path):
    root = _write_root(tmp_path / "db", subjects=("toy1", "pup", "mystery"))
    with pytest.raises(ValueError, match="'mystery'.*not in the Classes table"):
        load_subjects(root)


def test_unparseable_prompt_line(tmp_path):
    root = _write_root(tmp_path / "db", PROMPTS.replace("'a red {0} {1}'", "__import__('os')"))
    with pytest.raises(ValueError, match="cannot parse prompt line"):
        load_subjects(root)


def test_world_subjects_load(tmp_path):
    subjects_module = pytest.importorskip("lora2.world.subjects")
    root = subjects_module.write_subjects(tmp_path / "world")
    subjects = load_subjects(root)
    assert len(subjects) == len(subjects_module.SUBJECTS)
    for subject in subjects.values():
        assert subject.image_paths and len(subject.prompts) == 25
        assert subject.eval_prompts("sks")[0].startswith(f"a sks {subject.class_name}")
