"""Personalization subjects of the world, laid out like the DreamBooth dataset.

Each subject is a specific object of a world class (a ``generator.SHAPES`` name) drawn as a stack of layers whose
shapes, off-palette colours and subject-only textures (concentric rings, sectors, diagonal bands, ...) no world
caption can express, so the base model cannot draw it from text. Subjects are graded from one flat shape to
intricate multi-part textures; each records

    complexity = n_layers + n_patterned_layers + (n_colours - 1)

(a flat one-colour shape scores 1), plus ``png_bits_per_pixel``, the PNG-compressed size of a canonical render on
white, as a measured cross-check.

``write_subjects(root)`` writes one folder per subject (00.jpg, 01.jpg, ...: 4-6 instances with varied rotation,
scale, position and world background), ``prompts_and_classes.txt`` with the DreamBooth section structure (a
``subject_name,class`` table and 25 ``'a {0} {1} ...'.format(unique_token, class_token)`` prompts that place the
subject on world backgrounds or change its colour, size or position) and ``subjects.json``.
"""

from __future__ import annotations

import io
import json
import logging
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lora2.world import generator as g

logger = logging.getLogger(__name__)

SUBJECTS_VERSION = "1"
# Version of the written dataset: changes whenever images could change (names the cache folder).
DATASET_VERSION = f"{g.GENERATOR_VERSION}.{SUBJECTS_VERSION}"

# Off-palette colours: none is a world colour word, so captions cannot name them.
PALETTE: dict[str, tuple[float, float, float]] = {
    "olive": (0.50, 0.50, 0.10),
    "coral": (1.00, 0.45, 0.36),
    "teal": (0.00, 0.50, 0.50),
    "gold": (0.90, 0.70, 0.15),
    "navy": (0.06, 0.10, 0.38),
    "mint": (0.62, 0.95, 0.78),
    "maroon": (0.45, 0.05, 0.15),
    "lavender": (0.75, 0.65, 0.95),
    "salmon": (0.98, 0.62, 0.50),
    "lime": (0.65, 0.90, 0.10),
    "magenta": (0.85, 0.10, 0.65),
    "cream": (0.98, 0.94, 0.78),
    "slate": (0.30, 0.36, 0.45),
    "rust": (0.72, 0.30, 0.08),
    "sky": (0.45, 0.72, 0.98),
    "plum": (0.40, 0.12, 0.35),
}

# Subject-only patterns (not world words) next to the world's PATTERNS; "glyphs" writes a layer's ``text``.
SUBJECT_PATTERNS = ("rings", "sectors", "bands", "grid", "glyphs")
GLYPH_ROWS, GLYPH_COLUMNS = 5, 3  # a glyph is a 5×3 bitmap; one blank column follows each


@dataclass(frozen=True)
class Layer:
    """One part of a subject: a primitive shape placed in subject coordinates (radius units, y up).

    ``shape`` is a world shape or ``star<n>`` (an n-pointed star) / ``poly<n>`` (a regular n-gon); ``scale`` is
    (sx, sy); ``offset`` the centre; ``rotation`` in degrees; ``color`` and ``color2`` are ``PALETTE`` or world
    colour names; ``pattern`` is a world pattern or one of ``SUBJECT_PATTERNS``, with period ``period``; ``text``
    is the string the "glyphs" pattern writes across the layer in ``color2`` (one line, ``glyph_bitmap``).
    """

    shape: str
    color: str
    scale: tuple[float, float] = (1.0, 1.0)
    offset: tuple[float, float] = (0.0, 0.0)
    rotation: float = 0.0
    pattern: str = "solid"
    color2: str | None = None
    period: float = 0.5
    text: str = ""


@dataclass(frozen=True)
class Subject:
    """A personalization subject: ``name`` (folder), ``class_name`` (world shape), parts and a description;
    ``level`` is the designed complexity grade of a graded set (world2's 1-5), 0 where there is none."""

    name: str
    class_name: str
    description: str
    layers: tuple[Layer, ...] = field(default_factory=tuple)
    level: int = 0

    @property
    def colors(self) -> set[str]:
        """Distinct colour names used."""
        names = {layer.color for layer in self.layers}
        names |= {layer.color2 for layer in self.layers if layer.pattern != "solid" and layer.color2}
        return names

    @property
    def complexity(self) -> int:
        """n_layers + n_patterned_layers + (n_colours - 1); 1 for a flat one-colour shape."""
        patterned = sum(layer.pattern != "solid" for layer in self.layers)
        return len(self.layers) + patterned + len(self.colors) - 1


def _c(name: str) -> tuple[float, float, float]:
    if name in PALETTE:
        return PALETTE[name]
    if name in g.COLORS:
        return g.COLORS[name]
    raise ValueError(f"unknown colour {name!r}")


_SUBJECTS: tuple[Subject, ...] = (
    Subject("olive_star", "star", "a flat olive six-pointed star", (Layer("star6", "olive"),)),
    Subject(
        "coral_heart", "heart", "a flat coral heart, wider than the world's", (Layer("heart", "coral", (1.2, 0.9)),)
    ),
    Subject(
        "teal_ring",
        "ring",
        "a thick teal ring with a gold dot in the hole",
        (Layer("ring", "teal", (1.05, 1.05)), Layer("circle", "gold", (0.22, 0.22))),
    ),
    Subject(
        "framed_square",
        "square",
        "a navy square with a mint diamond inset",
        (Layer("square", "navy"), Layer("poly4", "mint", (0.7, 0.7))),
    ),
    Subject(
        "concentric_star",
        "star",
        "a maroon star with a gold inner star and a cream dot in the middle",
        (
            Layer("star", "maroon"),
            Layer("star", "gold", (0.58, 0.58)),
            Layer("circle", "cream", (0.16, 0.16)),
        ),
    ),
    Subject(
        "banded_moon",
        "moon",
        "a crescent with lavender and plum diagonal bands and a slate rim",
        (
            Layer("moon", "slate"),
            Layer("moon", "lavender", (0.86, 0.86), (0.04, -0.03), pattern="bands", color2="plum", period=0.4),
        ),
    ),
    Subject(
        "target_circle",
        "circle",
        "a circle of salmon and navy concentric rings with a lime centre",
        (
            Layer("circle", "salmon", pattern="rings", color2="navy", period=0.36),
            Layer("circle", "lime", (0.2, 0.2)),
        ),
    ),
    Subject(
        "quilt_square",
        "square",
        "a square in four quadrants: teal grid, coral, gold dots, plum",
        (
            Layer("square", "cream"),
            Layer("square", "teal", (0.37, 0.37), (-0.4, 0.4), pattern="grid", color2="cream", period=0.25),
            Layer("square", "coral", (0.37, 0.37), (0.4, 0.4)),
            Layer("square", "gold", (0.37, 0.37), (-0.4, -0.4), pattern="dotted", color2="rust", period=0.3),
            Layer("square", "plum", (0.37, 0.37), (0.4, -0.4)),
        ),
    ),
    Subject(
        "flower_hexagon",
        "hexagon",
        "a mint hexagon with six magenta petals round a gold centre",
        (Layer("hexagon", "mint"),)
        + tuple(
            Layer("circle", "magenta", (0.24, 0.24), (0.55 * math.sin(a), 0.55 * math.cos(a)))
            for a in np.arange(6) * math.pi / 3
        )
        + (Layer("circle", "gold", (0.28, 0.28), pattern="rings", color2="rust", period=0.12),),
    ),
    Subject(
        "jewel_diamond",
        "diamond",
        "a faceted diamond: sky, navy and mint triangles around a lavender table",
        (
            Layer("diamond", "navy"),
            Layer("poly3", "sky", (0.5, 0.5), (-0.22, 0.3), 180.0),
            Layer("poly3", "mint", (0.5, 0.5), (0.22, 0.3), 180.0),
            Layer("poly3", "sky", (0.5, 0.5), (0.22, -0.3)),
            Layer("poly3", "mint", (0.5, 0.5), (-0.22, -0.3)),
            Layer("diamond", "lavender", (0.32, 0.32), pattern="bands", color2="cream", period=0.12),
        ),
    ),
    Subject(
        "badge_cross",
        "cross",
        "a cross with rust and cream sector arms, a navy disc and a gold star in the middle",
        (
            Layer("cross", "rust", pattern="sectors", color2="cream", period=8),
            Layer("circle", "navy", (0.42, 0.42)),
            Layer("star", "gold", (0.3, 0.3), pattern="grid", color2="olive", period=0.12),
        ),
    ),
    Subject(
        "mosaic_heart",
        "heart",
        "a magenta heart with lime dots, an inner striped teal heart and three cream beads",
        (
            Layer("heart", "magenta", pattern="dotted", color2="lime", period=0.35),
            Layer("heart", "teal", (0.55, 0.55), (0.0, -0.05), pattern="striped", color2="mint", period=0.18),
            Layer("circle", "cream", (0.09, 0.09), (-0.5, 0.45)),
            Layer("circle", "cream", (0.09, 0.09), (0.5, 0.45)),
            Layer("circle", "cream", (0.09, 0.09), (0.0, -0.62)),
        ),
    ),
    Subject(
        "ornate_star",
        "star",
        "an eight-pointed navy star with gold dots, a checkered coral ring, a wavy mint star and a plum core",
        (
            Layer("star8", "navy", pattern="dotted", color2="gold", period=0.3),
            Layer("ring", "coral", (0.62, 0.62), pattern="checkered", color2="cream", period=0.2),
            Layer("star", "mint", (0.42, 0.42), rotation=18.0, pattern="wavy", color2="teal", period=0.2),
            Layer("circle", "plum", (0.12, 0.12)),
        ),
    ),
    Subject(
        "kaleidoscope_ring",
        "ring",
        "a ring of twelve alternating salmon and slate sectors, an inner lime grid band and magenta beads",
        (
            Layer("ring", "salmon", (1.05, 1.05), pattern="sectors", color2="slate", period=12),
            Layer("ring", "lime", (0.55, 0.55), pattern="grid", color2="olive", period=0.12),
        )
        + tuple(
            Layer(
                "circle",
                "magenta",
                (0.08, 0.08),
                (0.74 * math.sin(a), 0.74 * math.cos(a)),
                pattern="rings",
                color2="cream",
                period=0.04,
            )
            for a in np.arange(4) * math.pi / 2 + math.pi / 4
        ),
    ),
)

# Ordered from simplest to most intricate.
SUBJECTS: tuple[Subject, ...] = tuple(sorted(_SUBJECTS, key=lambda s: (s.complexity, s.name)))

# 25 prompts valid in the world: 14 recontextualisations (backgrounds), 11 property changes.
PROMPTS: tuple[str, ...] = (
    "a {0} {1} on the beach",
    "a {0} {1} in the snow",
    "a {0} {1} on the grass",
    "a {0} {1} on a wooden floor",
    "a {0} {1} in front of a brick wall",
    "a {0} {1} at night",
    "a {0} {1} on the water",
    "a {0} {1} at sunset",
    "a {0} {1} on a blue background",
    "a {0} {1} on a yellow background",
    "a {0} {1} on a black background",
    "a {0} {1} on a white background",
    "a {0} {1} on a green background",
    "a {0} {1} on a pink background",
    "a red {0} {1}",
    "a purple {0} {1}",
    "a striped {0} {1}",
    "a small {0} {1}",
    "a large {0} {1}",
    "a {0} {1} on the left",
    "a {0} {1} on the right",
    "a {0} {1} at the top",
    "a {0} {1} at the bottom",
    "a small {0} {1} at the bottom on the beach",
    "a large {0} {1} on the left on the grass",
)

# Backgrounds of the instance images (the prompts' backgrounds stay unseen for most subjects).
INSTANCE_BACKGROUNDS: tuple[str, ...] = (
    "white background",
    "gray background",
    "cyan background",
    "orange background",
    "brown background",
    "wood",
    "brick",
)


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def _primitive_sdf(shape: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if shape.startswith("star") and shape[4:].isdigit():
        n = int(shape[4:])
        return g.sdf_star(x, y, n=n, m=min(n, 3.0), r=1.0)
    if shape.startswith("poly") and shape[4:].isdigit():
        return g.sdf_star(x, y, n=int(shape[4:]), m=2.0, r=1.0)
    return g.sdf_shape(shape, x, y)


def _layer_frame(x: torch.Tensor, y: torch.Tensor, layer: Layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Subject coordinates -> layer coordinates: q = diag(1/scale) R(-rotation) (p - offset)."""
    theta = math.radians(layer.rotation)
    dx, dy = x - layer.offset[0], y - layer.offset[1]
    qx = math.cos(theta) * dx + math.sin(theta) * dy
    qy = -math.sin(theta) * dx + math.cos(theta) * dy
    return qx / layer.scale[0], qy / layer.scale[1]


def glyph_bitmap(text: str) -> torch.Tensor:
    """0/1 bitmap (7 × (4·len(text) + 1)) of ``text``: each character a 5×3 glyph made of the low 15 bits of its
    CRC-32 (an invented script: deterministic, and no font file), glyphs one blank column apart, a blank margin of
    one cell round the line."""
    cells = [torch.zeros(GLYPH_ROWS, 1)]
    for char in text:
        bits = zlib.crc32(char.encode("utf-8"))
        glyph = torch.tensor([(bits >> i) & 1 for i in range(GLYPH_ROWS * GLYPH_COLUMNS)], dtype=torch.float32)
        cells += [glyph.view(GLYPH_ROWS, GLYPH_COLUMNS), torch.zeros(GLYPH_ROWS, 1)]
    return F.pad(torch.cat(cells, dim=1), (0, 0, 1, 1))  # 7 × (4·len(text) + 1)


def _glyph_weight(text: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Ink weight (0/1) of ``text`` stretched over the layer square [-1, 1]² (y up), as blocks of whole cells."""
    if not text:
        raise ValueError("the glyphs pattern needs a layer text, got an empty one")
    bitmap = glyph_bitmap(text)  # R×C
    grid = torch.stack([x, -y], dim=-1)  # 1×H×W×2, grid_sample's (column, row) in [-1, 1]
    value = F.grid_sample(bitmap[None, None], grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return value[:, 0]  # 1×H×W


def _subject_pattern(layer: Layer, x: torch.Tensor, y: torch.Tensor, px: torch.Tensor):
    pattern, period = layer.pattern, layer.period
    if pattern in g.PATTERNS:
        return g.pattern_weight(pattern, x, y, px, period)
    if pattern == "glyphs":
        return _glyph_weight(layer.text, x, y)
    rho = torch.sqrt(x * x + y * y)
    if pattern == "rings":
        k = 2 * math.pi / period
        return g.soft_step(torch.sin(k * rho), k * px)
    if pattern == "sectors":  # period = number of sectors
        s = torch.sin(period / 2 * torch.atan2(y, x))
        return g.soft_step(s, period / 2 * px / rho.clamp(min=1e-3))
    if pattern == "bands":
        k = 2 * math.pi / period
        return g.soft_step(torch.sin(k * (x + y) / math.sqrt(2)), k * px)
    if pattern == "grid":
        fx = (x / period - torch.round(x / period)).abs()
        fy = (y / period - torch.round(y / period)).abs()
        return g.soft_step(0.12 - torch.minimum(fx, fy) * 1.0, px / period)
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {g.PATTERNS + SUBJECT_PATTERNS}")


def render_subject(
    subject: Subject,
    size: int,
    x: float = 0.5,
    y: float = 0.5,
    radius: float = 0.35,
    rotation: float = 0.0,
    background: str = "white background",
    bg_shift: float = 0.0,
) -> Image.Image:
    """Render ``subject`` centred at (x, y) (image fractions), of ``radius``, rotated, on a world background."""
    u, v = g.pixel_grid(1, size)  # 1 x H x W
    f = torch.float32
    image = g.render_background(background, u, v, torch.tensor([bg_shift], dtype=f))  # 1 x H x W x 3
    sx, sy = g.shape_frame(u, v, *(torch.tensor([a], dtype=f) for a in (x, y, radius, rotation)))
    px = 1.0 / (radius * size)
    for layer in subject.layers:
        lx, ly = _layer_frame(sx, sy, layer)  # 1 x H x W each
        scale = min(layer.scale)
        sdf = _primitive_sdf(layer.shape, lx, ly) * scale
        alpha = g.coverage(sdf, torch.tensor(px))
        layer_px = torch.tensor(px / scale)
        if layer.pattern == "solid":
            surface = torch.tensor(_c(layer.color)).expand(*alpha.shape, 3)
        else:
            weight = _subject_pattern(layer, lx, ly, layer_px)
            surface = g.mix(torch.tensor(_c(layer.color)), torch.tensor(_c(layer.color2 or layer.color)), weight)
        image = g.mix(image, surface, alpha)
    return Image.fromarray((image[0] * 255.0 + 0.5).clamp(0, 255).to(torch.uint8).numpy(), mode="RGB")


def png_bits_per_pixel(subject: Subject, size: int = 128, rotations: tuple[float, ...] = (0.0,)) -> float:
    """Measured complexity: PNG-compressed bits per pixel of the canonical render on white, averaged over renders
    turned by ``rotations`` (degrees; upright only by default)."""
    bits = 0.0
    for rotation in rotations:
        buffer = io.BytesIO()
        render_subject(subject, size, rotation=rotation).save(buffer, format="PNG", optimize=True)
        bits += 8.0 * len(buffer.getvalue()) / (size * size)
    return bits / len(rotations)


def instance_views(subject_index: int, count: int) -> list[dict]:
    """Deterministic varied views (rotation, scale, position, background) of one subject."""
    rng = np.random.default_rng([subject_index, 7])
    backgrounds = rng.permutation(len(INSTANCE_BACKGROUNDS))
    views = []
    for i in range(count):
        radius = float(rng.uniform(0.26, 0.4))
        margin = radius + 0.03
        views.append(
            {
                "x": float(rng.uniform(margin, 1 - margin)),
                "y": float(rng.uniform(margin, 1 - margin)),
                "radius": radius,
                "rotation": float(rng.uniform(-35.0, 35.0)),
                "background": INSTANCE_BACKGROUNDS[backgrounds[i % len(backgrounds)]],
                "bg_shift": float(rng.random()),
            }
        )
    return views


def num_instances(subject_index: int) -> int:
    """Instance images per subject: 4, 5 or 6 (cycling), as in the DreamBooth dataset."""
    return 4 + subject_index % 3


def prompts_and_classes_text(subjects: tuple[Subject, ...] = SUBJECTS) -> str:
    """prompts_and_classes.txt in the DreamBooth dataset's section structure."""
    prompt_lines = ",\n".join(f"'{p}'.format(unique_token, class_token)" for p in PROMPTS)
    prompt_block = f"prompt_list = [\n{prompt_lines}\n]\n"
    table = "\n".join(f"{s.name},{s.class_name}" for s in subjects)
    return (
        f"Classes\n\nsubject_name,class\n{table}\n\nPrompts\n\nObject Prompts\n\n{prompt_block}\n"
        f"Live Subject Prompts\n\n{prompt_block}"
    )


def _write_subject(
    root: Path, index: int, subject: Subject, size: int, quality: int, png_rotations: tuple[float, ...]
) -> dict:
    """Write one subject folder; returns its subjects.json record."""
    folder = root / subject.name
    folder.mkdir(exist_ok=True)
    views = instance_views(index, num_instances(index))
    for i, view in enumerate(views):
        render_subject(subject, size, **view).save(folder / f"{i:02d}.jpg", quality=quality)
    record = {
        "name": subject.name,
        "class": subject.class_name,
        "description": subject.description,
        "complexity": subject.complexity,
        "png_bits_per_pixel": round(png_bits_per_pixel(subject, rotations=png_rotations), 4),
        "num_layers": len(subject.layers),
        "colors": sorted(subject.colors),
        "num_images": len(views),
        "views": views,
    }
    return record | ({"level": subject.level} if subject.level else {})


def write_subjects(
    root: Path,
    size: int = 128,
    quality: int = 95,
    subjects: tuple[Subject, ...] = SUBJECTS,
    version: str = DATASET_VERSION,
    png_rotations: tuple[float, ...] = (0.0,),
) -> Path:
    """Write the subject dataset to ``root`` (created) and return ``root``.

    Args:
        root: output folder: ``<subject>/00.jpg ...``, ``prompts_and_classes.txt``, ``subjects.json``.
        size: image side in pixels (training code resizes, as for the DreamBooth photographs).
        quality: JPEG quality.
        subjects: the subject set (the first world's ``SUBJECTS``, or ``lora2.world.world2.SUBJECTS``).
        version: the set's dataset version, recorded in ``subjects.json``.
        png_rotations: rotations (degrees) whose renders' PNG bits per pixel are averaged as the measured
            complexity (``png_bits_per_pixel``).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size (--size) must be a positive number of pixels, got {size!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must lie in [1, 100], got {quality!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    records = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small images: intra-op threads only add synchronisation
    try:
        for index, subject in enumerate(subjects):
            records.append(_write_subject(root, index, subject, size, quality, png_rotations))
    finally:
        torch.set_num_threads(threads)
    (root / "prompts_and_classes.txt").write_text(prompts_and_classes_text(subjects))
    meta = {
        "version": version,
        "image_size": size,
        "complexity": "n_layers + n_patterned_layers + (n_colours - 1)",
        "subjects": records,
    }
    (root / "subjects.json").write_text(json.dumps(meta, indent=2))
    logger.info("%d subjects -> %s", len(subjects), root)
    return root
