"""Run outputs: the adapter files, the model card, the per-layer rank heatmap and the sample grid."""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib import font_manager  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from torch import nn  # noqa: E402

from lora2.train import peft_adapters  # noqa: E402
from lora2.train.checkpoint import atomic_save_file, atomic_write_text  # noqa: E402

logger = logging.getLogger(__name__)

ADAPTER_FILES = {
    "diffusers": "pytorch_lora_weights.safetensors",
    "kohya": "lora_kohya.safetensors",
    "peft": "peft",
    "lora2": "lora2_adapter.safetensors",  # unbaked A, B, log ν: exact training state for analysis / resume
}
METHOD_LABELS = {"lora2": "LoRA²", "dora": "DoRA", "adalora": "AdaLoRA"}


def save_adapter(
    modules: dict[str, nn.Module], output_dir: Path, formats: Sequence[str], metadata: dict
) -> dict[str, Path]:
    """Write the adapter in each format (``lora2.save_lora``: ranks truncated to D, Λ and scale baked in); returns
    format → path.

    ``modules`` maps a diffusers prefix ("unet", "text_encoder", "text_encoder_2") to the adapted module.
    Each file (the peft folder) is written under a temporary name and renamed into place, so a crash never leaves
    half an adapter. A UNet with a peft DoRA / AdaLoRA adapter is written by ``save_peft_adapter``.
    """
    from lora2.export import save_lora

    if peft_adapters.has_peft_adapter(modules["unet"]):
        return save_peft_adapter(modules["unet"], output_dir, formats, metadata)
    paths = {}
    for fmt in formats:
        path = output_dir / ADAPTER_FILES[fmt]
        tmp = path.with_name(path.stem + ".tmp" + path.suffix)
        if tmp.is_dir():
            shutil.rmtree(tmp)
        save_lora(modules, tmp, format=fmt, metadata=metadata)
        if path.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
        paths[fmt] = path
        logger.info("wrote %s adapter %s", fmt, path)
    return paths


def save_peft_adapter(unet: nn.Module, output_dir: Path, formats: Sequence[str], metadata: dict) -> dict[str, Path]:
    """A DoRA / AdaLoRA UNet adapter: always the peft folder (``peft/``: ``adapter_config.json`` +
    ``adapter_model.safetensors``, for ``PeftModel.from_pretrained``) and the diffusers file (``lora2 eval``,
    ``pipe.load_lora_weights``), plus the other requested formats that can express it.

    DoRA's diffusers file holds its magnitude vectors (``peft_adapters.dora_diffusers_state_dict``); AdaLoRA is
    written as the exactly equivalent plain LoRA of its final ranks (``peft_adapters.plain_lora_modules``), which
    also gives its kohya file. The lora2-native format (LoRA² training state) does not apply and is skipped.
    """
    from peft import AdaLoraConfig

    from lora2.export.adapter import LoraModule
    from lora2.export.formats import write_adapter
    from lora2.export.metadata import build_header
    from lora2.export.names import to_file_name

    adapter_type = "adalora" if isinstance(unet.peft_config[peft_adapters.ADAPTER_NAME], AdaLoraConfig) else "dora"
    folder = output_dir / ADAPTER_FILES["peft"]
    paths = {"peft": peft_adapters.save_peft_folder(unet, folder, metadata.get("base_model"))}
    logger.info("wrote %s peft adapter %s", adapter_type, paths["peft"])
    pairs = peft_adapters.plain_lora_modules(unet) if adapter_type == "adalora" else {}
    for fmt in dict.fromkeys(["diffusers", *formats]):
        if fmt == "peft":
            continue
        path = output_dir / ADAPTER_FILES[fmt]
        if fmt == "diffusers" and adapter_type == "dora":
            atomic_save_file(peft_adapters.dora_diffusers_state_dict(unet), path)
        elif fmt in ("diffusers", "kohya") and adapter_type == "adalora":
            modules = {to_file_name(unet, "unet", n): LoraModule(down, up) for n, (down, up) in pairs.items()}
            infos = {name: {"rank": module.rank} for name, module in modules.items()}
            header = build_header(fmt, {"unet": {"modules": infos}}, metadata)  # no LoRA2Config: plain LoRA
            tmp = path.with_name(path.stem + ".tmp" + path.suffix)
            write_adapter({"unet": modules}, tmp, fmt, header, torch.float32)
            os.replace(tmp, path)
        else:
            logger.warning("%s adapters have no %s format; not written", adapter_type, fmt)
            continue
        paths[fmt] = path
        logger.info("wrote %s adapter %s (%s)", fmt, path, adapter_type)
    return paths


def write_model_card(
    path: Path,
    base_model: str,
    instance_prompt: str,
    ranks: dict[str, int],
    settings: dict,
    kind: str,
    sample_grid: str | None = None,
    method: str = "lora2",
) -> None:
    """README.md in the style of diffusers' DreamBooth LoRA cards (YAML front matter + usage); ``method`` is the
    adapter type ("lora2", or the peft baselines "dora" / "adalora")."""
    total = sum(ranks.values())
    label = METHOD_LABELS[method]
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
        f"Adapter for `{base_model}` trained by `lora2 train` with "
        + (
            "LoRA² (per-layer ranks learned, arXiv 2603.21884)."
            if method == "lora2"
            else f"peft's {label} (the `peft/` folder loads with `PeftModel.from_pretrained`)."
        ),
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
    fig, ax = plt.subplots(figsize=(10, height))
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
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


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
    tmp = path.with_name(path.stem + ".tmp.png")
    grid.save(tmp)
    tmp.replace(path)


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join(lines + [line])
