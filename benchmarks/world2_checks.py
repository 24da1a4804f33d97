"""Checks of the second world's parts that need no GPU: does a VAE carry the subjects' detail, and does a DINO
evaluator see it?

* ``vae``: each subject rendered at 128 px on white (radius 0.3, turned 20°) through a VAE and back (posterior mean),
  PSNR in dB over the image (signal range 2, images in [-1, 1]).
* ``dino``: for each subject, the mean cosine (the DINO metric's CLS embedding) between four of its instance views
  and four other views of it ("same"), between the same four and those other four views of the subject with its
  detail altered ("altered": glyph strings reversed, or a character added to a palindrome; small beads' colours
  rotated; stripe, check, grid and ring periods ×1.6), and to the other subjects' views ("others"). "same" and
  "altered" differ in the detail alone: an evaluator that sees it scores "altered" below "same"; one that is blind
  to it scores them alike. "pose_matched" is the cosine between a view and the same view with the detail altered
  (1 for an evaluator blind to the detail).
* ``confusion``: how far each subject of a set stands from the others in the DINO evaluator's eyes (its rendered
  instance views' mean embedding): ``nearest``, 1 − the highest cosine to another subject, and ``class``, 1 − the
  cosine to the mean of its prompt class's other members; then Spearman ρ of each with a gate's per-subject gap
  (``subject_gap`` of a ``world2_gate_cells.json``: rank 64 − the low rank) and with the subjects' complexity. A gap
  that falls with distance is a low rank confusing look-alike subjects.

``--subjects FILE`` takes the subject set from a Python file that defines ``SUBJECTS`` (an earlier version of
``src/lora2/world/world2.py``, e.g. from ``git show``); the default is the current one, ``--set`` names another of
its sets (``world2.SUBJECT_SETS``). Results go to stdout and,
with ``--json``, into a file (merged under ``--label``).

usage:
    python benchmarks/world2_checks.py vae --vae DIR [--subjects FILE] [--json F --label L]
    python benchmarks/world2_checks.py dino --dino DIR [--subjects FILE] [--json F --label L]
    python benchmarks/world2_checks.py confusion --dino DIR --set families --gate-cells FILE [--json F --label L]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lora2.world import world2
from lora2.world.subjects import Subject, instance_views, render_subject

ALTERED_COLORS = {"magenta": "teal", "teal": "gold", "gold": "magenta", "navy": "lime", "lime": "navy", "rust": "sky",
                  "sky": "rust", "salmon": "lime", "cream": "magenta", "mint": "gold"}  # fmt: skip
PERIODIC = ("striped", "checkered", "grid", "rings")


def load_subjects(path: str | None, subject_set: str = "designed") -> tuple[Subject, ...]:
    """``SUBJECTS`` of a Python file, or the current second world's set ``subject_set``."""
    if path is None:
        return world2.SUBJECT_SETS[subject_set][0]
    spec = importlib.util.spec_from_file_location("subjects_file", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SUBJECTS


def vae_psnr(vae_dir: str, subjects: tuple[Subject, ...]) -> dict[str, float]:
    """Round-trip PSNR (dB) of each subject's 128-px render through the VAE in ``vae_dir``."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32).eval()
    renders = [np.asarray(render_subject(s, 128, radius=0.3, rotation=20.0)) for s in subjects]
    x = torch.from_numpy(np.stack(renders)).permute(0, 3, 1, 2).float() / 127.5 - 1  # N×3×128×128
    with torch.no_grad():
        back = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = {s.name: float((a - b).square().mean()) for s, a, b in zip(subjects, x, back)}
    return {name: round(10 * math.log10(4 / error), 2) for name, error in mse.items()}


def altered(subject: Subject) -> Subject:
    """``subject`` with its detail changed (see the module docstring); its body and layout kept."""
    layers = []
    for layer in subject.layers:
        if layer.pattern == "glyphs":
            text = layer.text[::-1] if layer.text[::-1] != layer.text else layer.text + "Z"
            layer = replace(layer, text=text)
        elif layer.shape == "circle" and layer.scale[0] < 0.2:  # a bead
            layer = replace(layer, color=ALTERED_COLORS.get(layer.color, layer.color))
        elif layer.pattern in PERIODIC:
            layer = replace(layer, period=layer.period * 1.6)
        layers.append(layer)
    return replace(subject, layers=tuple(layers))


def view_embedder(dino_dir: str, views: int = 4) -> Callable[[Subject, int], torch.Tensor]:
    """The DINO evaluator in ``dino_dir`` as a function of (subject, view index): the unit CLS embeddings (views×d)
    of the subject's 128-px renders at ``instance_views(index, views)``."""
    from transformers import ViTImageProcessor, ViTModel

    from lora2.world.evaluators import dino_embed

    model = ViTModel.from_pretrained(dino_dir).eval()
    processor = ViTImageProcessor.from_pretrained(dino_dir)

    def embed(subject: Subject, index: int) -> torch.Tensor:
        return dino_embed(model, processor, [render_subject(subject, 128, **v) for v in instance_views(index, views)])

    return embed


def dino_probe(dino_dir: str, subjects: tuple[Subject, ...], views: int = 4) -> dict[str, dict[str, float]]:
    """Mean cosine similarities "same", "altered" and "others" of each subject (module docstring)."""
    embed = view_embedder(dino_dir, views)

    own = {s.name: embed(s, i) for i, s in enumerate(subjects)}
    result = {}
    for i, subject in enumerate(subjects):
        a = own[subject.name]
        same = embed(subject, i + 100)  # other views of the subject
        changed = embed(altered(subject), i + 100)  # the same other views, its detail altered
        others = [(a @ own[n].T).mean().item() for n in own if n != subject.name]
        matched = embed(altered(subject), i)  # the subject's own views, its detail altered
        result[subject.name] = {"same": round((a @ same.T).mean().item(), 4),
                                "altered": round((a @ changed.T).mean().item(), 4),
                                "others": round(float(np.mean(others)), 4),
                                "pose_matched": round((a * matched).sum(dim=1).mean().item(), 4)}  # fmt: skip
    detailed = [r for s, r in zip(subjects, result.values()) if s.level > 1]
    result["mean_over_detailed"] = {k: round(float(np.mean([r[k] for r in detailed])), 4) for k in detailed[0]}
    return result


def distinctness(embeddings: dict[str, torch.Tensor], classes: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per subject, from the mean of its unit embeddings (views×d): ``nearest``, 1 − its highest cosine to another
    subject, and ``class``, 1 − its cosine to the mean of its class's other members (absent when it has none)."""
    unit = {name: F.normalize(views.mean(0), dim=0) for name, views in embeddings.items()}  # d each
    result = {}
    for name, own in unit.items():
        others = [n for n in unit if n != name]
        row = {"nearest": round(1 - max(float(own @ unit[n]) for n in others), 4)}
        peers = [n for n in others if classes[n] == classes[name]]
        if peers:
            row["class"] = round(1 - float(own @ F.normalize(torch.stack([unit[n] for n in peers]).mean(0), dim=0)), 4)
        result[name] = row
    return result


def confusion(dino_dir: str, subjects: tuple[Subject, ...], gate_cells: str, views: int = 4) -> dict:
    """``distinctness`` of ``subjects`` (their rendered instance views) and its Spearman ρ with the per-subject gap
    and the complexity recorded in ``gate_cells`` (module docstring)."""
    from lora2.eval.report import spearman

    cells = json.loads(Path(gate_cells).read_text(encoding="utf-8"))
    gap, complexity = cells["subject_gap"], cells["complexity_png_bits_per_pixel"]
    missing = [s.name for s in subjects if s.name not in gap]
    if missing:
        raise ValueError(f"{gate_cells} has no gap for subject(s) {missing}: give the set its gate ran on (--set)")
    embed = view_embedder(dino_dir, views)
    embeddings = {subject.name: embed(subject, index) for index, subject in enumerate(subjects)}  # views×d each
    measured = distinctness(embeddings, {s.name: s.class_name for s in subjects})
    rho = {}
    for measure in ("nearest", "class"):
        names = [s.name for s in subjects if measure in measured[s.name]]
        if len(names) > 2:
            values = [measured[n][measure] for n in names]
            rho[f"{measure}_vs_gap"] = round(spearman(values, [gap[n] for n in names]), 4)
            rho[f"{measure}_vs_complexity"] = round(spearman(values, [complexity[n] for n in names]), 4)
    return {"gate_cells": gate_cells, "spearman": rho, "subjects": measured}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("check", choices=("vae", "dino", "confusion"))
    parser.add_argument("--vae", help="a VAE folder (AutoencoderKL)")
    parser.add_argument("--dino", help="a DINO evaluator folder (ViTModel + processor)")
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--subjects", help="a Python file defining SUBJECTS (default: the current world2 set)")
    chosen.add_argument("--set", default="designed", choices=tuple(world2.SUBJECT_SETS), help="world2's subject set")
    parser.add_argument("--gate-cells", help="confusion: a world2_gate_cells.json (its subject_gap)")
    parser.add_argument("--json", help="merge the result into this file under --label")
    parser.add_argument("--label", help="the result's key in --json")
    args = parser.parse_args(argv)
    if args.json and not args.label:
        parser.error("--json needs --label")
    subjects = load_subjects(args.subjects, args.set)
    if args.check == "vae":
        if not args.vae:
            parser.error("vae needs --vae DIR")
        result = vae_psnr(args.vae, subjects)
    elif not args.dino:
        parser.error(f"{args.check} needs --dino DIR")
    elif args.check == "dino":
        result = dino_probe(args.dino, subjects)
    else:
        if not args.gate_cells:
            parser.error("confusion needs --gate-cells FILE")
        result = confusion(args.dino, subjects, args.gate_cells)
    sys.stdout.write(json.dumps(result, indent=1) + "\n")
    if args.json:
        path = Path(args.json)
        table = json.loads(path.read_text()) if path.is_file() else {}
        table.setdefault(args.check, {})[args.label] = {"command": " ".join(["python benchmarks/world2_checks.py",
                                                                              *(argv or sys.argv[1:])]),
                                                        "result": result}  # fmt: skip
        path.write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
