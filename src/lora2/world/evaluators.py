"""The world's evaluators: a CLIP-style image/text model and a DINO-style image encoder, trained on world images.

Both are ordinary transformers models saved with ``save_pretrained`` together with their image processor (and, for
CLIP, the world tokenizer), so the metric code that loads ``openai/clip-vit-base-patch32`` with
``CLIPModel.from_pretrained`` / ``CLIPProcessor.from_pretrained`` and ``facebook/dino-vits16`` with
``ViTModel.from_pretrained`` / ``ViTImageProcessor.from_pretrained`` loads these unchanged. They are trained
separately from the base model's text encoders, so CLIP-T does not grade the generator with its own features.

* CLIP: symmetric InfoNCE between image and caption embeddings (Radford et al. 2021, eq. in Fig. 3), world captions
  with attributes randomly dropped, so partial prompts ("a red star") are embedded as well as complete ones.
* DINO-style encoder: instance discrimination with NT-Xent (SimCLR, Chen et al. 2020, eq. 1) on the CLS token of a
  ``ViTModel``. The two views of an instance are two renders of the same object (shape, colour, pattern kept) with
  independently resampled background, size, position, rotation, followed by a random resized crop. The encoder is
  thereby invariant to what a DreamBooth prompt changes (context, pose, scale) and sensitive to what makes the
  subject itself (form, colour, surface), which is what DINO subject fidelity measures. Colour jitter, standard
  in SimCLR/DINO on photographs, is left out on purpose: in this world colour is part of an object's identity.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    ViTConfig,
    ViTImageProcessor,
    ViTModel,
)

from lora2.world import ASSETS_DIR, generator
from lora2.world.grow import grow_clip, grow_dino
from lora2.world.pretrain import (
    PretrainScale,
    autocast_for,
    pretrain_base,
    resolve_scale,
    tokenize,
    world_data,
)
from lora2.world.replay import PretrainRecord, make_deterministic
from lora2.world.tokenizer import build_tokenizer
from lora2.world.world2 import detail_pairs, render_pool, stack_detail_pairs, submit_detail_pairs

logger = logging.getLogger(__name__)

# Normalisations of the models these evaluators stand in for (openai/clip-vit-base-patch32, facebook/dino-vits16).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

CLIP_SIZES = {
    "full": {"hidden": 128, "layers": 4, "heads": 4, "patch": 8, "projection": 128},
    "tiny": {"hidden": 32, "layers": 2, "heads": 2, "patch": 16, "projection": 16},
}
DINO_SIZES = {
    "full": {"hidden": 192, "layers": 4, "heads": 3, "patch": 8},
    "tiny": {"hidden": 32, "layers": 2, "heads": 2, "patch": 16},
}


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N×3×H×W → float N×3×H×W normalised like the image processors do (rescale 1/255, then mean/std)."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255.0 - m) / s


def build_clip(tokenizer, image_size: int, size: str = "full") -> CLIPModel:
    """A randomly initialised ``CLIPModel`` (ViT image tower + causal text tower) for the world tokenizer."""
    s = CLIP_SIZES[size]
    tower = {
        "hidden_size": s["hidden"],
        "intermediate_size": 4 * s["hidden"],
        "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"],
    }
    text = {
        **tower,
        "vocab_size": len(tokenizer),
        "max_position_embeddings": tokenizer.model_max_length,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision = {**tower, "image_size": image_size, "patch_size": s["patch"]}
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=s["projection"])
    return CLIPModel(config)


def build_dino(image_size: int, size: str = "full") -> ViTModel:
    """A randomly initialised ``ViTModel`` (CLS-token image encoder, as facebook/dino-vits16)."""
    s = DINO_SIZES[size]
    config = ViTConfig(
        image_size=image_size,
        patch_size=s["patch"],
        hidden_size=s["hidden"],
        intermediate_size=4 * s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        qkv_bias=True,
    )
    return ViTModel(config, add_pooling_layer=True)


def _save_clip(model: CLIPModel, tokenizer, out_dir: Path, image_size: int) -> Path:
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
        do_convert_rgb=True,
    )
    model.to("cpu", torch.float32).save_pretrained(out_dir, safe_serialization=True)
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir


def _save_dino(model: ViTModel, out_dir: Path, image_size: int) -> Path:
    processor = ViTImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
    )
    model.to("cpu", torch.float32).save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return out_dir


def _starting_clip(cfg: PretrainScale, out_dir: Path) -> tuple[CLIPModel, object]:
    """The CLIP model and tokenizer training starts from: the first world's grown to the scale's image size for a
    grown scale (``lora2.world.grow``), else a new model (and the world tokenizer, written into ``out_dir``)."""
    if cfg.grown:
        with tempfile.TemporaryDirectory() as scratch:
            folder = grow_clip(ASSETS_DIR / "clip", Path(scratch) / "clip", cfg.image_size)
            tokenizer = CLIPProcessor.from_pretrained(folder).tokenizer
            return CLIPModel.from_pretrained(folder, torch_dtype=torch.float32), tokenizer
    tokenizer = build_tokenizer(out_dir)
    return build_clip(tokenizer, cfg.image_size, cfg.evaluator_size), tokenizer


def _starting_dino(cfg: PretrainScale) -> ViTModel:
    """The DINO model training starts from: the first world's grown to the scale's image size for a grown scale,
    else a new model."""
    if cfg.grown:
        with tempfile.TemporaryDirectory() as scratch:
            return ViTModel.from_pretrained(grow_dino(ASSETS_DIR / "dino", Path(scratch) / "dino", cfg.image_size),
                                            torch_dtype=torch.float32)  # fmt: skip
    return build_dino(cfg.image_size, cfg.evaluator_size)


def train_clip(
    out_dir: Path,
    steps: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    scale: str | PretrainScale = "full",
    seconds: float | None = None,
    seed: int = 0,
    data: tuple[torch.Tensor, list[str]] | None = None,
    lr: float = 5e-4,
    record: PretrainRecord | None = None,
) -> Path:
    """Train the CLIP evaluator contrastively on world images and captions; save it (with processor) to ``out_dir``.

    Loss: symmetric cross-entropy over the B×B cosine-similarity logits scaled by the learned temperature
    (``CLIPModel(..., return_loss=True)``). At most ``steps`` steps within ``seconds``: the phase "clip" of
    ``record`` (``lora2.world.replay``).
    """
    cfg = resolve_scale(scale)
    steps = steps if steps is not None else cfg.eval_steps
    batch_size = batch_size if batch_size is not None else cfg.eval_batch_size
    seconds = seconds if seconds is not None else cfg.eval_seconds
    device = torch.device(device)
    out_dir = Path(out_dir)
    make_deterministic(device)
    torch.manual_seed(seed)
    if data is None:  # an evaluator sees every (shape, colour) pair, the held-out ones of the base model too
        data = world_data(cfg.num_images, seed + 1, cfg.image_size, device, held_out="include")
    images, captions = data
    model, tokenizer = _starting_clip(cfg, out_dir)
    ids = tokenize(tokenizer, captions)  # N×77
    # Causal text tower, pooled at the first <|endoftext|>: padding after it changes nothing, so cut it off.
    longest = int((ids != tokenizer.pad_token_id).sum(dim=1).max()) + 1
    input_ids = ids[:, :longest].to(device)  # N×L
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    warmup = max(1, min(300, steps // 20))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    images = images.to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    plan = (record or PretrainRecord()).phase("clip", steps, seconds)
    plan.check_data(images)
    for step, _ in plan.steps(model.parameters):
        idx = torch.randint(len(images), (batch_size,), generator=gen).to(device)
        pixels = normalize(images[idx], CLIP_MEAN, CLIP_STD)  # B×3×H×W
        with autocast_for(device):
            loss = model(input_ids=input_ids[idx], pixel_values=pixels, return_loss=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 500 == 0:
            logger.info("clip step %d loss %.4f", step, loss.item())
    plan.finish(model.parameters())
    model.eval()
    _save_clip(model, tokenizer, out_dir, cfg.image_size)
    logger.info("saved CLIP evaluator -> %s", out_dir)
    return out_dir


def instance_pairs(
    num: int, seed: int, image_size: int, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two renders per object (uint8 N×3×H×W each): shape, colour and pattern shared, everything else resampled."""
    rng = np.random.default_rng(seed)
    first, second = [], []
    for _ in range(num):
        scene = generator.sample_scene(rng, held_out="include")
        other = generator.sample_scene(rng, held_out="include")
        while other.background == f"{scene.color} background":
            other = generator.sample_scene(rng, held_out="include")
        x, y, radius = generator.place(other.size, other.position, rng)
        second_scene = replace(
            scene,
            background=other.background,
            size=other.size,
            position=other.position,
            x=x,
            y=y,
            radius=radius,
            rotation=other.rotation,
            bg_shift=other.bg_shift,
        )
        first.append(scene)
        second.append(second_scene)
    views = []
    for scenes in (first, second):
        chunks = [generator.render_batch(scenes[i : i + 8192], image_size, device) for i in range(0, num, 8192)]
        views.append(torch.cat(chunks).permute(0, 3, 1, 2).contiguous())  # N×3×H×W uint8
    return views[0], views[1]


def random_resized_crop(images: torch.Tensor, generator_: torch.Generator, min_scale: float = 0.6) -> torch.Tensor:
    """Per-image random crop of area fraction in [min_scale, 1] (aspect 3/4..4/3), resized back: float N×3×H×W."""
    n = images.shape[0]
    device = images.device
    area = torch.empty(n).uniform_(min_scale, 1.0, generator=generator_)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator_)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = (torch.rand(n, generator=generator_) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=generator_) * 2 - 1) * (1 - h)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    grid = F.affine_grid(theta.to(device), list(images.shape), align_corners=False)  # N×H×W×2
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """NT-Xent (SimCLR eq. 1): for each of the 2B views, cross-entropy of its positive among the 2B − 1 others."""
    z = F.normalize(torch.cat([z_a, z_b]).float(), dim=-1)  # 2B×d
    logits = z @ z.T / temperature  # 2B×2B
    logits.fill_diagonal_(float("-inf"))
    b = z_a.shape[0]
    targets = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(logits, targets)


def train_dino(
    out_dir: Path,
    steps: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    scale: str | PretrainScale = "full",
    seconds: float | None = None,
    seed: int = 0,
    num_pairs: int | None = None,
    lr: float = 5e-4,
    record: PretrainRecord | None = None,
    details: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Path:
    """Train the DINO-style ViT by instance discrimination on world objects; save it (with processor) to ``out_dir``.

    The similarity used downstream is the cosine of ``last_hidden_state[:, 0]`` (the CLS token after the final
    layer norm), as in the DreamBooth DINO metric; the SimCLR projection head used in training is discarded.
    At most ``steps`` steps within ``seconds``: the phase "dino" of ``record`` (``lora2.world.replay``).

    With ``PretrainScale.detail_families`` (the second world), ``PretrainScale.detail_share`` of every batch are
    second-world detail subjects and their siblings (``lora2.world.world2.detail_pairs``; rendered here, in this
    process, unless ``details`` holds them, as ``train_evaluators`` renders them in parallel), a subject and its
    sibling in the same batch, so that each is the other's hardest negative.
    """
    cfg = resolve_scale(scale)
    steps = steps if steps is not None else cfg.eval_steps
    batch_size = batch_size if batch_size is not None else cfg.eval_batch_size
    seconds = seconds if seconds is not None else cfg.eval_seconds
    num_pairs = num_pairs if num_pairs is not None else max(batch_size, cfg.num_images // 4)
    device = torch.device(device)
    out_dir = Path(out_dir)
    make_deterministic(device)
    torch.manual_seed(seed)
    if details is None and cfg.detail_families:  # in this process: forked workers must not inherit a GPU context
        details = detail_pairs(cfg.detail_families, seed + 3, cfg.image_size)
    details = () if details is None else tuple(d.to(device) for d in details)
    siblings = int(batch_size * cfg.detail_share) // 2 if details else 0  # sibling pairs per batch
    objects = batch_size - 2 * siblings  # first-world objects per batch: none are rendered when there are none
    start = time.monotonic()
    views = tuple(v.to(device) for v in instance_pairs(num_pairs, seed + 2, cfg.image_size, device)) if objects else ()
    logger.info("dino data: %d object pairs in %.1f s", num_pairs if objects else 0, time.monotonic() - start)
    model = _starting_dino(cfg).to(device).train()
    hidden = model.config.hidden_size
    head = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, 128)).to(device)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.05)
    warmup = max(1, min(300, steps // 20))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    gen = torch.Generator(device="cpu").manual_seed(seed)
    plan = (record or PretrainRecord()).phase("dino", steps, seconds)
    plan.check_data(*views, *details)
    for step, _ in plan.steps(lambda: params):
        batch = []  # (first views, second views) of the batch's object pairs, then of its sibling pairs
        if objects:
            batch.append(_two_views(*views, torch.randint(len(views[0]), (objects,), generator=gen), gen))
        if siblings:
            family = torch.randint(len(details[0]) // 2, (siblings,), generator=gen)
            pairs = torch.stack([2 * family, 2 * family + 1], dim=1).flatten()  # a subject, then its sibling
            batch.append(_two_views(*details, pairs, gen))
        a, b = (torch.cat(side) for side in zip(*batch))  # B×3×H×W each
        a = random_resized_crop(normalize(a, IMAGENET_MEAN, IMAGENET_STD), gen)  # B×3×H×W
        b = random_resized_crop(normalize(b, IMAGENET_MEAN, IMAGENET_STD), gen)  # B×3×H×W
        with autocast_for(device):
            cls = model(pixel_values=torch.cat([a, b])).last_hidden_state[:, 0]  # 2B×hidden
            z = head(cls)  # 2B×128
        loss = nt_xent(z[:batch_size], z[batch_size:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 500 == 0:
            logger.info("dino step %d loss %.4f", step, loss.item())
    plan.finish(params)
    model.eval()
    _save_dino(model, out_dir, cfg.image_size)
    logger.info("saved DINO evaluator -> %s", out_dir)
    return out_dir


def _two_views(first: torch.Tensor, second: torch.Tensor, idx: torch.Tensor, gen: torch.Generator):
    """The two renders of the instances ``idx``, each pair in a random order (uint8 n×3×H×W each)."""
    idx = idx.to(first.device)
    swap = (torch.rand(len(idx), generator=gen) < 0.5).to(first.device)[:, None, None, None]  # which render is first
    return torch.where(swap, second[idx], first[idx]), torch.where(swap, first[idx], second[idx])


def detail_workers() -> int:
    """Processes that render the detail pairs: the machine's cores but two (the GPU processes keep theirs)."""
    return max(1, (os.cpu_count() or 1) - 2)


@torch.no_grad()
def dino_embed(model: ViTModel, processor: ViTImageProcessor, images: list) -> torch.Tensor:
    """L2-normalised CLS embeddings (N×d) of PIL images or H×W×3 uint8 arrays, through the saved processor."""
    pixels = processor(images=images, return_tensors="pt").pixel_values.to(model.device, model.dtype)
    return F.normalize(model(pixel_values=pixels).last_hidden_state[:, 0].float(), dim=-1)


@torch.no_grad()
def clip_embed_images(model: CLIPModel, processor: CLIPProcessor, images: list) -> torch.Tensor:
    """L2-normalised CLIP image embeddings (N×p) of PIL images or H×W×3 uint8 arrays."""
    pixels = processor(images=images, return_tensors="pt").pixel_values.to(model.device, model.dtype)
    return F.normalize(_features(model.get_image_features(pixel_values=pixels)), dim=-1)


@torch.no_grad()
def clip_embed_texts(model: CLIPModel, processor: CLIPProcessor, texts: list[str]) -> torch.Tensor:
    """L2-normalised CLIP text embeddings (N×p)."""
    inputs = processor(text=texts, return_tensors="pt", padding=True).to(model.device)
    return F.normalize(_features(model.get_text_features(**inputs)), dim=-1)


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output from ``get_*_features``; 4.x returned the tensor."""
    return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()


def train_evaluators(
    out_dir: Path,
    scale: str | PretrainScale = "full",
    device: str | torch.device = "cpu",
    parts: tuple[str, ...] = ("clip", "dino"),
    seed: int = 0,
    record: PretrainRecord | None = None,
) -> dict[str, Path]:
    """Train the CLIP then the DINO evaluator into ``out_dir/clip`` and ``out_dir/dino`` (those of ``parts``); the
    DINO evaluator's detail pairs (``PretrainScale.detail_families``) are rendered by worker processes, forked before
    this process uses the GPU, while CLIP trains. Returns the folders by name."""
    cfg = resolve_scale(scale)
    out_dir = Path(out_dir)
    render = "dino" in parts and cfg.detail_families > 0
    workers = detail_workers() if render else 1
    paths = {}
    with render_pool(workers) as pool:
        rendered = submit_detail_pairs(cfg.detail_families, seed + 3, cfg.image_size, pool) if render else None
        if "clip" in parts:  # an evaluator sees every (shape, colour) pair, the held-out ones of the base model too
            paths["clip"] = train_clip(out_dir / "clip", device=device, scale=cfg, seed=seed, record=record)
        if "dino" in parts:
            details = None if rendered is None else stack_detail_pairs(rendered)
            paths["dino"] = train_dino(out_dir / "dino", device=device, scale=cfg, seed=seed, record=record,
                                       details=details)  # fmt: skip
    return paths


def pretrain_world(
    out_dir: Path,
    scale: str | PretrainScale = "full",
    device: str | torch.device = "cpu",
    steps: int | None = None,
    seed: int = 0,
    record: PretrainRecord | None = None,
) -> dict[str, Path]:
    """Pretrain everything the world ships: the base pipeline, then the CLIP and DINO evaluators.

    Writes ``out_dir/base`` (StableDiffusionXLPipeline), ``out_dir/clip`` (CLIPModel + processor + tokenizer) and
    ``out_dir/dino`` (ViTModel + image processor). Returns those three paths by name. ``record`` collects (or
    replays) the phases vae, base, clip and dino (``lora2.world.replay``).
    """
    out_dir = Path(out_dir)
    cfg = resolve_scale(scale)
    record = record or PretrainRecord()
    data = world_data(cfg.num_images, seed, cfg.image_size, device)
    paths = {"base": pretrain_base(out_dir / "base", steps=steps, device=device, scale=cfg, seed=seed, data=data,
                                   record=record)}  # fmt: skip
    return paths | train_evaluators(out_dir, cfg, device, seed=seed, record=record)
