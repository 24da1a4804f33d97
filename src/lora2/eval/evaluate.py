"""`lora2 eval`: generate each evaluation prompt of a subject with fixed seeds and score DINO, CLIP-I, CLIP-T.

Protocol (DreamBooth, Ruiz et al. 2023): for each of the subject's 25 prompt templates, ``num_images`` images are
generated with the identifier token (``"a sks dog in the jungle"``); image ``j`` of every prompt uses the seed
``seed + j`` (one ``torch.Generator`` per image), so an image does not depend on batching and all methods see the
same initial noise. Scores per prompt are averaged over its images; the subject's score is the mean (and std) over
prompts. The result is written as JSON beside the run (``<run>/eval.json``).
"""

from __future__ import annotations

import json
import logging
import re
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from lora2.data import Subject, load_subject
from lora2.eval.metrics import DEFAULT_CLIP, DEFAULT_DINO, ClipEncoder, DinoEncoder, SubjectScorer
from lora2.tools.inspect import inspect_file
from lora2.train.generate import load_pipeline as generate_pipeline
from lora2.train.run_folder import RunFolder, read_run_config

logger = logging.getLogger(__name__)

METRICS = ("dino", "clip_i", "clip_t")
GIB = 2**30


@dataclass
class EvalConfig:
    """Settings of ``lora2 eval``: either ``run`` (a training run folder) or ``base`` + ``lora`` + ``subject``.

    Values left ``None`` are read from the run's training config when there is one (base, subject, identifier,
    resolution, guidance_scale), else fall back to the defaults below.
    num_images: images per prompt; seed: image j of each prompt uses seed + j; max_prompts: first N prompts only.
    batch_size: images per pipeline call (None: 8 on the CPU, 64 on a GPU); it does not change the images.
    dino_model / clip_model: hub id or local folder; default: the world's evaluators when the base model is the
    world's or the subject is a world subject, else ``facebook/dino-vits16`` / ``openai/clip-vit-base-patch32``
    (with HF_HUB_OFFLINE set, a hub id not in the local cache fails at once, in one line).
    output: JSON path (default ``<run>/eval.json``, or ``eval.json`` beside the adapter file).
    """

    run: str | None = None
    base: str | None = None
    lora: str | None = None
    subject: str | None = None
    identifier: str | None = None
    num_images: int = 4
    seed: int = 0
    num_inference_steps: int = 30
    guidance_scale: float | None = None
    resolution: int | None = None
    max_prompts: int | None = None
    batch_size: int | None = None
    dino_model: str | None = None
    clip_model: str | None = None
    device: str = "auto"
    dtype: str = "fp32"
    output: str | None = None
    save_images: bool = False

    def __post_init__(self) -> None:
        for key in ("num_images", "num_inference_steps", "batch_size"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1, got {self.max_prompts!r}")
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise ValueError(f"dtype must be fp32, fp16 or bf16, got {self.dtype!r}")
        if self.run is None and (self.lora is None or self.subject is None):
            raise ValueError("give --run DIR, or --lora FILE and --subject DIR (and --base unless the default world)")


# ---------------------------------------------------------------------- adapter files
def adapter_summary(path: str | Path) -> dict:
    """Ranks and size of a LoRA file (``lora2 inspect``'s report): ``{"ranks": {module: r}, "parameters",
    "size_gb_fp32", "mean_rank", ...}``.

    UNet modules are named as in the UNet, modules of other components with their prefix (``text_encoder.…``). Size
    counts the LoRA matrices (and DoRA's magnitude vectors) in fp32, in GiB (2**30 bytes, the unit of the paper's
    "2.8 GB" for rank 512 on SDXL). AdaLoRA runs are written as the equivalent plain LoRA of their final ranks, so
    their ranks here are those its budget allocation kept. ``ValueError`` naming the file for anything unreadable.
    """
    report = inspect_file(path)
    ranks = {
        row["module"] if row["component"] in ("unet", "") else f"{row['component']}.{row['module']}": row["rank"]
        for row in report["modules"]
    }
    totals = report["totals"]
    return {
        "file": str(path),
        "ranks": dict(sorted(ranks.items())),
        "num_modules": totals["modules"],
        "total_rank": totals["total_rank"],
        "mean_rank": totals["mean_rank"],
        "parameters": totals["parameters"],
        "size_gb_fp32": totals["bytes_fp32"] / GIB,
    }


# ---------------------------------------------------------------------- evaluator resolution
def world_info(materialize: bool = False) -> dict | None:
    """``lora2.world.info()`` with only the ready entries kept (None when the world package is absent)."""
    try:
        from lora2.world import info
    except ImportError:
        return None
    found = info(materialize=materialize)
    ready = found.get("ready", {})
    return {key: value for key, value in found.items() if ready.get(key)}


def resolve_evaluators(
    subject_dir: Path, dino_model: str | None, clip_model: str | None, base: str | None = None
) -> tuple[str, str]:
    """Explicit models, else the world's evaluators when the base model is the world's (any subject folder) or the
    subject lives in the world, else the hub defaults."""
    if dino_model and clip_model:
        return dino_model, clip_model
    info = world_info()
    if info:
        world_dir = Path(info["subjects_dir"]).resolve() if info.get("subjects_dir") else None
        world_base = Path(info["base_model"]).resolve() if info.get("base_model") else None
        if (world_dir is not None and world_dir in subject_dir.resolve().parents) or (
            world_base is not None and base and Path(base).resolve() == world_base
        ):
            dino_model = dino_model or info.get("dino_evaluator")
            clip_model = clip_model or info.get("clip_evaluator")
    return str(dino_model or DEFAULT_DINO), str(clip_model or DEFAULT_CLIP)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass
class ResolvedEval:
    """Everything ``evaluate`` needs, resolved and validated before any model is loaded."""

    base: str
    lora: Path
    subject_dir: Path
    subject: Subject
    identifier: str
    resolution: int | None
    guidance_scale: float
    output: Path


def resolve(config: EvalConfig) -> ResolvedEval:
    """Fill the config from the run folder and validate every path (no model loading)."""
    run_config = read_run_config(config.run) if config.run else {}
    lora = Path(config.lora) if config.lora else RunFolder(config.run).find_adapter()
    if not lora.is_file():
        raise ValueError(f"adapter file not found: {lora}")
    adapter_summary(lora)  # fails early on a file lora2 inspect refuses
    base = config.base or run_config.get("base") or default_base()
    subject_dir = Path(config.subject or run_config.get("instance_data_dir") or "")
    if not str(subject_dir) or str(subject_dir) == ".":
        raise ValueError(f"no subject: give --subject (the run config of {config.run} names no instance_data_dir)")
    subject = load_subject(subject_dir)
    output = Path(config.output) if config.output else (Path(config.run) if config.run else lora.parent) / "eval.json"
    return ResolvedEval(
        base=str(base),
        lora=lora,
        subject_dir=subject_dir,
        subject=subject,
        identifier=config.identifier or run_config.get("identifier") or "sks",
        resolution=config.resolution or run_config.get("resolution"),
        guidance_scale=config.guidance_scale
        if config.guidance_scale is not None
        else run_config.get("guidance_scale", 5.0),
        output=output,
    )


def default_base() -> str:
    """The world's base model when it is ready, else a ValueError asking for --base."""
    info = world_info()
    if info and info.get("base_model"):
        return str(info["base_model"])
    raise ValueError("no base model: give --base (or a run folder whose config names one)")


# ---------------------------------------------------------------------- generation and scoring
def load_pipeline(base: str, lora: Path, device: torch.device, dtype: torch.dtype):
    """The base pipeline (SDXL, or any diffusers text-to-image pipeline) with the LoRA loaded through peft (a DoRA
    file, with magnitude vectors, loads as DoRA: diffusers sets ``use_dora`` from its keys), after the file checks of
    ``lora2 inspect`` and a check of every module against the pipeline (``lora2.train.generate.load_pipeline``)."""
    pipe = generate_pipeline(base, lora, device, dtype)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    if not any(hasattr(module, "lora_A") for module in denoiser.modules()):
        raise ValueError(f"{lora} loaded no LoRA layer into the denoiser of {base} (module names do not match?)")
    return pipe


def default_batch_size(device: torch.device) -> int:
    """Images per pipeline call when ``--batch-size`` is not given: 8 on the CPU, 64 on a GPU, where a small model's
    sampling is bound by kernel launches and a batch costs about as much as one image."""
    return 64 if device.type == "cuda" else 8


def generate(pipe, prompts: list[str], config: EvalConfig, resolved: ResolvedEval, device: torch.device) -> list:
    """``num_images`` images per prompt, image j seeded with ``seed + j``; returns a list (per prompt) of lists."""
    items = [(p, j) for p in range(len(prompts)) for j in range(config.num_images)]
    images: list[list] = [[] for _ in prompts]
    size = {"height": resolved.resolution, "width": resolved.resolution} if resolved.resolution else {}
    batch_size = config.batch_size or default_batch_size(device)
    for start in tqdm(range(0, len(items), batch_size), desc="generate", unit="batch"):
        batch = items[start : start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(config.seed + j) for _, j in batch]
        out = pipe(
            prompt=[prompts[p] for p, _ in batch],
            num_inference_steps=config.num_inference_steps,
            guidance_scale=resolved.guidance_scale,
            generator=generators,
            **size,
        ).images
        for (p, _), image in zip(batch, out):
            images[p].append(image)
    return images


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def evaluate(config: EvalConfig) -> dict:
    """Generate, score and write the JSON report; returns it."""
    resolved = resolve(config)
    device = _device(config.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.dtype]
    dino_name, clip_name = resolve_evaluators(
        resolved.subject_dir, config.dino_model, config.clip_model, resolved.base
    )
    scorer = SubjectScorer(
        DinoEncoder.from_pretrained(dino_name, device), ClipEncoder.from_pretrained(clip_name, device)
    )
    subject = resolved.subject
    templates = subject.prompts[: config.max_prompts] if config.max_prompts else subject.prompts
    prompts = [p for p in subject.eval_prompts(resolved.identifier)[: len(templates)]]
    class_prompts = subject.class_prompts()[: len(templates)]

    start = time.perf_counter()
    pipe = load_pipeline(resolved.base, resolved.lora, device, dtype)
    images = generate(pipe, prompts, config, resolved, device)
    generation_seconds = time.perf_counter() - start
    del pipe

    reference = scorer.reference(subject.image_paths)
    per_prompt = []
    for i, (prompt, class_prompt) in enumerate(zip(prompts, class_prompts)):
        scores = scorer.score(images[i], class_prompt, reference)
        per_prompt.append({"prompt": prompt, "prompt_without_identifier": class_prompt, **scores})
        if config.save_images:
            folder = resolved.output.parent / "eval_images"
            folder.mkdir(parents=True, exist_ok=True)
            for j, image in enumerate(images[i]):
                image.save(folder / f"{i:02d}_{config.seed + j}_{re.sub(r'[^a-z0-9]+', '_', prompt.lower())}.png")
    result = {
        "subject": subject.name,
        "class_name": subject.class_name,
        "live": subject.live,
        "identifier": resolved.identifier,
        "base": resolved.base,
        "lora": str(resolved.lora),
        "evaluators": {"dino": dino_name, "clip": clip_name},
        "config": asdict(config),
        "num_prompts": len(prompts),
        "summary": {metric: _mean_std([row[metric] for row in per_prompt]) for metric in METRICS},
        "per_prompt": per_prompt,
        "adapter": adapter_summary(resolved.lora),
        "generation_seconds": generation_seconds,
    }
    resolved.output.parent.mkdir(parents=True, exist_ok=True)
    resolved.output.write_text(json.dumps(result, indent=2), encoding="utf-8")
    summary = result["summary"]
    logger.info(
        "%s: DINO %.4f  CLIP-I %.4f  CLIP-T %.4f -> %s",
        subject.name,
        summary["dino"]["mean"],
        summary["clip_i"]["mean"],
        summary["clip_t"]["mean"],
        resolved.output,
    )
    return result
