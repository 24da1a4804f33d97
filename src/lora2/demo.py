"""``lora2 demo``: personalise one built-in world subject with LoRA² on CPU, offline, in minutes.

Personalises one of the world's subjects (``lora2.world.info()``; default ``DEMO_SUBJECT``) on the world's
pretrained base model, or, until that is built, on a tiny random SDXL pipeline (``lora2.world.tiny``: the pipeline
runs, the images are noise).
Writes the adapter, the sample grid (base vs personalised over several prompts), the per-layer rank heatmap and,
when the world's evaluators are available, DINO / CLIP-I / CLIP-T of base and personalised samples.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lora2.data.dreambooth import load_subjects
from lora2.eval.metrics import ClipEncoder, DinoEncoder, SubjectScorer
from lora2.train.config import TrainConfig
from lora2.train.data import list_images
from lora2.train.model import native_resolution, world_path
from lora2.train.recipe import train

logger = logging.getLogger(__name__)

DEMO_PROMPTS = ("{instance}", "{instance} on the beach", "{instance} in the snow", "{instance} at night")


def _metrics(subject_dir: Path, samples: Path, prompts: list[str]) -> dict | None:
    """DINO, CLIP-I, CLIP-T of base and personalised samples with the world's evaluators (None when unavailable)."""
    dino_path, clip_path = world_path("dino_evaluator"), world_path("clip_evaluator")
    if dino_path is None or clip_path is None:
        logger.info("metrics skipped: the world's DINO/CLIP evaluators are not built yet")
        return None
    scorer = SubjectScorer(DinoEncoder.from_pretrained(dino_path), ClipEncoder.from_pretrained(clip_path))
    reference = scorer.reference(list_images(subject_dir))
    result = {}
    for kind in ("base", "lora2"):
        scores = [
            scorer.score([samples / f"{kind}_{index:02d}.png"], prompt, reference)
            for index, prompt in enumerate(prompts)
        ]
        result[kind] = {key: sum(s[key] for s in scores) / len(scores) for key in scores[0]}
    return result


DEMO_SUBJECT = "target_circle"  # one the base model cannot draw from its class name (docs/WORLD.md: DINO 0.05)


def demo(
    out_dir: str | Path = "lora2_demo",
    max_train_steps: int = 150,
    overwrite: bool = False,
    subject: str = DEMO_SUBJECT,
) -> dict[str, Path]:
    """Run the demo on the world ``subject`` into ``out_dir``; returns the written files (adapter, grid, heatmap,
    metrics, run folder)."""
    started = time.monotonic()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base = world_path("base_model")
    if base is None:
        from lora2.world.tiny import build_tiny_sdxl

        base = out / "base"
        if not (base / "model_index.json").is_file():
            logger.info("world base model not built: using a tiny random SDXL pipeline (images will be noise)")
            build_tiny_sdxl(base)
    subjects_root = world_path("subjects_dir")
    if subjects_root is None:
        raise ValueError("the built-in world's subjects are not available (lora2.world.info())")
    subjects = load_subjects(subjects_root)
    if subject not in subjects:
        raise ValueError(f"unknown world subject {subject!r}; choose one of {sorted(subjects)}")
    subject_dir, class_name = subjects_root / subject, subjects[subject].class_name
    instance = f"a sks {class_name}"
    config = TrainConfig(
        base=str(base),
        instance_data_dir=str(subject_dir),
        instance_prompt=instance,
        class_name=class_name,
        output_dir=str(out / "run"),
        overwrite=overwrite,
        resolution=native_resolution(str(base)),
        max_train_steps=max_train_steps,
        learning_rate=1e-3,
        checkpointing_steps=max_train_steps,
        checkpoints_total_limit=1,
        sample_prompts=list(DEMO_PROMPTS),
        sample_steps=15,
        seed=0,
        device="cpu",
    )
    logger.info("demo: personalising %s (%s) on %s for %d steps", subject_dir.name, instance, base, max_train_steps)
    result = train(config)
    files = {"run": result.output_dir, **result.files}
    prompts = [p.replace("{instance}", instance) for p in DEMO_PROMPTS]
    clean = [" ".join(p.replace("sks", "").split()) for p in prompts]
    metrics = _metrics(subject_dir, result.files["samples"], clean)
    if metrics is not None:
        files["metrics"] = out / "metrics.json"
        files["metrics"].write_text(json.dumps(metrics, indent=1), encoding="utf-8")
        for kind, values in metrics.items():
            logger.info("%-6s %s", kind, "  ".join(f"{k}={v:.3f}" for k, v in values.items()))
    ranks = result.ranks
    logger.info(
        "ranks: total %d, mean %.1f, min %d, max %d over %d modules",
        sum(ranks.values()),
        sum(ranks.values()) / len(ranks),
        min(ranks.values()),
        max(ranks.values()),
        len(ranks),
    )
    for key, path in files.items():
        logger.info("%-12s %s", key, path)
    logger.info("demo finished in %.0f s", time.monotonic() - started)
    return files
