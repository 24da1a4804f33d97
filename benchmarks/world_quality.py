"""Quality of the world's committed models, measured on CPU with plain diffusers / transformers loading.

Two parts (``--part``), each written into one JSON file (``--out``, merged with what is already there):

* ``prompts``: the base model follows prompts of held-out (shape, colour) pairs, never seen in pretraining.
  - CLIP-T (world CLIP evaluator): cosine of each generated image with its own prompt vs. with another prompt of
    the set (the next one, a derangement); also the fraction of images whose own prompt scores higher.
  - Attribute accuracy: colour by pixel statistics of the foreground (pixels farther than ``FG_DIST`` from every
    background pixel of the prompt's background rendered alone; each foreground pixel votes for the nearest world
    colour or its pattern shade; majority wins), shape by the best-overlapping world silhouette (and again by CLIP
    zero-shot among captions that differ in the shape only), position by the foreground centroid. The same checks
    on the world's own renders of the same scenes give their ceiling, and on those renders passed through the base
    model's VAE the ceiling its latent space allows.
* ``dreambooth``: per subject, DINO (world DINO evaluator, CLS cosine, mean over generated × reference images) of
  "a photo of sks {class}" generations before and after a fixed-rank LoRA DreamBooth run of lora2's trainer
  (``lora2 train --rank-mode fixed --init-rank 16`` on the subject's 4-6 instance images; the adapter file loaded
  back with diffusers' ``load_lora_weights``), plus CLIP-I, the references' own mean pairwise DINO (ceiling) and
  the DINO of the other subjects' references to this subject's (floor: a different object of the same world).

usage: python benchmarks/world_quality.py --part prompts|dreambooth|all [--subjects a,b] [--steps 300]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from transformers import CLIPModel, CLIPProcessor, ViTImageProcessor, ViTModel

from lora2.train import TrainConfig, train
from lora2.world import generator, info
from lora2.world.evaluators import clip_embed_images, clip_embed_texts, dino_embed

logger = logging.getLogger("world_quality")

FG_DIST = 0.22  # RGB distance in [0, 1] units above which a pixel is not background
GUIDANCE = 5.0
STEPS = 20
DREAMBOOTH_RANK = 16
DREAMBOOTH_LR = 1e-3
ROOT = Path(__file__).resolve().parent


def load_models(paths: dict) -> dict:
    """The committed models, loaded with plain from_pretrained calls (fp32 on CPU)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(paths["base_model"], torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return {
        "pipe": pipe,
        "clip": CLIPModel.from_pretrained(paths["clip_evaluator"], dtype=torch.float32).eval(),
        "clip_processor": CLIPProcessor.from_pretrained(paths["clip_evaluator"]),
        "dino": ViTModel.from_pretrained(paths["dino_evaluator"], dtype=torch.float32).eval(),
        "dino_processor": ViTImageProcessor.from_pretrained(paths["dino_evaluator"]),
    }


def generate(pipe, prompts: list[str], seed: int, batch: int = 16, guidance: float | None = None) -> list[np.ndarray]:
    """uint8 H×W×3 images, one per prompt, with the pipeline's defaults (Euler, zeroed negative embeddings)."""
    guidance = GUIDANCE if guidance is None else guidance
    out = []
    for start in range(0, len(prompts), batch):
        images = pipe(
            prompts[start : start + batch],
            num_inference_steps=STEPS,
            guidance_scale=guidance,
            generator=torch.Generator().manual_seed(seed + start),
            output_type="np",
        ).images
        out.extend((images * 255).round().astype(np.uint8))
    return out


@torch.no_grad()
def vae_round_trip(pipe, images: np.ndarray) -> list[np.ndarray]:
    """uint8 N×H×W×3 images through the base model's VAE (posterior mean, decode): what its latent space keeps."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # N×3×H×W
    y = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample.clamp(-1.0, 1.0)  # N×3×H×W
    return list(((y + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())


def background_pixels(background: str, size: int) -> torch.Tensor:
    """RGB pixels (K×3 in [0, 1]) of ``background`` rendered alone at several ``bg_shift`` values."""
    shifts = torch.linspace(0, 1, 8)
    u, v = generator.pixel_grid(len(shifts), size)
    pixels = generator.render_background(background, u, v, shifts).reshape(-1, 3)
    return torch.unique((pixels * 32).round() / 32, dim=0)  # K×3, quantised to keep K small


def foreground(image: np.ndarray, background: str) -> np.ndarray:
    """Boolean H×W mask of pixels farther than FG_DIST from every pixel of the background rendered alone."""
    pixels = torch.from_numpy(image).float().reshape(-1, 3) / 255.0  # P×3
    bg = background_pixels(background, image.shape[0])  # K×3
    dist = torch.cdist(pixels, bg).min(dim=1).values  # P
    return (dist > FG_DIST).reshape(image.shape[:2]).numpy()


def colour_vote(image: np.ndarray, mask: np.ndarray) -> str | None:
    """Majority colour name of the masked pixels (nearest world colour or its pattern shade)."""
    if mask.sum() < 4:
        return None
    names = list(generator.COLORS)
    refs = [generator.COLORS[n] for n in names] + [generator.shade(generator.COLORS[n]) for n in names]
    table = torch.tensor(refs)  # 2C×3
    pixels = torch.from_numpy(image[mask]).float() / 255.0  # M×3
    nearest = torch.cdist(pixels, table).argmin(dim=1) % len(names)  # M
    return names[int(torch.bincount(nearest, minlength=len(names)).argmax())]


def position_of(mask: np.ndarray) -> str | None:
    """Named position of the mask's centroid (the world's placement rule: far from centre along one axis)."""
    if mask.sum() < 4:
        return None
    ys, xs = np.nonzero(mask)
    x, y = (xs.mean() + 0.5) / mask.shape[1] - 0.5, (ys.mean() + 0.5) / mask.shape[0] - 0.5
    if max(abs(x), abs(y)) < 0.12:
        return "center"
    if abs(x) > abs(y):
        return "left" if x < 0 else "right"
    return "top" if y < 0 else "bottom"


def zero_shot(models: dict, image: np.ndarray, scene, key: str, values: tuple[str, ...]) -> str:
    """CLIP zero-shot choice of one attribute: the scene's full caption with ``key`` set to each of ``values``."""
    texts = [generator.caption(replace(scene, **{key: value})) for value in values]
    text_emb = clip_embed_texts(models["clip"], models["clip_processor"], texts)  # V×p
    image_emb = clip_embed_images(models["clip"], models["clip_processor"], [image])  # 1×p
    return values[int((image_emb @ text_emb.T).argmax())]


ROTATIONS = (-15.0, -7.5, 0.0, 7.5, 15.0)  # the world's rotation range


def _silhouettes(shape: str, x, y, radius, rotation, size: int) -> torch.Tensor:
    """Boolean n×size×size masks of ``shape`` (the world's SDF) at centres (x, y) (image fractions), radii and
    rotations given as length-n sequences."""
    f = torch.float32
    radius = torch.tensor(radius, dtype=f)
    u, v = generator.pixel_grid(len(radius), size)
    sx, sy = generator.shape_frame(
        u, v, torch.tensor(x, dtype=f), torch.tensor(y, dtype=f), radius, torch.tensor(rotation, dtype=f)
    )
    px = (1.0 / (radius * size)).view(-1, 1, 1)
    return generator.coverage(generator.sdf_shape(shape, sx, sy), px) > 0.5


@functools.cache
def _probe(shape: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Area (pixels) and centroid offset (image fractions) of ``shape`` at radius 0.3 for each of ``ROTATIONS``."""
    n = len(ROTATIONS)
    masks = _silhouettes(shape, [0.5] * n, [0.5] * n, [0.3] * n, list(ROTATIONS), size).numpy()  # R×H×W
    coords = (np.arange(size) + 0.5) / size - 0.5
    area = masks.sum(axis=(1, 2))  # R
    dx = (masks.sum(axis=1) * coords).sum(axis=1) / area  # R
    dy = (masks.sum(axis=2) * coords).sum(axis=1) / area  # R
    return area, dx, dy


def silhouette_shape(mask: np.ndarray) -> str | None:
    """Shape whose world silhouette best overlaps the foreground (IoU), matched in area, centroid and rotation."""
    size = mask.shape[0]
    if mask.sum() < 4:
        return None
    fg = torch.from_numpy(mask)
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.mean() + 0.5) / size, (ys.mean() + 0.5) / size
    best, best_iou = None, -1.0
    for shape in generator.SHAPES:
        area, dx, dy = _probe(shape, size)
        scale = np.sqrt(mask.sum() / np.maximum(area, 1))  # R, radius / 0.3
        templates = _silhouettes(
            shape, list(cx - dx * scale), list(cy - dy * scale), list(0.3 * scale), list(ROTATIONS), size
        )  # R×H×W
        iou = (templates & fg).sum(dim=(1, 2)).float() / (templates | fg).sum(dim=(1, 2)).float()  # R
        if float(iou.max()) > best_iou:
            best, best_iou = shape, float(iou.max())
    return best


def attribute_checks(models: dict, images: list[np.ndarray], scenes: list) -> dict:
    """Fractions of images whose colour, shape and position match their scene's.

    Colour and position by pixel statistics of the foreground, shape by silhouette matching of the foreground
    (``silhouette_shape``); shape and colour again by CLIP zero-shot among captions that differ from the prompt in
    that attribute only.
    """
    checks: dict[str, list[bool]] = {"color": [], "shape": [], "position": [], "shape_clip": [], "color_clip": []}
    for image, scene in zip(images, scenes):
        mask = foreground(image, scene.background)
        checks["color"].append(colour_vote(image, mask) == scene.color)
        checks["position"].append(position_of(mask) == scene.position)
        checks["shape"].append(silhouette_shape(mask) == scene.shape)
        checks["shape_clip"].append(zero_shot(models, image, scene, "shape", generator.SHAPES) == scene.shape)
        checks["color_clip"].append(zero_shot(models, image, scene, "color", tuple(generator.COLORS)) == scene.color)
    checks["color_and_shape"] = [c and s for c, s in zip(checks["color"], checks["shape"])]
    result = {key: float(np.mean(value)) for key, value in checks.items()}
    for size in generator.SIZES:
        picked = [i for i, scene in enumerate(scenes) if scene.size == size]
        result[f"color_and_shape_{size}"] = float(np.mean([checks["color_and_shape"][i] for i in picked]))
    return result


def clip_t(models: dict, images: list[np.ndarray], prompts: list[str]) -> dict:
    """Mean CLIP-T with matched and mismatched (next prompt) prompts, and how often matched wins."""
    img = clip_embed_images(models["clip"], models["clip_processor"], images)  # N×p
    txt = clip_embed_texts(models["clip"], models["clip_processor"], prompts)  # N×p
    matched = (img * txt).sum(dim=1)  # N
    mismatched = (img * txt.roll(1, dims=0)).sum(dim=1)  # N
    return {
        "matched": float(matched.mean()),
        "mismatched": float(mismatched.mean()),
        "matched_wins": float((matched > mismatched).float().mean()),
    }


def prompt_following(models: dict, num: int, seed: int, held_out: str = "only") -> dict:
    """Part 1: prompts of held-out (shape, colour) pairs ("only"; "exclude": pairs seen in pretraining), generated
    vs. the world's own renders of the same scenes."""
    pipe = models["pipe"]
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    renders, prompts, scenes = generator.sample_batch(num, seed=seed, size=size, held_out=held_out)
    start = time.monotonic()
    images = generate(pipe, prompts, seed)
    seconds = time.monotonic() - start
    result = {
        "guidance_scale": GUIDANCE,
        "inference_steps": STEPS,
        "num_prompts": num,
        "shape_color_pairs": sorted({f"{s.color} {s.shape}" for s in scenes}),
        "generation_seconds": round(seconds, 1),
        "generated": {
            "clip_t": clip_t(models, images, prompts),
            "attributes": attribute_checks(models, images, scenes),
        },
        "world_renders": {
            "clip_t": clip_t(models, list(renders), prompts),
            "attributes": attribute_checks(models, list(renders), scenes),
        },
        "vae_round_trip": {"attributes": attribute_checks(models, vae_round_trip(pipe, renders), scenes)},
        "example_prompts": prompts[:4],
    }
    grid = np.concatenate([np.concatenate(images[i : i + 8], axis=1) for i in range(0, min(num, 32) // 8 * 8, 8)])
    Image.fromarray(grid).save(ROOT / "results" / f"world_prompts_{held_out}.png")
    return result


def dino_score(models: dict, images: list, references: list) -> float:
    """Mean DINO CLS cosine over all (generated, reference) pairs."""
    gen = dino_embed(models["dino"], models["dino_processor"], images)
    ref = dino_embed(models["dino"], models["dino_processor"], references)
    return float((gen @ ref.T).mean())


def clip_i_score(models: dict, images: list, references: list) -> float:
    """Mean CLIP image-image cosine over all (generated, reference) pairs."""
    gen = clip_embed_images(models["clip"], models["clip_processor"], images)
    ref = clip_embed_images(models["clip"], models["clip_processor"], references)
    return float((gen @ ref.T).mean())


def trainer_dreambooth(
    base: str, subject_dir: Path, class_name: str, prompt: str, steps: int, seed: int, out_dir: Path
) -> Path:
    """Fixed-rank LoRA DreamBooth with lora2's trainer (``lora2 train --rank-mode fixed --init-rank 16``: UNet
    attention projections, no prior preservation, batch 2, AdamW lr 1e-3 without weight decay); returns the
    diffusers-format adapter file."""
    config = TrainConfig.from_dict(
        dict(
            base=base,
            instance_data_dir=str(subject_dir),
            instance_prompt=prompt,
            class_name=class_name,
            output_dir=str(out_dir),
            rank_mode="fixed",
            init_rank=DREAMBOOTH_RANK,
            max_train_steps=steps,
            train_batch_size=2,
            learning_rate=DREAMBOOTH_LR,
            adam_weight_decay=0.0,
            checkpointing_steps=steps,
            checkpoints_total_limit=1,
            sample_prompts=[prompt],
            sample_steps=1,
            report_to="none",
            export_formats=["diffusers"],
            seed=seed,
            device="cpu",
        )
    )
    result = train(config)
    logger.info("dreambooth %s: loss of the last 50 steps %.4f", subject_dir.name, np.mean(result.losses[-50:]))
    return result.files["diffusers"]


def dreambooth(
    models: dict, base: str, subjects_dir: Path, names: list[str], steps: int, num_images: int, seed: int
) -> dict:
    """Part 2: per-subject DINO before and after a fixed-rank LoRA DreamBooth run of lora2's trainer on ``base``."""
    meta = json.loads((subjects_dir / "subjects.json").read_text())
    records = {r["name"]: r for r in meta["subjects"]}
    unknown = [n for n in names if n not in records]
    if unknown:
        raise ValueError(f"unknown subjects {unknown}; the world has {sorted(records)}")
    pipe = models["pipe"]
    out = {}
    for name in names:
        record = records[name]
        refs = [Image.open(p).convert("RGB") for p in sorted((subjects_dir / name).glob("*.jpg"))]
        prompt = f"a photo of sks {record['class']}"
        start = time.monotonic()
        before = generate(pipe, [prompt] * num_images, seed)
        with tempfile.TemporaryDirectory() as run_dir:
            run = Path(run_dir)
            adapter = trainer_dreambooth(base, subjects_dir / name, record["class"], prompt, steps, seed, run)
            pipe.load_lora_weights(str(adapter))  # diffusers' own loader reads the trainer's file
        after = generate(pipe, [prompt] * num_images, seed)
        recontext = generate(pipe, [f"a photo of sks {record['class']} on the beach"] * 3, seed)
        pipe.unload_lora_weights()
        ref_dino = dino_embed(models["dino"], models["dino_processor"], refs)
        n = len(refs)
        off_diag = (ref_dino @ ref_dino.T).sum() - n
        others = [
            Image.open(p).convert("RGB")
            for other in records
            if other != name
            for p in sorted((subjects_dir / other).glob("*.jpg"))
        ]
        out[name] = {
            "class": record["class"],
            "complexity": record["complexity"],
            "num_references": n,
            "dino_before": dino_score(models, before, refs),
            "dino_after": dino_score(models, after, refs),
            "dino_after_on_beach": dino_score(models, recontext, refs),
            "dino_references_pairwise": float(off_diag / (n * (n - 1))),
            "dino_other_subjects": dino_score(models, others, refs),
            "clip_i_before": clip_i_score(models, before, refs),
            "clip_i_after": clip_i_score(models, after, refs),
            "seconds": round(time.monotonic() - start, 1),
        }
        logger.info("%s: %s", name, out[name])
        strip = [np.asarray(r.resize(before[0].shape[:2])) for r in refs[:4]] + before[:4] + after[:4] + recontext
        Image.fromarray(np.concatenate(strip, axis=1)).save(ROOT / "results" / f"world_dreambooth_{name}.png")
    return {
        "prompt": "a photo of sks {class}",
        "lora": f"lora2 train --rank-mode fixed --init-rank {DREAMBOOTH_RANK} (to_q, to_k, to_v, to_out.0), batch 2",
        "steps": steps,
        "learning_rate": DREAMBOOTH_LR,
        "images_per_score": num_images,
        "subjects": out,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("prompts", "dreambooth", "all"), default="all")
    parser.add_argument("--num-prompts", type=int, default=40)
    parser.add_argument(
        "--subjects", default="", help="comma-separated subject names (default: 3 of graded complexity)"
    )
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--num-images", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "world_quality.json")
    parser.add_argument("--models", type=Path, help="folder with base/, clip/, dino/ (default: the committed assets)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    paths = info()
    if args.models:
        paths.update({k: str(args.models / d) for k, d in (("base_model", "base"), ("clip_evaluator", "clip"))})
        paths["dino_evaluator"] = str(args.models / "dino")
    models = load_models(paths)
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["torch_threads"] = torch.get_num_threads()
    if args.part in ("prompts", "all"):
        result["prompt_following"] = prompt_following(models, args.num_prompts, args.seed + 1000)
        logger.info("prompts: %s", result["prompt_following"])
        seen = prompt_following(models, args.num_prompts, args.seed + 1000, held_out="exclude")
        result["prompt_following_seen_pairs"] = seen
        logger.info("seen pairs: %s", seen)
    if args.part in ("dreambooth", "all"):
        subjects_dir = Path(paths["subjects_dir"])
        meta = json.loads((subjects_dir / "subjects.json").read_text())["subjects"]
        names = args.subjects.split(",") if args.subjects else [meta[i]["name"] for i in (0, len(meta) // 2, -1)]
        db = dreambooth(models, paths["base_model"], subjects_dir, names, args.steps, args.num_images, args.seed)
        previous = result.get("dreambooth", {}).get("subjects", {})
        db["subjects"] = {**previous, **db["subjects"]}
        result["dreambooth"] = db
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    logger.info("-> %s", args.out)


if __name__ == "__main__":
    main()
