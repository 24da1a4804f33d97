"""Run outputs besides the adapter files (which each adapter backend writes): the model card, the per-layer rank
heatmap and the sample grid. Figures are drawn with matplotlib's object API (no pyplot, no global backend switch)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from matplotlib import font_manager
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from lora2.export.formats import tool_table
from lora2.train.atomic import atomic_write_text, temporary_name

logger = logging.getLogger(__name__)


def write_model_card(
    path: Path,
    base_model: str,
    instance_prompt: str,
    ranks: dict[str, int],
    settings: dict,
    kind: str,
    backend,
    files: dict[str, str],
    sample_grid: str | None = None,
) -> None:
    """README.md in the style of diffusers' DreamBooth LoRA cards (YAML front matter + usage); ``backend`` is the
    run's adapter backend class (its name, label and one-sentence description); ``files`` maps each written export
    format to its name in the folder (the "which file for which tool" table)."""
    total = sum(ranks.values())
    method, label = backend.name, backend.label
    tags = ["text-to-image", "diffusers", "lora", method, "dreambooth", "template:sd-lora"]
    tags.append("stable-diffusion-xl" if kind == "sdxl" else "stable-diffusion")
    pipeline = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: diffusers",
        "tags:",
        *[f"- {tag}" for tag in tags],
        f"instance_prompt: {instance_prompt}",
        "---",
        "",
        f"# {label} DreamBooth adapter",
        "",
        f"Adapter for `{base_model}` trained by `lora2 train` with {backend.card_description}",
        f"Trigger it with the instance prompt **{instance_prompt}**.",
        "",
        "## Use",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        "",
        f'pipe = {pipeline}.from_pretrained("{base_model}")',
        'pipe.load_lora_weights("path/to/this/folder")',
        f'image = pipe("{instance_prompt}", generator=torch.Generator().manual_seed(0)).images[0]',
        "```",
        "",
        "## Which file for which tool",
        "",
        *tool_table(files),
        "",
        "## Ranks",
        "",
        f"{len(ranks)} adapted modules, total rank {total}, mean rank {total / max(len(ranks), 1):.1f}, "
        f"min {min(ranks.values(), default=0)}, max {max(ranks.values(), default=0)}.",
        "",
        "| module | rank |",
        "|---|---|",
        *[f"| {name} | {rank} |" for name, rank in ranks.items()],
        "",
        "## Training settings",
        "",
        *[f"- {key}: {value}" for key, value in settings.items()],
        "",
    ]
    if sample_grid:
        lines[lines.index("## Use") : lines.index("## Use")] = ["![samples](" + sample_grid + ")", ""]
    atomic_write_text(path, "\n".join(lines))


def rank_heatmap(history: list[dict[str, int]], steps: list[int], path: Path) -> None:
    """Per-layer rank over training: layers × step image (matplotlib, Agg), written atomically as PNG."""
    if not history:
        raise ValueError("rank history is empty: nothing to plot")
    names = list(history[0])
    prefix = os.path.commonprefix(names).rpartition(".")[0]  # e.g. "unet" when only the UNet is adapted
    labels = [name[len(prefix) + 1 :] if prefix else name for name in names]
    matrix = np.array([[ranks[name] for ranks in history] for name in names], dtype=np.float64)  # (L, S)
    height = min(2.0 + 0.12 * len(names), 40.0)
    fig = Figure(figsize=(10, height))
    ax = fig.subplots()
    image = ax.imshow(
        matrix,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        extent=(steps[0] - 0.5, steps[-1] + 0.5, len(names) - 0.5, -0.5),
    )
    ax.set_xlabel("training step")
    ax.set_ylabel("layer")
    stride = max(1, len(names) // 60)
    ax.set_yticks(range(0, len(names), stride))
    ax.set_yticklabels([labels[i] for i in range(0, len(names), stride)], fontsize=5)
    fig.colorbar(image, ax=ax, label="rank D")
    ax.set_title(f"LoRA² rank per layer{f' ({prefix})' if prefix else ''}")
    fig.tight_layout()
    tmp = temporary_name(path)
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, path)


def image_grid(rows: list[list[Image.Image]], row_labels: list[str], column_labels: list[str], path: Path) -> None:
    """Grid of images (shown at least 128 px wide) with column titles and row labels, written atomically as PNG."""
    if not rows or not rows[0]:
        raise ValueError("sample grid needs at least one image")
    width, height = rows[0][0].size
    zoom = max(1, -(-128 // width))
    width, height = width * zoom, height * zoom
    font = ImageFont.truetype(font_manager.findfont("DejaVu Sans"), 13)
    labels = [_wrap(label, 28) for label in row_labels]
    label_w = 12 + max(
        int(ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), t, font=font)[2]) for t in labels
    )
    title_h = 24
    grid = Image.new("RGB", (label_w + width * len(rows[0]), title_h + height * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for col, text in enumerate(column_labels):
        draw.text((label_w + col * width + 4, 4), text, fill="black", font=font)
    for r, (row, label) in enumerate(zip(rows, labels)):
        draw.multiline_text((6, title_h + r * height + 6), label, fill="black", font=font)
        for col, image in enumerate(row):
            tile = image.resize((width, height), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + col * width, title_h + r * height))
    tmp = temporary_name(path)
    grid.save(tmp)
    os.replace(tmp, path)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
