"""The second world's subjects (issue 19): detail graded in five levels, for a base model where LoRA capacity binds.

The first world's subjects are learned as well by rank 8 as by rank 512. These are drawn with the same renderer
(``lora2.world.subjects``) and the same classes, prompts and backgrounds, at a resolution (``SCALES["world2"]``,
128 px) that holds detail a low-rank update is expected to miss. Levels, two subjects each:

1. one flat shape;
2. short strings of glyphs (``subjects.glyph_bitmap``: an invented 5×3 script) on plaques;
3. a striped or checkered surface;
4. many parts: twenty-five or twenty-six beads of several colours;
5. all of it: patterns, many parts and a glyph string together.

The detail is drawn at the scale the base model's VAE (the first world's, f = 4) carries through its latents: glyph
cells and stripes of about 4 px or more at the instance images' typical size (the first version's 2-px glyph cells
and 3-px pinstripes came back from the VAE as blurs, docs/WORLD.md). ``VAE_MIN_PSNR`` is the round-trip PSNR each
subject keeps (tests/world/test_world2.py).

Every subject also records the first world's measured complexity, ``png_bits_per_pixel`` (PNG bits per pixel of its
render at 128 px), here averaged over the rotations ``PNG_ROTATIONS``: upright, axis-aligned glyph blocks compress
far better than the same glyphs turned as the instance images turn them (±35°). Its mean grows with the level
(tests/world/test_world2.py); it is the complexity the discrimination gate correlates with
(benchmarks/world2_gate.py).
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import numpy as np
import torch

from lora2.world import generator
from lora2.world.subjects import DATASET_VERSION as WORLD_DATASET_VERSION
from lora2.world.subjects import PALETTE, Layer, Subject, render_subject, write_subjects

WORLD2_SUBJECTS_VERSION = "2"
# Changes whenever any image could change: the first world's generator and renderer, or this set.
DATASET_VERSION = f"{WORLD_DATASET_VERSION}.w2.{WORLD2_SUBJECTS_VERSION}"
PNG_ROTATIONS = (0.0, 15.0, 30.0)
IMAGE_SIZE = 256  # instance images: twice the training resolution, as the first world's 128 px for 64 px
VAE_MIN_PSNR = 24.0  # dB: each subject's render at 128 px on white, through the base's VAE and back


def _ring_of(count: int, radius: float, size: float, colors: tuple[str, ...], phase: float = 0.0) -> tuple:
    """``count`` beads (circles) evenly round a circle, colours cycling through ``colors``."""
    return tuple(
        Layer(
            "circle",
            colors[i % len(colors)],
            (size, size),
            (radius * math.sin(phase + 2 * math.pi * i / count), radius * math.cos(phase + 2 * math.pi * i / count)),
        )
        for i in range(count)
    )


def _spiral(count: int, spread: float, size: float, colors: tuple[str, ...]) -> tuple:
    """``count`` beads on a sunflower (golden-angle) spiral of radius ``spread``, colours cycling."""
    golden = math.pi * (3 - math.sqrt(5))
    return tuple(
        Layer(
            "circle",
            colors[i % len(colors)],
            (size, size),
            (spread * math.sqrt((i + 0.5) / count) * math.cos(i * golden),
             spread * math.sqrt((i + 0.5) / count) * math.sin(i * golden)),
        )
        for i in range(count)
    )  # fmt: skip


SUBJECTS: tuple[Subject, ...] = (
    Subject("rust_triangle", "triangle", "a flat rust triangle", (Layer("triangle", "rust"),), level=1),
    Subject("sky_hexagon", "hexagon", "a flat sky-blue hexagon", (Layer("hexagon", "sky"),), level=1),
    Subject(
        "glyph_plaque",
        "square",
        "a navy square holding a cream plaque with the glyph string K7Q in navy",
        (
            Layer("square", "navy"),
            Layer("square", "cream", (0.84, 0.46), pattern="glyphs", color2="navy", text="K7Q"),
        ),
        level=2,
    ),
    Subject(
        "label_heart",
        "heart",
        "a coral heart with two white labels carrying the glyph strings 3M and ZE in plum",
        (
            Layer("heart", "coral"),
            Layer("square", "white", (0.56, 0.34), (0.0, 0.22), pattern="glyphs", color2="plum", text="3M"),
            Layer("square", "white", (0.46, 0.3), (0.0, -0.34), pattern="glyphs", color2="plum", text="ZE"),
        ),
        level=2,
    ),
    Subject(
        "pinstripe_circle",
        "circle",
        "a navy circle whose inner disc has cream pinstripes at 30 degrees",
        (
            Layer("circle", "navy"),
            Layer("circle", "navy", (0.72, 0.72), rotation=30.0, pattern="striped", color2="cream", period=0.3),
        ),
        level=3,
    ),
    Subject(
        "fine_check_diamond",
        "diamond",
        "a maroon diamond with an inner diamond in a maroon and mint checkerboard",
        (
            Layer("diamond", "maroon"),
            Layer("diamond", "maroon", (0.72, 0.72), pattern="checkered", color2="mint", period=0.42),
        ),
        level=3,
    ),
    Subject(
        "bead_circle",
        "circle",
        "a cream circle with twenty beads in two rings and a spiral of five more, in seven colours",
        (Layer("circle", "cream"),)
        + _ring_of(12, 0.78, 0.14, ("magenta", "teal", "gold"))
        + _ring_of(8, 0.47, 0.13, ("navy", "lime"), phase=math.pi / 8)
        + _spiral(5, 0.2, 0.1, ("rust", "sky")),
        level=4,
    ),
    Subject(
        "confetti_square",
        "square",
        "a slate square strewn with twenty-six beads of five colours on a sunflower spiral",
        (Layer("square", "slate"),) + _spiral(26, 0.86, 0.13, ("salmon", "lime", "cream", "magenta", "gold")),
        level=4,
    ),
    Subject(
        "circuit_hexagon",
        "hexagon",
        "a slate hexagon in a mint grid with ten beads, a plaque with the glyphs X4N and a pinstriped bar",
        (
            Layer("hexagon", "slate", pattern="grid", color2="mint", period=0.3),
            *_ring_of(10, 0.74, 0.12, ("gold", "magenta", "sky")),
            Layer("square", "cream", (0.66, 0.3), (0.0, 0.14), pattern="glyphs", color2="maroon", text="X4N"),
            Layer("square", "navy", (0.5, 0.14), (0.0, -0.32), pattern="striped", color2="lime", period=0.3),
        ),
        level=5,
    ),
    Subject(
        "mosaic_star",
        "star",
        "an eight-pointed checkered star round a disc of rings, twelve beads and the glyph string 8TW",
        (
            Layer("star8", "plum", pattern="checkered", color2="cream", period=0.3),
            Layer("circle", "navy", (0.62, 0.62), pattern="rings", color2="sky", period=0.36),
            *_ring_of(12, 0.74, 0.1, ("gold", "lime", "salmon", "mint")),
            Layer("square", "cream", (0.6, 0.3), pattern="glyphs", color2="maroon", text="8TW"),
        ),
        level=5,
    ),
)


def write_world2_subjects(
    root: Path, size: int = IMAGE_SIZE, quality: int = 95, subject_set: str = "designed"
) -> Path:
    """Write one of the second world's subject datasets (``SUBJECT_SETS``: the designed ten, the crowd or the
    families; DreamBooth layout, as ``subjects.write_subjects``) to ``root``."""
    if subject_set not in SUBJECT_SETS:
        raise ValueError(f"subject_set must be one of {tuple(SUBJECT_SETS)}, got {subject_set!r}")
    subjects, version = SUBJECT_SETS[subject_set]
    return write_subjects(
        root, size=size, quality=quality, subjects=subjects, version=version, png_rotations=PNG_ROTATIONS
    )


# ---------------------------------------------------------------------- detail siblings (the DINO evaluator's data)
# A subject of the second world's kinds, drawn at random, and its sibling: the same subject with one detail redrawn
# (a glyph string, the beads' colours, or a pattern's kind or period). Instance discrimination over such pairs (the
# sibling is the other's hardest negative) is meant to make the DINO evaluator see the detail DreamBooth has to get
# right; an evaluator trained on the first world's objects alone scores a subject and its sibling almost alike
# (docs/WORLD.md, where the CPU check of this training is too).
GLYPH_ALPHABET = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"
EVALUATION_TEXTS = frozenset(layer.text for subject in SUBJECTS for layer in subject.layers if layer.text)
DETAIL_SHAPES = ("circle", "square", "hexagon", "diamond", "heart", "star8", "triangle")
DETAIL_PATTERNS = ("striped", "checkered", "grid", "rings")
DETAIL_PERIODS = (0.3, 0.36, 0.42)  # layer units: ≥ about 4 px at the instance images' typical size


def _glyph_text(rng: np.random.Generator) -> str:
    """Two or three glyphs, never one of the evaluation subjects' strings."""
    while True:
        text = "".join(rng.choice(list(GLYPH_ALPHABET), size=int(rng.integers(2, 4))))
        if text not in EVALUATION_TEXTS:
            return text


def _colors(rng: np.random.Generator, count: int) -> tuple[str, ...]:
    return tuple(str(c) for c in rng.choice(sorted(PALETTE), size=count, replace=False))


def _detail(kind: str, slot: int, rng: np.random.Generator) -> tuple[Layer, ...]:
    """The layers of one detail of ``kind`` in slot 0 (upper half) or 1 (lower half), its values drawn from ``rng``."""
    y = 0.3 if slot == 0 else -0.3
    if kind == "glyphs":
        plaque, ink = _colors(rng, 2)
        return (Layer("square", plaque, (0.7, 0.3), (0.0, y), pattern="glyphs", color2=ink, text=_glyph_text(rng)),)
    if kind == "beads":
        return _ring_of(int(rng.integers(8, 13)), 0.76, 0.12, _colors(rng, 3), phase=float(rng.uniform(0, math.pi)))
    color, color2 = _colors(rng, 2)
    pattern, period = str(rng.choice(DETAIL_PATTERNS)), float(rng.choice(DETAIL_PERIODS))
    return (Layer("circle", color, (0.42, 0.42), (0.0, y), pattern=pattern, color2=color2, period=period),)


Slot = tuple[str, int, int]  # a detail's kind and the range of its layers in the subject


def detail_subject(rng: np.random.Generator) -> tuple[Subject, tuple[Slot, ...]]:
    """A random subject of the second world's kinds (a shape of one colour carrying one or two details) and its
    details' slots (kind, first layer, end layer), in slot order."""
    kinds = tuple(str(k) for k in rng.choice(("glyphs", "beads", "pattern"), size=int(rng.integers(1, 3))))
    layers = [Layer(str(rng.choice(DETAIL_SHAPES)), _colors(rng, 1)[0])]
    slots = []
    for slot, kind in enumerate(kinds):
        detail = _detail(kind, slot, rng)
        slots.append((kind, len(layers), len(layers) + len(detail)))
        layers += detail
    return Subject("detail", layers[0].shape, "a random detail subject", tuple(layers)), tuple(slots)


def detail_sibling(subject: Subject, slots: tuple[Slot, ...], rng: np.random.Generator) -> Subject:
    """``subject`` with the detail of one of its ``slots`` (drawn from ``rng``) redrawn, everything else kept: a
    glyph string, the beads' colours (same beads), or a patterned disc."""
    slot = int(rng.integers(len(slots)))
    kind, first, end = slots[slot]
    if kind == "beads":
        colors = _colors(rng, 3)
        beads = subject.layers[first:end]
        redrawn = tuple(Layer(b.shape, colors[i % 3], b.scale, b.offset) for i, b in enumerate(beads))
    else:
        redrawn = _detail(kind, slot, rng)
    layers = subject.layers[:first] + redrawn + subject.layers[end:]
    return Subject(subject.name, subject.class_name, subject.description, layers)


def _random_view(rng: np.random.Generator) -> dict:
    """A view as the instance images vary them: size, position, rotation and a world background."""
    radius = float(rng.uniform(0.26, 0.4))
    margin = radius + 0.03
    return {
        "x": float(rng.uniform(margin, 1 - margin)),
        "y": float(rng.uniform(margin, 1 - margin)),
        "radius": radius,
        "rotation": float(rng.uniform(-35.0, 35.0)),
        "background": str(rng.choice(generator.BACKGROUNDS)),
        "bg_shift": float(rng.random()),
    }


def _render_sibling_pair(args: tuple[int, int, int]) -> np.ndarray:
    """Family ``index`` of ``seed``: a subject and its sibling, two views each: uint8 2×2×H×W×3 (sibling, view)."""
    seed, index, size = args
    torch.set_num_threads(1)
    rng = np.random.default_rng([seed, index])
    subject, slots = detail_subject(rng)
    sibling = detail_sibling(subject, slots, rng)
    return np.stack([
        np.stack([np.asarray(render_subject(s, size, **_random_view(rng))) for _ in range(2)])
        for s in (subject, sibling)
    ])  # fmt: skip


def submit_detail_pairs(families: int, seed: int, size: int, pool: Executor | None = None) -> Iterator[np.ndarray]:
    """Start rendering ``families`` subjects and their siblings (two views each) in ``pool`` (in this process when
    None); ``stack_detail_pairs`` waits for them. Each family is seeded by (``seed``, its index), so the result does
    not depend on which worker renders it."""
    jobs = [(seed, index, size) for index in range(families)]
    if pool is None:
        return map(_render_sibling_pair, jobs)
    return pool.map(_render_sibling_pair, jobs, chunksize=64)  # submits every job now


def stack_detail_pairs(rendered: Iterable[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views (uint8 N×3×H×W each, N = 2 · families) of ``submit_detail_pairs``' renders; rows 2k and 2k + 1
    are a subject and its sibling."""
    views = torch.from_numpy(np.stack(list(rendered)))  # F×2×2×H×W×3 (family, sibling, view)
    families, _, _, size = views.shape[:4]
    views = views.reshape(2 * families, 2, size, size, 3).permute(1, 0, 4, 2, 3).contiguous()  # 2×N×3×H×W
    return views[0], views[1]


def render_pool(workers: int) -> AbstractContextManager[Executor | None]:
    """``workers`` forked rendering processes (None, rendering in this process, for one): fork before this process
    uses a GPU, whose context a child must not inherit; forked, the workers need no importable main module."""
    if workers <= 1:
        return nullcontext(None)
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))


def detail_pairs(families: int, seed: int, size: int, workers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``stack_detail_pairs(submit_detail_pairs(...))`` rendered by ``render_pool(workers)``."""
    with render_pool(workers) as pool:
        return stack_detail_pairs(submit_detail_pairs(families, seed, size, pool))


# ---------------------------------------------------------------------- the crowd (thirty subjects, one adapter)
# SUBJECTS and twenty more drawn at random, four at each level, built as the designed ones are: a flat shape (1); a
# shape with one or two glyph plaques (2); a shape whose inner shape is patterned (3); a shape with one or two bead
# rings of three to five colours (4); a patterned shape with beads and a glyph plaque (5). Trained into one adapter,
# they are a test of how many subjects a low rank holds (docs/WORLD.md, "The crowd").
CROWD_SEED = 19
CROWD_PER_LEVEL = 4
CROWD_VERSION = "1"
CROWD_DATASET_VERSION = f"{DATASET_VERSION}.crowd{CROWD_VERSION}"
# The drawn subjects' round trip through the base's VAE (as VAE_MIN_PSNR): the crowd's 22.9 dB at the least
# (salmon_star_5a, a patterned star with beads and glyphs; the others 25.6 dB or more; measured after the crowd gate
# ran on them), the look-alikes' 23.0 dB, the siblings' 22.3 dB (maroon_circle_5e, four parts on a fine surface).
DRAWN_VAE_MIN_PSNR = 22.0
_CLASS_OF_SHAPE = {"star8": "star"}


def _crowd_layers(level: int, shape: str, color: str, rng: np.random.Generator) -> tuple[Layer, ...]:
    """The layers of one drawn subject of ``level`` on a ``shape`` of ``color`` (a pattern's second colour differs
    from ``color``)."""
    base = Layer(shape, color)
    other = next(c for c in _colors(rng, 2) if c != color)
    if level == 1:
        return (base,)
    if level == 2:
        return (base,) + sum((_detail("glyphs", slot, rng) for slot in range(int(rng.integers(1, 3)))), ())
    if level == 3:
        pattern, period = str(rng.choice(DETAIL_PATTERNS)), float(rng.choice(DETAIL_PERIODS))
        return (base, Layer(shape, color, (0.72, 0.72), pattern=pattern, color2=other, period=period))
    if level == 4:
        rings = _ring_of(int(rng.integers(10, 14)), 0.76, 0.13, _colors(rng, int(rng.integers(3, 6))))
        if rng.random() < 0.5:
            rings += _ring_of(int(rng.integers(6, 9)), 0.45, 0.12, _colors(rng, 2), phase=math.pi / 8)
        return (base,) + rings
    pattern, period = str(rng.choice(DETAIL_PATTERNS)), float(rng.choice(DETAIL_PERIODS))
    return (
        Layer(shape, color, pattern=pattern, color2=other, period=period),
        *_ring_of(int(rng.integers(8, 12)), 0.76, 0.11, _colors(rng, 3)),
        *_detail("glyphs", int(rng.integers(2)), rng),
    )


def crowd_subjects(per_level: int = CROWD_PER_LEVEL, seed: int = CROWD_SEED) -> tuple[Subject, ...]:
    """``per_level`` subjects at each of the five levels drawn from ``seed``, named ``<colour>_<class>_<level><k>``;
    no two share (shape, colour), and none the (shape, colour) of a designed subject."""
    if not 1 <= per_level <= 8:
        raise ValueError(f"per_level must lie in [1, 8] (subjects are lettered a-h), got {per_level!r}")
    rng = np.random.default_rng(seed)
    taken = {(s.layers[0].shape, s.layers[0].color) for s in SUBJECTS}
    drawn = []
    for level in range(1, 6):
        for k in range(per_level):
            while (pair := (str(rng.choice(DETAIL_SHAPES)), _colors(rng, 1)[0])) in taken:
                pass
            taken.add(pair)
            shape, color = pair
            class_name = _CLASS_OF_SHAPE.get(shape, shape)
            layers = _crowd_layers(level, shape, color, rng)
            parts = f"{len(layers) - 1} parts" if len(layers) > 1 else "flat"
            description = f"a {color} {class_name}, level {level}, {parts} (drawn)"
            drawn.append(
                Subject(f"{color}_{class_name}_{level}{'abcdefgh'[k]}", class_name, description, layers, level)
            )
    return tuple(drawn)


CROWD_SUBJECTS: tuple[Subject, ...] = SUBJECTS + crowd_subjects()


# ---------------------------------------------------------------------- families (thirty subjects, one adapter)
# Six families, each one shape of one colour (no two families share either) at the five levels: the flat shape, and
# the same shape with glyph plaques, a patterned inner shape, bead rings, or all of them (as ``_crowd_layers``). The
# class word names the family, so the five members differ only in their detail: built so that what one adapter must
# hold beyond "which family" grows with the level (measured on one H200: the gap of rank 4 to rank 64 follows the
# family instead; docs/WORLD.md, "Families").
FAMILY_SEED = 26
FAMILY_COUNT = 6
FAMILY_VERSION = "1"
FAMILY_DATASET_VERSION = f"{DATASET_VERSION}.families{FAMILY_VERSION}"


def family_subjects(families: int = FAMILY_COUNT, seed: int = FAMILY_SEED) -> tuple[Subject, ...]:
    """``families`` shapes of distinct classes and colours drawn from ``seed``, each at levels 1-5, named
    ``<colour>_<class>_<level>``, family by family."""
    if not 1 <= families <= len(DETAIL_SHAPES):
        raise ValueError(f"families must lie in [1, {len(DETAIL_SHAPES)}] (one class each), got {families!r}")
    rng = np.random.default_rng(seed)
    shapes = [str(shape) for shape in rng.choice(DETAIL_SHAPES, size=families, replace=False)]
    subjects = []
    for shape, color in zip(shapes, _colors(rng, families)):
        class_name = _CLASS_OF_SHAPE.get(shape, shape)
        for level in range(1, 6):
            layers = _crowd_layers(level, shape, color, rng)
            description = f"a {color} {class_name}, level {level} of its family (drawn)"
            subjects.append(Subject(f"{color}_{class_name}_{level}", class_name, description, layers, level))
    return tuple(subjects)


FAMILY_SUBJECTS: tuple[Subject, ...] = family_subjects()


# ---------------------------------------------------------------------- look-alikes (thirty subjects, one adapter)
# Five groups of six look-alikes, one group a level, each group one class: the flat group's six differ only in their
# colour, and in each other group the six share the shape and its colour and differ only in their level's detail
# (glyph plaques, a patterned inner shape, bead rings, as ``_crowd_layers``). Every subject has five look-alikes (in
# the crowd and the families, look-alikes are what a low rank loses, docs/WORLD.md); what tells it from them is coarse
# for the flat shapes (a colour over the whole shape) and finer with each level. Version 2 changes level 5 only (levels
# 1-4 are version 1's subjects, drawn first from the same seed): in version 1 its six differed in all of their detail
# (surface, beads and glyphs) and stood apart from one another (DINO distance to the group 0.43, against 0.30 and 0.33
# at levels 3 and 4) instead of being look-alikes, and lost nothing to a low rank (CPU pilot, seeds 0-1: rank 64 -
# rank 4 = +0.064 DINO over the set, -0.020 at level 5, ρ = -0.15 against complexity; docs/WORLD.md, "Look-alikes and
# siblings"). In version 2 the six share the bead ring and the glyph plaque and each has its own patterned surface.
LOOKALIKE_SEED = 31
LOOKALIKE_GROUP = 6
LOOKALIKE_VERSION = "2"
LOOKALIKE_DATASET_VERSION = f"{DATASET_VERSION}.lookalikes{LOOKALIKE_VERSION}"


def _five_groups(group_size: int, seed: int) -> tuple[np.random.Generator, list[str], tuple[str, ...]]:
    """The draws that start a set of five groups of ``group_size``, one a level: the generator of ``seed``, five
    distinct shapes, and ``group_size`` + 4 colours (the flat group's, then one for each detailed group)."""
    if not 2 <= group_size <= 8:
        raise ValueError(f"group_size must lie in [2, 8] (subjects are lettered a-h), got {group_size!r}")
    rng = np.random.default_rng(seed)
    shapes = [str(shape) for shape in rng.choice(DETAIL_SHAPES, size=5, replace=False)]
    return rng, shapes, _colors(rng, group_size + 4)


def _surface_lookalikes(shape: str, color: str, group_size: int, rng: np.random.Generator) -> list[tuple[Layer, ...]]:
    """The layers of ``group_size`` level-5 look-alikes on a ``shape`` of ``color``: one bead ring and one glyph plaque
    shared by all, each its own patterned surface (no two of the same pattern, period and second colour)."""
    beads = _ring_of(int(rng.integers(8, 12)), 0.76, 0.11, _colors(rng, 3))
    glyphs = _detail("glyphs", int(rng.integers(2)), rng)
    surfaces: list[Layer] = []
    while len(surfaces) < group_size:
        other = next(c for c in _colors(rng, 2) if c != color)
        pattern, period = str(rng.choice(DETAIL_PATTERNS)), float(rng.choice(DETAIL_PERIODS))
        surface = Layer(shape, color, pattern=pattern, color2=other, period=period)
        if surface not in surfaces:
            surfaces.append(surface)
    return [(surface, *beads, *glyphs) for surface in surfaces]


def lookalike_subjects(group_size: int = LOOKALIKE_GROUP, seed: int = LOOKALIKE_SEED) -> tuple[Subject, ...]:
    """Five groups of ``group_size`` look-alikes drawn from ``seed``, level by level, each group one class (five
    distinct): ``group_size`` colours of one flat shape, then, for levels 2-4, one shape of one colour (no colour of
    another group) with ``group_size`` draws of the level's detail, and for level 5 ``_surface_lookalikes``. Named
    ``<colour>_<class>_<level><k>``."""
    rng, shapes, colors = _five_groups(group_size, seed)
    subjects = []
    for level, shape in enumerate(shapes, start=1):
        class_name = _CLASS_OF_SHAPE.get(shape, shape)
        group_color = colors[group_size + level - 2]  # levels 2-5: one colour a group (level 1: one a member)
        if level == 5:
            members = [(group_color, layers) for layers in _surface_lookalikes(shape, group_color, group_size, rng)]
        else:
            member_colors = colors[:group_size] if level == 1 else (group_color,) * group_size
            members = [(c, _crowd_layers(level, shape, c, rng)) for c in member_colors]
        for k, (color, layers) in enumerate(members):
            description = f"a {color} {class_name}, level {level}, one of {group_size} look-alikes (drawn)"
            subjects.append(
                Subject(f"{color}_{class_name}_{level}{'abcdefgh'[k]}", class_name, description, layers, level)
            )
    return tuple(subjects)


LOOKALIKE_SUBJECTS: tuple[Subject, ...] = lookalike_subjects()


# ---------------------------------------------------------------------- siblings (thirty subjects, one adapter)
# Five groups of six, one group a level, each group one class: six colours of a flat shape (as the look-alikes), then
# one shape of one colour carrying a stem of one to four parts (an upper glyph plaque; a lower patterned disc; a bead
# ring; a patterned surface), its first member the stem itself and each other member the stem with one part redrawn,
# in turn (at level 2, with its one part, every member's own). The more parts a subject carries, the smaller the
# share of it that tells it from its siblings: built so that a level's detail is what one adapter must hold to keep
# them apart. (CPU pilot, seed 0: rank 64 - rank 4 = +0.106 DINO, shrinking with the level, ρ = -0.47: near-copies
# cost little when confused; docs/WORLD.md.)
SIBLING_SEED = 37
SIBLING_GROUP = 6
SIBLING_PARTS = {2: ("upper",), 3: ("upper", "lower"), 4: ("upper", "lower", "beads"),
                 5: ("surface", "upper", "lower", "beads")}  # fmt: skip
SIBLING_VERSION = "1"
SIBLING_DATASET_VERSION = f"{DATASET_VERSION}.siblings{SIBLING_VERSION}"


def _sibling_part(part: str, shape: str, color: str, rng: np.random.Generator) -> tuple[Layer, ...]:
    """The layers of one ``part`` of a sibling stem on a ``shape`` of ``color`` (``SIBLING_PARTS``)."""
    if part == "surface":
        other = next(c for c in _colors(rng, 2) if c != color)
        pattern, period = str(rng.choice(DETAIL_PATTERNS)), float(rng.choice(DETAIL_PERIODS))
        return (Layer(shape, color, pattern=pattern, color2=other, period=period),)
    if part == "beads":
        return _ring_of(int(rng.integers(10, 14)), 0.76, 0.11, _colors(rng, 3), phase=float(rng.uniform(0, math.pi)))
    return _detail("glyphs" if part == "upper" else "pattern", 0 if part == "upper" else 1, rng)


def _sibling_group(
    level: int, shape: str, colors: tuple[str, ...], group_size: int, rng: np.random.Generator
) -> list[tuple[str, tuple[Layer, ...]]]:
    """(colour, layers) of the ``group_size`` members of the siblings' group of ``level`` on ``shape``."""
    parts = SIBLING_PARTS.get(level, ())
    if not parts:  # the flat group: one colour each
        return [(color, (Layer(shape, color),)) for color in colors[:group_size]]
    color = colors[group_size + level - 2]
    stem = {part: _sibling_part(part, shape, color, rng) for part in parts}
    members = []
    for k in range(group_size):
        own = dict(stem)
        if k > 0 or len(parts) == 1:
            redrawn = parts[k % len(parts)]
            own[redrawn] = _sibling_part(redrawn, shape, color, rng)
        surface = own.get("surface", (Layer(shape, color),))
        members.append((color, surface + sum((own.get(part, ()) for part in ("lower", "upper", "beads")), ())))
    return members


def sibling_subjects(group_size: int = SIBLING_GROUP, seed: int = SIBLING_SEED) -> tuple[Subject, ...]:
    """Five groups of ``group_size`` siblings drawn from ``seed``, level by level (module comment above), each group
    one class (five distinct) and the detailed groups' colours none of another group's. Named
    ``<colour>_<class>_<level><k>``."""
    rng, shapes, colors = _five_groups(group_size, seed)
    subjects = []
    for level, shape in enumerate(shapes, start=1):
        class_name = _CLASS_OF_SHAPE.get(shape, shape)
        for k, (color, layers) in enumerate(_sibling_group(level, shape, colors, group_size, rng)):
            description = f"a {color} {class_name}, level {level}, one of {group_size} siblings (drawn)"
            subjects.append(
                Subject(f"{color}_{class_name}_{level}{'abcdefgh'[k]}", class_name, description, layers, level)
            )
    return tuple(subjects)


SIBLING_SUBJECTS: tuple[Subject, ...] = sibling_subjects()
SUBJECT_SETS: dict[str, tuple[tuple[Subject, ...], str]] = {
    "designed": (SUBJECTS, DATASET_VERSION),
    "crowd": (CROWD_SUBJECTS, CROWD_DATASET_VERSION),
    "families": (FAMILY_SUBJECTS, FAMILY_DATASET_VERSION),
    "lookalikes": (LOOKALIKE_SUBJECTS, LOOKALIKE_DATASET_VERSION),
    "siblings": (SIBLING_SUBJECTS, SIBLING_DATASET_VERSION),
}
