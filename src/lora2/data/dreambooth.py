"""DreamBooth subjects: the folder layout of the DreamBooth dataset (Ruiz et al., 2023).

Layout::

    root/
        prompts_and_classes.txt     # a "Classes" table and the "Object Prompts" / "Live Subject Prompts" lists
        <subject_name>/00.jpg ...   # 3-6 photos of one subject per folder

``prompts_and_classes.txt`` holds a CSV table ``subject_name,class[,live]`` after a line ``Classes`` and two prompt
lists after ``Object Prompts`` and ``Live Subject Prompts``, each prompt written as the Python line
``'a {0} {1} in the jungle'.format(unique_token, class_token),``. The lines are parsed with a regular expression,
never evaluated. Prompts are kept as templates; ``format_prompt`` fills in the identifier and the class.

Live subjects (which get the "Live Subject Prompts": outfits, hats) are decided by an optional third ``live``
column of the Classes table when present (``true``/``false``), and otherwise by the class being an animal
(``LIVE_CLASSES``: in the DreamBooth dataset exactly the cats and dogs; "stuffed animal" is an object).
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

PROMPTS_FILE = "prompts_and_classes.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LIVE_CLASSES = frozenset(
    {"cat", "dog", "kitten", "puppy", "bird", "horse", "rabbit", "bunny", "hamster", "parrot", "animal", "pet"}
)
_PROMPT_LINE = re.compile(
    r"""^\s*(['"])(?P<template>.*?)\1\s*\.format\(\s*unique_token\s*,\s*class_token\s*\)\s*,?\s*$"""
)
_SECTIONS = {"classes": "classes", "object prompts": "object", "live subject prompts": "live", "prompts": None}


@dataclass
class Subject:
    """One DreamBooth subject.

    name: folder name (e.g. ``"dog6"``).
    class_name: class noun used in prompts (e.g. ``"dog"``, ``"stuffed animal"``).
    image_paths: the subject's photos, sorted by file name.
    live: True for live subjects (animals), which use the live-subject prompt list.
    prompts: the 25 evaluation prompt templates, ``{0}`` = identifier token, ``{1}`` = class token.
    """

    name: str
    class_name: str
    image_paths: list[Path]
    live: bool
    prompts: list[str] = field(default_factory=list)

    def instance_prompt(self, unique_token: str) -> str:
        """The training prompt ``"a <token> <class>"``."""
        return format_prompt("a {0} {1}", unique_token, self.class_name)

    def eval_prompts(self, unique_token: str) -> list[str]:
        """The evaluation prompts with the identifier token filled in."""
        return [format_prompt(template, unique_token, self.class_name) for template in self.prompts]

    def class_prompts(self) -> list[str]:
        """The evaluation prompts without the identifier (for CLIP-T): ``"a dog in the jungle"``."""
        return [format_prompt(template, "", self.class_name) for template in self.prompts]


def format_prompt(template: str, unique_token: str, class_token: str) -> str:
    """Fill ``{0}`` (identifier) and ``{1}`` (class) of a DreamBooth template; an empty identifier leaves no gap.

    Only the two positional fields are substituted (no attribute access or format specs, unlike ``str.format``).
    """
    text = template.replace("{0}", unique_token).replace("{1}", class_token)
    return " ".join(text.split())


@dataclass
class _PromptsFile:
    classes: dict[str, str]
    live_column: dict[str, bool]
    object_prompts: list[str]
    live_prompts: list[str]


def _parse_bool(value: str, path: Path, subject: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "yes", "1", "live"):
        return True
    if lowered in ("false", "no", "0", "object", ""):
        return False
    raise ValueError(f"{path}: live column of subject {subject!r} must be true/false, got {value!r}")


def _parse_prompts_file(path: Path) -> _PromptsFile:
    """Parse a ``prompts_and_classes.txt`` (see module docstring) without evaluating any of it."""
    if not path.is_file():
        raise ValueError(f"DreamBooth prompts file not found: {path} (expected beside the subject folders)")
    section = None
    class_rows: list[str] = []
    prompts: dict[str, list[str]] = {"object": [], "live": []}
    for line_number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if line.lower() in _SECTIONS:
            section = _SECTIONS[line.lower()] or section
            continue
        if section == "classes":
            class_rows.append(line)
        elif section in prompts:
            match = _PROMPT_LINE.match(line)
            if match:
                prompts[section].append(match.group("template"))
            elif not (line.startswith("prompt_list") or line in ("]", "[")):
                raise ValueError(f"{path}:{line_number}: cannot parse prompt line {raw!r}")
    rows = list(csv.reader(class_rows))
    if not rows or [cell.strip() for cell in rows[0][:2]] != ["subject_name", "class"]:
        raise ValueError(f"{path}: missing 'Classes' table with header 'subject_name,class'")
    has_live = len(rows[0]) > 2 and rows[0][2].strip() == "live"
    classes, live_column = {}, {}
    for row in rows[1:]:
        if len(row) < 2:
            raise ValueError(f"{path}: bad Classes row {row!r}")
        classes[row[0].strip()] = row[1].strip()
        if has_live:
            live_column[row[0].strip()] = _parse_bool(row[2] if len(row) > 2 else "", path, row[0])
    return _PromptsFile(classes, live_column, prompts["object"], prompts["live"])


def _image_paths(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _make_subject(folder: Path, table: _PromptsFile, prompts_path: Path) -> Subject:
    name = folder.name
    if name not in table.classes:
        raise ValueError(f"subject {name!r} ({folder}) is not in the Classes table of {prompts_path}")
    images = _image_paths(folder)
    if not images:
        raise ValueError(f"subject folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    class_name = table.classes[name]
    live = table.live_column.get(name, class_name.lower() in LIVE_CLASSES)
    prompts = table.live_prompts if live else table.object_prompts
    if not prompts:
        kind = "Live Subject Prompts" if live else "Object Prompts"
        raise ValueError(f"{prompts_path} has no '{kind}' list, needed by subject {name!r}")
    return Subject(name=name, class_name=class_name, image_paths=images, live=live, prompts=list(prompts))


def load_subject(path: str | Path, prompts_file: str | Path | None = None) -> Subject:
    """Load one subject folder; its prompts/classes file is ``path/../prompts_and_classes.txt`` by default."""
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"subject folder not found: {folder}")
    prompts_path = Path(prompts_file) if prompts_file is not None else folder.parent / PROMPTS_FILE
    return _make_subject(folder, _parse_prompts_file(prompts_path), prompts_path)


def load_subjects(root: str | Path) -> dict[str, Subject]:
    """Load every subject folder (non-hidden subdirectory) under a DreamBooth root, keyed by name, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"DreamBooth root folder not found: {root}")
    prompts_path = root / PROMPTS_FILE
    table = _parse_prompts_file(prompts_path)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_")))
    if not folders:
        raise ValueError(f"DreamBooth root {root} has no subject folders")
    subjects = {folder.name: _make_subject(folder, table, prompts_path) for folder in folders}
    logger.debug("loaded %d subjects from %s", len(subjects), root)
    return subjects
