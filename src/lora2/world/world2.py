"""The second world's subjects (issue 19): detail graded in five levels, for a base model where LoRA capacity binds.

The first world's subjects are learned as well by rank 8 as by rank 512. These are drawn with the same renderer
(``lora2.world.subjects``) and the same classes, prompts and backgrounds, at a resolution (``SCALES["world2"]``,
128 px) that keeps detail a low-rank update is expected to miss. Levels, two subjects each:

1. one flat shape;
2. strings of glyphs (``subjects.glyph_bitmap``: an invented 5×3 script) on plaques;
3. a fine high-frequency surface (stripes or checks of a few pixels' period);
4. many parts: twenty to forty beads of several colours;
5. all of it: fine patterns, many parts and glyph strings together.

Every subject also records the first world's measured complexity, ``png_bits_per_pixel`` (PNG bits per pixel of its
render at 128 px), here averaged over the rotations ``PNG_ROTATIONS``: upright, axis-aligned glyph blocks compress
far better than the same glyphs turned as the instance images turn them (±35°). Its mean grows with the level
(tests/world/test_world2.py); it is the complexity the discrimination gate correlates with
(benchmarks/world2_gate.py). The levels follow it: glyph strings measure below fine patterns, so they come first.
"""

from __future__ import annotations

import math
from pathlib import Path

from lora2.world.subjects import DATASET_VERSION as WORLD_DATASET_VERSION
from lora2.world.subjects import Layer, Subject, write_subjects

WORLD2_SUBJECTS_VERSION = "1"
# Changes whenever any image could change: the first world's generator and renderer, or this set.
DATASET_VERSION = f"{WORLD_DATASET_VERSION}.w2.{WORLD2_SUBJECTS_VERSION}"
PNG_ROTATIONS = (0.0, 15.0, 30.0)
IMAGE_SIZE = 256  # instance images: twice the training resolution, as the first world's 128 px for 64 px


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
        "a navy square holding two cream plaques with the glyph strings K7Q2X and PLUM8 in navy",
        (
            Layer("square", "navy"),
            Layer("square", "cream", (0.86, 0.3), (0.0, 0.36), pattern="glyphs", color2="navy", text="K7Q2X"),
            Layer("square", "cream", (0.86, 0.3), (0.0, -0.36), pattern="glyphs", color2="navy", text="PLUM8"),
        ),
        level=2,
    ),
    Subject(
        "label_heart",
        "heart",
        "a coral heart with two white labels carrying the glyph strings 3MB9 and ZEN in plum",
        (
            Layer("heart", "coral"),
            Layer("square", "white", (0.62, 0.24), (0.0, 0.2), pattern="glyphs", color2="plum", text="3MB9"),
            Layer("square", "white", (0.48, 0.24), (0.0, -0.22), pattern="glyphs", color2="plum", text="ZEN"),
        ),
        level=2,
    ),
    Subject(
        "pinstripe_circle",
        "circle",
        "a navy circle whose inner disc has fine cream pinstripes at 30 degrees",
        (
            Layer("circle", "navy"),
            Layer("circle", "navy", (0.5, 0.5), rotation=30.0, pattern="striped", color2="cream", period=0.16),
        ),
        level=3,
    ),
    Subject(
        "fine_check_diamond",
        "diamond",
        "a maroon diamond with an inner diamond in a fine maroon and mint checkerboard",
        (
            Layer("diamond", "maroon"),
            Layer("diamond", "maroon", (0.62, 0.62), pattern="checkered", color2="mint", period=0.2),
        ),
        level=3,
    ),
    Subject(
        "bead_circle",
        "circle",
        "a cream circle with twenty-four beads in two rings and a spiral of six, in six colours",
        (Layer("circle", "cream"),)
        + _ring_of(14, 0.8, 0.12, ("magenta", "teal", "gold"))
        + _ring_of(10, 0.52, 0.1, ("navy", "lime"), phase=math.pi / 10)
        + _spiral(6, 0.26, 0.08, ("rust", "sky")),
        level=4,
    ),
    Subject(
        "confetti_square",
        "square",
        "a slate square strewn with forty beads of five colours on a sunflower spiral",
        (Layer("square", "slate"),) + _spiral(40, 0.86, 0.1, ("salmon", "lime", "cream", "magenta", "gold")),
        level=4,
    ),
    Subject(
        "circuit_hexagon",
        "hexagon",
        "a slate hexagon in a fine mint grid with twelve beads, a plaque with the glyphs X4N7Q and a pinstriped bar",
        (
            Layer("hexagon", "slate", pattern="grid", color2="mint", period=0.1),
            *_ring_of(12, 0.72, 0.1, ("gold", "magenta", "sky")),
            Layer("square", "cream", (0.56, 0.2), (0.0, 0.12), pattern="glyphs", color2="maroon", text="X4N7Q"),
            Layer("square", "navy", (0.4, 0.1), (0.0, -0.22), pattern="striped", color2="lime", period=0.06),
        ),
        level=5,
    ),
    Subject(
        "mosaic_star",
        "star",
        "an eight-pointed checkered star round a disc of fine rings, sixteen beads and the glyph strings 8TWZ and HC5",
        (
            Layer("star8", "plum", pattern="checkered", color2="cream", period=0.1),
            Layer("circle", "navy", (0.52, 0.52), pattern="rings", color2="sky", period=0.08),
            *_ring_of(16, 0.62, 0.06, ("gold", "lime", "salmon", "mint")),
            Layer("square", "cream", (0.36, 0.11), (0.0, 0.13), pattern="glyphs", color2="maroon", text="8TWZ"),
            Layer("square", "cream", (0.28, 0.11), (0.0, -0.13), pattern="glyphs", color2="navy", text="HC5"),
        ),
        level=5,
    ),
)


def write_world2_subjects(root: Path, size: int = IMAGE_SIZE, quality: int = 95) -> Path:
    """Write the second world's subject dataset (DreamBooth layout, as ``subjects.write_subjects``) to ``root``."""
    return write_subjects(
        root, size=size, quality=quality, subjects=SUBJECTS, version=DATASET_VERSION, png_rotations=PNG_ROTATIONS
    )
