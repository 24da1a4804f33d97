"""The procedural world: seeded, captioned images of coloured, patterned shapes on named backgrounds.

A scene is one shape (``SHAPES``) of one named colour (``COLORS``) with one surface pattern (``PATTERNS``), of one
size (``SIZES``) at one position (``POSITIONS``) on one background (``BACKGROUNDS``: plain named colours or simple
scenes). Continuous nuisances (exact centre, radius, rotation) are sampled inside the ranges the names stand for, so
a caption never contradicts its image.

Shapes are drawn from signed distance functions (SDFs, in units of the shape radius) evaluated on whole batches of
images at once with torch, antialiased by the pixel footprint: alpha = clamp(0.5 - sdf · radius_px, 0, 1).

Every word any caption or subject prompt of the world can contain is derived from the tables below
(``world_words``), which the tokenizer (``lora2.world.tokenizer``) turns into single tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

GENERATOR_VERSION = "1"

SHAPES: tuple[str, ...] = (
    "star",
    "circle",
    "square",
    "triangle",
    "heart",
    "cross",
    "ring",
    "diamond",
    "hexagon",
    "moon",
)

# Named colours: name -> sRGB in [0, 1].
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.10, 0.10),
    "orange": (0.98, 0.55, 0.05),
    "yellow": (0.98, 0.88, 0.12),
    "green": (0.12, 0.68, 0.20),
    "cyan": (0.10, 0.80, 0.85),
    "blue": (0.12, 0.25, 0.90),
    "purple": (0.55, 0.18, 0.75),
    "pink": (0.98, 0.50, 0.72),
    "brown": (0.50, 0.30, 0.12),
    "white": (0.97, 0.97, 0.97),
    "gray": (0.50, 0.50, 0.50),
    "black": (0.06, 0.06, 0.06),
}

PATTERNS: tuple[str, ...] = ("solid", "striped", "dotted", "checkered", "wavy")

# Size name -> range of the shape radius as a fraction of the image side.
SIZES: dict[str, tuple[float, float]] = {"small": (0.13, 0.18), "large": (0.27, 0.33)}

# Position name -> caption phrase.
POSITIONS: dict[str, str] = {
    "center": "in the center",
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}

# Scene backgrounds: name -> caption phrase. Plain colour backgrounds are "<color> background".
SCENES: dict[str, str] = {
    "beach": "on the beach",
    "snow": "in the snow",
    "grass": "on the grass",
    "wood": "on a wooden floor",
    "brick": "in front of a brick wall",
    "night": "at night",
    "water": "on the water",
    "sunset": "at sunset",
}
BACKGROUND_COLORS: tuple[str, ...] = tuple(COLORS)
BACKGROUNDS: tuple[str, ...] = tuple(f"{c} background" for c in BACKGROUND_COLORS) + tuple(SCENES)

# (shape, color) pairs never shown in pretraining (``sample_scene(..., held_out="exclude")``), for testing
# compositional generalisation: every shape and every colour still appears with other partners. Ten distinct
# colours, none of them red or purple, the colours the subject prompts recolour subjects with.
HELD_OUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {
        ("star", "green"),
        ("circle", "gray"),
        ("square", "orange"),
        ("triangle", "blue"),
        ("heart", "cyan"),
        ("cross", "yellow"),
        ("ring", "black"),
        ("diamond", "pink"),
        ("hexagon", "brown"),
        ("moon", "white"),
    }
)

# Extra words used by captions and subject prompts.
FUNCTION_WORDS: tuple[str, ...] = ("a", "an", "photo", "of", "the", "background", "with", "and", "picture")


def world_words() -> list[str]:
    """Every word any caption or prompt of the world can contain (sorted, unique)."""
    words = set(SHAPES) | set(COLORS) | set(PATTERNS) | set(SIZES) | set(FUNCTION_WORDS)
    for phrase in (*POSITIONS.values(), *SCENES.values(), *BACKGROUNDS):
        words.update(phrase.split())
    return sorted(words)


@dataclass(frozen=True)
class Scene:
    """One world image: named attributes plus the continuous nuisances sampled inside them.

    ``x``, ``y`` are the shape centre and ``radius`` its radius, as fractions of the image side (y downwards);
    ``rotation`` is in degrees (counter-clockwise); ``bg_shift`` in [0, 1) varies horizon heights and textures of
    scene backgrounds.
    """

    shape: str
    color: str
    pattern: str
    background: str
    size: str
    position: str
    x: float
    y: float
    radius: float
    rotation: float
    bg_shift: float = 0.0

    def __post_init__(self) -> None:
        for value, table, name in (
            (self.shape, SHAPES, "shape"),
            (self.color, COLORS, "color"),
            (self.pattern, PATTERNS, "pattern"),
            (self.background, BACKGROUNDS, "background"),
            (self.size, SIZES, "size"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in table:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(table)}")

    def to_dict(self) -> dict:
        """Plain dict (JSON-serialisable)."""
        return asdict(self)


def place(size: str, position: str, rng: np.random.Generator) -> tuple[float, float, float]:
    """Sample (x, y, radius) for a named size and position, keeping the shape inside the image."""
    lo, hi = SIZES[size]
    radius = float(rng.uniform(lo, hi))
    margin = float(rng.uniform(0.02, 0.06))
    jitter = rng.uniform(-0.05, 0.05, size=2)
    near, far = radius + margin, 1.0 - radius - margin
    x, y = 0.5 + jitter[0], 0.5 + jitter[1]
    if position == "left":
        x = near
    elif position == "right":
        x = far
    elif position == "top":
        y = near
    elif position == "bottom":
        y = far
    elif position == "center":
        x, y = 0.5 + 0.6 * jitter[0], 0.5 + 0.6 * jitter[1]
    return float(x), float(y), radius


def sample_scene(rng: np.random.Generator, held_out: str = "exclude", max_rotation: float = 15.0) -> Scene:
    """Sample one scene with uniform attributes.

    Args:
        rng: numpy random generator (the only source of randomness).
        held_out: "exclude" never returns a (shape, color) pair of ``HELD_OUT_PAIRS`` (pretraining), "only" returns
            only those pairs (compositional test), "include" ignores the split.
        max_rotation: rotation is uniform in [-max_rotation, max_rotation] degrees.
    """
    if held_out not in ("exclude", "only", "include"):
        raise ValueError(f"held_out must be 'exclude', 'only' or 'include', got {held_out!r}")
    colors = list(COLORS)
    while True:
        shape = SHAPES[rng.integers(len(SHAPES))]
        color = colors[rng.integers(len(colors))]
        pair_held = (shape, color) in HELD_OUT_PAIRS
        if (held_out == "exclude" and pair_held) or (held_out == "only" and not pair_held):
            continue
        background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
        if background == f"{color} background":
            continue
        break
    pattern = PATTERNS[rng.integers(len(PATTERNS))]
    size = tuple(SIZES)[rng.integers(len(SIZES))]
    position = tuple(POSITIONS)[rng.integers(len(POSITIONS))]
    x, y, radius = place(size, position, rng)
    rotation = float(rng.uniform(-max_rotation, max_rotation))
    return Scene(shape, color, pattern, background, size, position, x, y, radius, rotation, float(rng.random()))


def background_phrase(background: str) -> str:
    """Caption phrase of a background: "on a blue background", "on the beach", ..."""
    return SCENES.get(background, f"on {_article(background)} {background}")


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: np.random.Generator | None = None, drop_prob: float = 0.25) -> str:
    """Plain English caption of ``scene``; "solid" is never written (it is the default surface).

    Without ``rng`` the caption is canonical and complete:
    "a photo of a small red striped star on the left on a blue background".
    With ``rng``, the prefix varies ("a photo of", "a picture of", none) and each of size, pattern, position and
    background is dropped with probability ``drop_prob`` (colour with ``drop_prob / 2``), so short prompts such as
    "a red star on the beach" are in distribution; nothing written ever contradicts the image.
    """

    def keep(p: float = drop_prob) -> bool:
        return rng is None or rng.random() >= p

    prefix = "a photo of" if rng is None else ("a photo of", "a picture of", "")[rng.integers(3)]
    adjectives = []
    if keep():
        adjectives.append(scene.size)
    if keep(drop_prob / 2):
        adjectives.append(scene.color)
    if scene.pattern != "solid" and keep():
        adjectives.append(scene.pattern)
    noun = " ".join([*adjectives, scene.shape])
    words = [prefix, _article(noun), noun]
    if keep():
        words.append(POSITIONS[scene.position])
    if keep():
        words.append(background_phrase(scene.background))
    return " ".join(w for w in words if w)


def caption_attributes(text: str) -> dict[str, str]:
    """The attribute values a caption or prompt names: keys among shape, color, pattern, size, position, background.

    The inverse of ``caption`` (prompt words outside the world are ignored), for attribute-accuracy checks.
    """
    text = " ".join(text.lower().split())
    words = text.split()
    found: dict[str, str] = {}
    for key, table in (("shape", SHAPES), ("pattern", PATTERNS), ("size", SIZES)):
        for word in words:
            if word in table:
                found[key] = word
    for name, phrase in POSITIONS.items():
        if phrase in text:
            found["position"] = name
    for name in BACKGROUNDS:
        if background_phrase(name) in text:
            found["background"] = name
    for i, word in enumerate(words):
        if word in COLORS and words[i + 1 : i + 2] != ["background"]:
            found["color"] = word
            break
    return found


# ----------------------------------------------------------------------------------------------------------------
# Signed distance functions, in units of the shape radius (negative inside). x, y: (...) tensors, y upwards.
# Formulas after Inigo Quilez, "2D distance functions".


def _length(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(x * x + y * y)


def sdf_circle(x: torch.Tensor, y: torch.Tensor, r: float = 1.0) -> torch.Tensor:
    """Circle: |p| - r."""
    return _length(x, y) - r


def sdf_box(x: torch.Tensor, y: torch.Tensor, bx: float, by: float) -> torch.Tensor:
    """Axis-aligned box of half sizes (bx, by): |max(q, 0)| + min(max(qx, qy), 0), q = |p| - b."""
    qx, qy = x.abs() - bx, y.abs() - by
    return _length(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)


def sdf_star(x: torch.Tensor, y: torch.Tensor, n: int = 5, m: float = 2.0, r: float = 1.0) -> torch.Tensor:
    """Regular n-pointed star of tip radius r (m = 2: regular n-gon; larger m: sharper, m <= n), tip upwards."""
    an, en = math.pi / n, math.pi / m
    acs = (math.cos(an), math.sin(an))
    ecs = (math.cos(en), math.sin(en))
    x = x.abs()
    bn = torch.remainder(torch.atan2(x, y), 2 * an) - an  # angle inside the first sector
    rho = _length(x, y)
    px, py = rho * torch.cos(bn) - r * acs[0], rho * torch.sin(bn).abs() - r * acs[1]
    t = (-(px * ecs[0] + py * ecs[1])).clamp(0.0, r * acs[1] / ecs[1])
    px, py = px + ecs[0] * t, py + ecs[1] * t
    return _length(px, py) * torch.sign(px)


def sdf_heart(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Heart of half-height about 1, centred."""
    scale = 0.68
    qx, qy = x.abs() * scale, y * scale + 0.55
    upper = _length(qx - 0.25, qy - 0.75) - math.sqrt(2.0) / 4.0
    h = (qx + qy).clamp(min=0) * 0.5
    lower = torch.sqrt(torch.minimum(qx**2 + (qy - 1.0) ** 2, (qx - h) ** 2 + (qy - h) ** 2)) * torch.sign(qx - qy)
    return torch.where(qx + qy > 1.0, upper, lower) / scale


def sdf_rhombus(x: torch.Tensor, y: torch.Tensor, bx: float = 0.72, by: float = 1.0) -> torch.Tensor:
    """Rhombus of half diagonals (bx, by)."""
    x, y = x.abs(), y.abs()
    h = ((bx * (bx - 2 * x) - by * (by - 2 * y)) / (bx * bx + by * by)).clamp(-1.0, 1.0)
    d = _length(x - 0.5 * bx * (1.0 - h), y - 0.5 * by * (1.0 + h))
    return d * torch.sign(x * by + y * bx - bx * by)


def sdf_shape(shape: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SDF of a world shape class; every shape fits in the unit disc, whatever its rotation."""
    if shape == "star":
        return sdf_star(x, y, n=5, m=2.8, r=1.0)
    if shape == "circle":
        return sdf_circle(x, y, 0.9)
    if shape == "square":
        return sdf_box(x, y, 0.7, 0.7)
    if shape == "triangle":
        return sdf_star(x, y + 0.22, n=3, m=2.0, r=0.87)  # bounding box centred
    if shape == "heart":
        return sdf_heart(x, y)
    if shape == "cross":
        return torch.minimum(sdf_box(x, y, 0.95, 0.3), sdf_box(x, y, 0.3, 0.95))
    if shape == "ring":
        return (_length(x, y) - 0.7).abs() - 0.27
    if shape == "diamond":
        return sdf_rhombus(x, y, 0.68, 1.0)
    if shape == "hexagon":
        return sdf_star(x, y, n=6, m=2.0, r=0.95)
    if shape == "moon":
        return torch.maximum(sdf_circle(x, y, 0.95), -sdf_circle(x - 0.45, y - 0.3, 0.78))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


# ----------------------------------------------------------------------------------------------------------------
# Patterns: mixing weight t in [0, 1] of the secondary colour, antialiased by the pixel size `px` (shape units).


def soft_step(s: torch.Tensor, width: torch.Tensor | float) -> torch.Tensor:
    """Antialiased step over one pixel: 0 below s = -width / 2, 1 above width / 2 (width: a pixel in s units)."""
    return (0.5 + s / width).clamp(0.0, 1.0)


def pattern_weight(pattern: str, x: torch.Tensor, y: torch.Tensor, px: torch.Tensor, period: float = 0.66):
    """Secondary-colour weight of a surface pattern in shape coordinates; ``period`` is the pattern period."""
    k = 2 * math.pi / period
    if pattern == "solid":
        return torch.zeros_like(x)
    if pattern == "striped":
        return soft_step(torch.sin(k * y), k * px)
    if pattern == "wavy":
        return soft_step(torch.sin(k * (y + 0.12 * torch.sin(1.2 * k * x))), 1.3 * k * px)
    if pattern == "checkered":
        return soft_step(torch.sin(k / 2 * x) * torch.sin(k / 2 * y), k / 2 * px)
    if pattern == "dotted":
        fx = x / period - torch.round(x / period)
        fy = y / period - torch.round(y / period)
        d = _length(fx, fy) * period - 0.14 * period / 0.5
        return soft_step(-d, px)
    raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")


def shade(rgb: tuple[float, float, float]) -> tuple[float, float, float]:
    """Secondary colour of a pattern: darker for light colours, lighter for dark ones."""
    luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    if luma > 0.35:
        return tuple(0.45 * c for c in rgb)
    return tuple(c + 0.55 * (1.0 - c) for c in rgb)


# ----------------------------------------------------------------------------------------------------------------
# Backgrounds: (n, H, W, 3) in [0, 1] from image coordinates u, v in [0, 1] (v downwards).


def _rgb(c: tuple[float, float, float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(c, dtype=like.dtype, device=like.device)


def mix(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """a (1 - t) + b t with t: (...) and colours broadcast over a last dim of 3."""
    t = t.unsqueeze(-1)  # ... x 1
    shape = torch.broadcast_shapes(a.shape, b.shape, t.shape)
    return torch.lerp(a.expand(shape), b.expand(shape), t)


def _hash(i: torch.Tensor, j: torch.Tensor, salt: torch.Tensor) -> torch.Tensor:
    """Deterministic pseudo-random value in [0, 1) per integer cell (i, j)."""
    h = torch.sin(i * 12.9898 + j * 78.233 + salt * 37.719) * 43758.5453
    return h - torch.floor(h)


def render_background(name: str, u: torch.Tensor, v: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Background image (n, H, W, 3) for n images sharing background ``name``; ``shift``: (n,) in [0, 1)."""
    s = shift.view(-1, 1, 1)  # n x 1 x 1
    ones = torch.ones_like(u)  # n x H x W
    if name.endswith(" background"):
        return ones.unsqueeze(-1) * _rgb(COLORS[name.removesuffix(" background")], u)
    px = 1.0 / u.shape[-1]
    if name == "beach":
        horizon, shore = 0.36 + 0.1 * s, 0.52 + 0.1 * s + 0.015 * torch.sin(14 * u + 6 * s)
        img = mix(_rgb((0.55, 0.80, 0.98), u), _rgb((0.10, 0.45, 0.80), u), soft_step(v - horizon, px))
        return mix(img, _rgb((0.93, 0.82, 0.55), u), soft_step(v - shore, px))
    if name == "snow":
        ground = 0.5 + 0.12 * s + 0.03 * torch.sin(9 * u + 5 * s)
        img = mix(_rgb((0.70, 0.76, 0.86), u), _rgb((0.97, 0.97, 1.0), u), soft_step(v - ground, px))
        cells = 9.0
        ci, cj = torch.floor(u * cells), torch.floor(v * cells)
        fu, fv = u * cells - ci - 0.5, v * cells - cj - 0.5
        flake = soft_step(0.13 - _length(fu, fv), cells * px) * (_hash(ci, cj, s) > 0.45)
        return mix(img, _rgb((1.0, 1.0, 1.0), u), flake)
    if name == "grass":
        ground = 0.42 + 0.12 * s
        blades = 0.5 + 0.5 * torch.sin(90 * u + 3 * torch.sin(20 * v))
        grass = mix(_rgb((0.22, 0.62, 0.16), u), _rgb((0.13, 0.45, 0.10), u), blades * 0.8)
        return mix(ones.unsqueeze(-1) * _rgb((0.52, 0.76, 0.98), u), grass, soft_step(v - ground, px))
    if name == "wood":
        plank = torch.remainder(v * 5 + s, 1.0)
        grain = 0.5 + 0.5 * torch.sin(40 * u + 4 * torch.sin(7 * v + 9 * s))
        img = mix(_rgb((0.66, 0.45, 0.24), u), _rgb((0.55, 0.36, 0.18), u), grain * 0.7)
        return mix(img, _rgb((0.30, 0.18, 0.08), u), soft_step(0.05 - (plank - 0.5).abs() * 2, 5 * px))
    if name == "brick":
        rows = 8.0
        row = torch.floor(v * rows + s)
        fv = v * rows + s - row
        fu = torch.remainder(u * 4 + 0.5 * torch.remainder(row, 2), 1.0)
        mortar = torch.maximum(soft_step((fv - 0.5).abs() * 2 - 0.86, rows * px), soft_step(0.06 - fu, 4 * px))
        mortar = torch.maximum(mortar, soft_step(fu - 0.94, 4 * px))
        return mix(ones.unsqueeze(-1) * _rgb((0.66, 0.24, 0.16), u), _rgb((0.85, 0.82, 0.76), u), mortar)
    if name == "night":
        cells = 12.0
        ci, cj = torch.floor(u * cells), torch.floor(v * cells)
        fu, fv = u * cells - ci - 0.5, v * cells - cj - 0.5
        lit = soft_step(0.09 - _length(fu, fv), cells * px) * (_hash(ci, cj, s) > 0.6)
        sky = mix(_rgb((0.02, 0.03, 0.14), u), _rgb((0.08, 0.10, 0.30), u), v)
        return mix(sky, _rgb((1.0, 1.0, 0.85), u), lit)
    if name == "water":
        waves = torch.sin(30 * v + 2.5 * torch.sin(12 * u + 6 * s) + 6 * s)
        return mix(
            ones.unsqueeze(-1) * _rgb((0.10, 0.35, 0.72), u), _rgb((0.45, 0.70, 0.95), u), soft_step(waves - 0.75, 0.2)
        )
    if name == "sunset":
        sky = mix(_rgb((0.98, 0.72, 0.25), u), _rgb((0.55, 0.15, 0.45), u), v)
        sun = soft_step(0.12 - _length(u - 0.2 - 0.6 * s, v - 0.62), px)
        img = mix(sky, _rgb((1.0, 0.93, 0.55), u), sun)
        return mix(img, _rgb((0.18, 0.06, 0.16), u), soft_step(v - 0.8, px))
    raise ValueError(f"unknown background {name!r}; expected one of {BACKGROUNDS}")


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def pixel_grid(n: int, size: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates (u, v) in [0, 1], each (n, size, size); v runs downwards."""
    c = (torch.arange(size, dtype=torch.float32, device=device) + 0.5) / size
    v, u = torch.meshgrid(c, c, indexing="ij")
    return u.expand(n, size, size), v.expand(n, size, size)


def shape_frame(
    u: torch.Tensor, v: torch.Tensor, x: torch.Tensor, y: torch.Tensor, radius: torch.Tensor, rotation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Image coordinates -> shape coordinates (radius units, y upwards, rotated by -rotation degrees).

    u, v: (n, H, W); x, y, radius, rotation: (n,).
    """
    theta = torch.deg2rad(rotation).view(-1, 1, 1)
    dx = (u - x.view(-1, 1, 1)) / radius.view(-1, 1, 1)  # n x H x W
    dy = -(v - y.view(-1, 1, 1)) / radius.view(-1, 1, 1)  # n x H x W
    cos, sin = torch.cos(theta), torch.sin(theta)
    return cos * dx + sin * dy, -sin * dx + cos * dy


def coverage(sdf: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
    """Antialiased coverage of a shape: clamp(0.5 - sdf / px, 0, 1), px the pixel size in shape units."""
    return (0.5 - sdf / px).clamp(0.0, 1.0)


def render_batch(scenes: list[Scene], size: int = 64, device: torch.device | str = "cpu") -> torch.Tensor:
    """Render scenes into a uint8 tensor (n, size, size, 3); vectorised over images of equal attributes."""
    n = len(scenes)
    u, v = pixel_grid(n, size, device)  # n x H x W
    f = torch.float32

    def column(attr: str) -> torch.Tensor:
        return torch.tensor([getattr(s, attr) for s in scenes], dtype=f, device=device)

    radius = column("radius")
    x, y = shape_frame(u, v, column("x"), column("y"), radius, column("rotation"))  # n x H x W each
    px = (1.0 / (radius * size)).view(-1, 1, 1)  # pixel size in shape units, n x 1 x 1
    image = torch.empty(n, size, size, 3, dtype=f, device=device)
    shift = column("bg_shift")
    for name in sorted({s.background for s in scenes}):
        idx = torch.tensor([i for i, s in enumerate(scenes) if s.background == name], device=device)
        image[idx] = render_background(name, u[idx], v[idx], shift[idx])
    alpha = torch.empty(n, size, size, dtype=f, device=device)
    for name in sorted({s.shape for s in scenes}):
        idx = torch.tensor([i for i, s in enumerate(scenes) if s.shape == name], device=device)
        alpha[idx] = coverage(sdf_shape(name, x[idx], y[idx]), px[idx])
    weight = torch.empty_like(alpha)
    for name in sorted({s.pattern for s in scenes}):
        idx = torch.tensor([i for i, s in enumerate(scenes) if s.pattern == name], device=device)
        weight[idx] = pattern_weight(name, x[idx], y[idx], px[idx])
    primary = torch.tensor([COLORS[s.color] for s in scenes], dtype=f, device=device).view(n, 1, 1, 3)
    secondary = torch.tensor([shade(COLORS[s.color]) for s in scenes], dtype=f, device=device).view(n, 1, 1, 3)
    surface = mix(primary, secondary, weight)  # n x H x W x 3
    image = mix(image, surface, alpha)
    return (image * 255.0 + 0.5).clamp(0, 255).to(torch.uint8)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Render one scene as an RGB PIL image of ``size`` x ``size``."""
    return Image.fromarray(render_batch([scene], size)[0].numpy(), mode="RGB")


def sample_scenes(n: int, seed: int, held_out: str = "exclude") -> list[Scene]:
    """``n`` scenes from ``numpy.random.default_rng(seed)`` (see ``sample_scene``)."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, held_out) for _ in range(n)]


def sample_batch(
    n: int,
    seed: int,
    size: int = 64,
    held_out: str = "exclude",
    varied_captions: bool = False,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, list[str], list[Scene]]:
    """A deterministic batch of world images with captions.

    Args:
        n: number of images.
        seed: same seed, same bytes (scenes, captions and pixels).
        size: image side in pixels.
        held_out: "exclude" (pretraining), "only" (held-out pairs) or "include"; see ``HELD_OUT_PAIRS``.
        varied_captions: canonical captions if False, else captions with random prefix and dropped attributes
            (``caption(scene, rng)``), drawn from a generator seeded by ``seed`` independent of the scenes.
        device: torch device used for rendering (a GPU renders large batches much faster).

    Returns:
        (uint8 array n x size x size x 3, captions, scenes).
    """
    scenes = sample_scenes(n, seed, held_out)
    caption_rng = np.random.default_rng([seed, 1]) if varied_captions else None
    captions = [caption(s, caption_rng) for s in scenes]
    images = render_batch(scenes, size, device).cpu().numpy()
    return images, captions, scenes


def write_samples(out: Path, n: int = 64, seed: int = 0, size: int = 64, held_out: str = "exclude") -> Path:
    """Write ``n`` world images as one grid (``out/grid.png``, row-major) with ``out/captions.txt`` (one a line)."""
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    if size < 1:
        raise ValueError(f"size (--size) must be a positive number of pixels, got {size}")
    images, captions, _ = sample_batch(n, seed, size, held_out)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, size, size, 3), dtype=np.uint8)
    grid[:n] = images
    grid = grid.reshape(rows, cols, size, size, 3).transpose(0, 2, 1, 3, 4).reshape(rows * size, cols * size, 3)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(out / "grid.png")
    (out / "captions.txt").write_text("\n".join(captions) + "\n")
    return out
