"""Pretraining of the world's base model: a real SDXL-architecture pipeline trained from scratch on world images.

Three phases, each a plain diffusers / transformers model trained with its usual objective:

1. ``AutoencoderKL`` (64 px → 4×16×16 latents): reconstruction ``L1 + MSE`` plus a small KL term
   (``kl_weight · KL(q(z|x) ‖ N(0, I))``, as the LDM autoencoder without its perceptual/GAN terms); afterwards
   ``scaling_factor = 1 / std(z)`` over a batch of posterior samples, so scaled latents have unit variance.
2. The two CLIP text encoders and the ``UNet2DConditionModel`` (``text_time`` added conditioning) trained jointly
   with the ε-prediction denoising loss of DDPM on the scaled latents, with min-SNR-γ loss weighting
   (Hang et al. 2023, w(t) = min(SNR(t), γ) / SNR(t)). The text path is SDXL's exactly: penultimate hidden states
   of both encoders concatenated as ``encoder_hidden_states``, the pooled projection of the second as
   ``text_embeds``, the six SDXL micro-conditioning numbers (original size, crop corner, target size) as
   ``time_ids``. With probability ``caption_dropout`` a sample's text conditioning is replaced by zeros, which is
   what the SDXL pipeline feeds as unconditional input for classifier-free guidance
   (``force_zeros_for_empty_prompt=True``).
3. Saving: ``StableDiffusionXLPipeline.save_pretrained`` in fp16 safetensors with an ``EulerDiscreteScheduler``
   of SDXL's settings.

The pipeline skeleton (configs, tokenizers) is built by ``lora2.world.tiny.build_tiny_sdxl``; ``SCALES`` holds the
component sizes of the committed model ("full"), of the CPU test ("tiny") and of the second world ("world2": 128 px,
the first world's models grown by ``lora2.world.grow`` and trained on, with no VAE phase; docs/WORLD.md, "Second
world"; "world2-tiny" is its CPU smoke test).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionXLPipeline

from lora2.world import ASSETS_DIR, generator
from lora2.world.grow import WORLD2_DEPTHS, grow_base
from lora2.world.replay import PretrainRecord, make_deterministic
from lora2.world.tiny import build_tiny_sdxl

logger = logging.getLogger(__name__)


@dataclass
class PretrainScale:
    """Sizes and budgets of one pretraining run (``SCALES`` holds the named ones).

    Budgets are upper bounds: a phase runs at most ``*_steps`` steps, as many as its wall-clock budget
    ``*_seconds`` allows at the step rate measured over its first steps, and the count is recorded so that the run
    can be replayed step for step (``lora2.world.replay``). ``base_warmup``: warm-up steps of the denoising phase.
    ``grown``: pretraining starts from the first world's committed models grown to this scale (``lora2.world.grow``:
    the UNet to ``unet_config``'s transformer depths, the evaluators to ``image_size``), the VAE kept as it is.
    ``detail_families``: second-world detail subjects and their siblings in the DINO evaluator's data
    (``lora2.world.world2.detail_pairs``), ``detail_share`` of each of its batches.
    """

    image_size: int = 64
    num_images: int = 200_000
    vae_config: dict[str, Any] = field(default_factory=dict)
    unet_config: dict[str, Any] = field(default_factory=dict)
    text_config: dict[str, Any] = field(default_factory=dict)
    vae_steps: int = 20000
    vae_batch_size: int = 128
    vae_lr: float = 1e-3
    vae_seconds: float = 150.0
    kl_weight: float = 1e-6
    base_steps: int = 20000
    base_batch_size: int = 512
    base_lr: float = 5e-4
    base_seconds: float = 280.0
    base_warmup: int = 500
    caption_dropout: float = 0.1
    snr_gamma: float = 5.0
    eval_steps: int = 6000
    eval_batch_size: int = 512
    eval_seconds: float = 110.0
    evaluator_size: str = "full"
    grown: bool = False
    detail_families: int = 0
    detail_share: float = 0.5


FULL_VAE = {
    "block_out_channels": (64, 128, 128),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "force_upcast": False,
}
FULL_UNET = {
    "block_out_channels": (48, 96, 144),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 1, 1),
    "attention_head_dim": (2, 4, 6),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 32,
    "norm_num_groups": 16,
}
FULL_TEXT = {
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "projection_dim": 64,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
}

# The second world (issue 19): 128 px → 4×32×32 latents through the first world's VAE; the first world's UNet grown
# to transformer depths -/4/4 (lora2.world.grow: SDXL's layout, no attention at the first level and deeper
# transformers lower down, as SDXL's -/2/10 at widths 320/640/1280), so that LoRA meets 224 attention projections of
# four shapes (96×96, 144×144, 128→96, 128→144).
WORLD2_UNET = {**FULL_UNET, "transformer_layers_per_block": WORLD2_DEPTHS}

SCALES: dict[str, PretrainScale] = {
    "full": PretrainScale(vae_config=FULL_VAE, unet_config=FULL_UNET, text_config=FULL_TEXT),
    # world2 continues from the first world's models, grown (``grown``: no VAE phase); its budgets keep the whole
    # pretraining, and each later replay of it, inside one 10-minute device call: the base (data, latents, UNet,
    # save) runs beside the two evaluators on one GPU
    "world2": PretrainScale(
        image_size=128,
        num_images=100_000,
        vae_config=FULL_VAE,
        unet_config=WORLD2_UNET,
        text_config=FULL_TEXT,
        base_batch_size=1024,
        base_lr=1e-3,
        base_seconds=400.0,
        base_warmup=100,
        eval_seconds=190.0,
        grown=True,
        detail_families=12_000,
        detail_share=1.0,  # docs/WORLD.md: all-sibling batches saw the detail better than half-sibling ones (CPU)
    ),
    "tiny": PretrainScale(
        image_size=32,
        num_images=16,
        vae_steps=2,
        vae_batch_size=4,
        vae_seconds=60.0,
        base_steps=2,
        base_batch_size=4,
        base_seconds=60.0,
        eval_steps=2,
        eval_batch_size=8,
        eval_seconds=60.0,
        evaluator_size="tiny",
    ),
}
# world2's architecture at the CPU test's data, steps, batches and budgets: the smoke test of benchmarks/gpu_world2.sh
_BUDGET_KEYS = ("num_images", "vae_steps", "vae_batch_size", "vae_seconds", "base_steps", "base_batch_size",
                "base_seconds", "eval_steps", "eval_batch_size", "eval_seconds", "evaluator_size")  # fmt: skip
SCALES["world2-tiny"] = replace(
    SCALES["world2"], **{key: getattr(SCALES["tiny"], key) for key in _BUDGET_KEYS}, detail_families=4
)


def world_data(
    num_images: int,
    seed: int,
    image_size: int,
    device: str | torch.device = "cpu",
    chunk: int = 8192,
    held_out: str = "exclude",
) -> tuple[torch.Tensor, list[str]]:
    """``num_images`` pretraining images (uint8, N×3×H×W, on CPU) and their varied captions, from the generator.

    ``held_out``: "exclude" leaves out the held-out (shape, colour) pairs (the base model's data), "include" draws
    every pair (the evaluators' data); ``device`` is where images are rendered.
    """
    images, captions = [], []
    for start in range(0, num_images, chunk):
        n = min(chunk, num_images - start)
        batch, caps, _ = generator.sample_batch(
            n, seed=seed * 1_000_003 + start, size=image_size, varied_captions=True, device=device, held_out=held_out
        )
        images.append(torch.from_numpy(np.ascontiguousarray(batch)).permute(0, 3, 1, 2))  # n×3×H×W uint8
        captions.extend(caps)
    return torch.cat(images), captions


def to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 N×3×H×W → float in [-1, 1] (the VAE's input range)."""
    return images.float().div(127.5).sub(1.0)


def autocast_for(device: torch.device):
    """bf16 autocast on a GPU, nothing on the CPU (the world's pretraining precision)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def warmup_cosine(step: int, progress: float, warmup: int, floor: float = 0.01) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay over ``progress`` ∈ [0, 1]
    from 1 to ``floor`` (Loshchilov & Hutter 2017, SGDR eq. 5 without restarts)."""
    return min(1.0, (step + 1) / warmup) * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_vae(
    vae: AutoencoderKL,
    images: torch.Tensor,
    steps: int,
    batch_size: int,
    device: torch.device,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seconds: float = math.inf,
    seed: int = 0,
    record: PretrainRecord | None = None,
) -> float:
    """Train ``vae`` in place on uint8 ``images`` (N×3×H×W, on ``device``) and set its ``scaling_factor``.

    Loss: |x − x̂|₁ + |x − x̂|² + kl_weight · KL(q(z|x) ‖ N(0, I)), with x̂ decoded from a posterior sample.
    At most ``steps`` steps within ``seconds`` (``lora2.world.replay``: the phase "vae" of ``record``).
    Returns the final reconstruction MSE on a held batch (in [-1, 1] units).
    """
    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    loss = torch.zeros(())
    plan = (record or PretrainRecord()).phase("vae", steps, seconds)
    plan.check_data(images)
    for step, progress in plan.steps(vae.parameters):
        _set_lr(optimizer, lr * warmup_cosine(step, progress, warmup=100))
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        x = to_unit_range(images[idx.to(images.device)].to(device))  # B×3×H×W
        with autocast_for(device):
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample()).sample  # B×3×H×W
        recon = recon.float()
        kl = posterior.kl().mean() / x[0].numel()
        loss = (recon - x).abs().mean() + (recon - x).square().mean() + kl_weight * kl
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 500 == 0:
            logger.info("vae step %d loss %.4f", step, loss.item())
    plan.finish(vae.parameters())
    vae.eval()
    with torch.no_grad(), autocast_for(device):
        x = to_unit_range(images[: min(len(images), 512)].to(device))
        z = vae.encode(x).latent_dist.sample()  # B×C×h×w
        mse = (vae.decode(z).sample.float() - x).square().mean().item()
    scaling = 1.0 / z.float().std().item()
    vae.register_to_config(scaling_factor=scaling)
    logger.info("vae: reconstruction MSE %.5f, latent std %.4f -> scaling_factor %.4f", mse, 1 / scaling, scaling)
    return mse


@torch.no_grad()
def encode_latents(vae: AutoencoderKL, images: torch.Tensor, device: torch.device, batch_size: int = 1024):
    """Posterior mean and std of every image, already multiplied by the VAE's ``scaling_factor`` (N×C×h×w each)."""
    means, stds = [], []
    scale = vae.config.scaling_factor
    for start in range(0, len(images), batch_size):
        x = to_unit_range(images[start : start + batch_size].to(device))
        with autocast_for(device):
            dist = vae.encode(x).latent_dist
        means.append(dist.mean.float() * scale)
        stds.append(dist.std.float() * scale)
    return torch.cat(means), torch.cat(stds)


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    """Token ids exactly as ``StableDiffusionXLPipeline.encode_prompt`` makes them (padded to model_max_length).

    Each distinct caption is tokenized once (N×L long tensor).
    """
    unique = sorted(set(captions))
    ids = tokenizer(
        unique, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids  # U×L
    row = {text: i for i, text in enumerate(unique)}
    return ids[torch.tensor([row[text] for text in captions], dtype=torch.long)]  # N×L


def encode_text(pipe: StableDiffusionXLPipeline, ids_1: torch.Tensor, ids_2: torch.Tensor):
    """SDXL's text conditioning: (penultimate hidden states of both encoders concatenated, pooled projection).

    Same computation as ``StableDiffusionXLPipeline.encode_prompt`` with ``clip_skip=None``, with gradients.
    Returns prompt_embeds B×L×(d₁+d₂) and pooled B×p.
    """
    out_1 = pipe.text_encoder(ids_1, output_hidden_states=True)
    out_2 = pipe.text_encoder_2(ids_2, output_hidden_states=True)
    prompt_embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)  # B×L×(d₁+d₂)
    return prompt_embeds, out_2.text_embeds  # B×p


def time_ids(image_size: int, batch_size: int, device: torch.device) -> torch.Tensor:
    """SDXL micro-conditioning (original H, W, crop top, crop left, target H, W) for uncropped world images."""
    row = torch.tensor([image_size, image_size, 0, 0, image_size, image_size], dtype=torch.float32, device=device)
    return row.expand(batch_size, 6)  # B×6


def train_base(
    pipe: StableDiffusionXLPipeline,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    ids_1: torch.Tensor,
    ids_2: torch.Tensor,
    steps: int,
    batch_size: int,
    device: torch.device,
    lr: float = 5e-4,
    caption_dropout: float = 0.1,
    snr_gamma: float = 5.0,
    seconds: float = math.inf,
    image_size: int = 64,
    ema_decay: float = 0.999,
    seed: int = 0,
    warmup_steps: int = 500,
    record: PretrainRecord | None = None,
) -> float:
    """Train the UNet and both text encoders of ``pipe`` jointly, in place, with the min-SNR-γ ε-prediction loss.

    ε-prediction DDPM loss (Ho et al. 2020, eq. 14) on x_t = √ᾱ_t x₀ + √(1−ᾱ_t) ε with x₀ ~ q(z|x), weighted by
    min(SNR(t), γ) / SNR(t), SNR(t) = ᾱ_t / (1 − ᾱ_t) (Hang et al. 2023). The trained modules end holding the
    exponential moving average of their weights (decay ``ema_decay``). At most ``steps`` steps within ``seconds``
    (``lora2.world.replay``: the phase "base" of ``record``), the learning rate warmed up over ``warmup_steps`` (at
    most a twentieth of ``steps``). Returns the mean loss over the last 100 steps (every tenth).
    """
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
    snr = alphas_cumprod / (1.0 - alphas_cumprod)  # T
    weights = torch.clamp(snr, max=snr_gamma) / snr  # T
    modules = [pipe.unet, pipe.text_encoder, pipe.text_encoder_2]
    params = [p for m in modules for p in m.to(device).train().parameters()]
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=fused)
    warmup = max(1, min(warmup_steps, steps // 20))
    add_time_ids = time_ids(image_size, batch_size, device)
    ids_1, ids_2 = ids_1.to(latent_mean.device), ids_2.to(latent_mean.device)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    recent: list[float] = []
    plan = (record or PretrainRecord()).phase("base", steps, seconds)
    plan.check_data(latent_mean)
    for step, progress in plan.steps(lambda: params):
        _set_lr(optimizer, lr * warmup_cosine(step, progress, warmup))
        idx = torch.randint(len(latent_mean), (batch_size,), generator=gen).to(latent_mean.device)
        x0 = latent_mean[idx] + latent_std[idx] * torch.randn_like(latent_std[idx])  # B×C×h×w
        x0 = x0.to(device)
        noise = torch.randn_like(x0)
        t = torch.randint(0, len(alphas_cumprod), (batch_size,), device=device)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        drop = (torch.rand(batch_size, device=device) < caption_dropout).float()  # B
        with autocast_for(device):
            prompt_embeds, pooled = encode_text(pipe, ids_1[idx].to(device), ids_2[idx].to(device))
            prompt_embeds = prompt_embeds * (1.0 - drop)[:, None, None]  # B×L×D, zeros = unconditional
            pooled = pooled * (1.0 - drop)[:, None]  # B×p
            pred = pipe.unet(
                noisy,
                t,
                encoder_hidden_states=prompt_embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": add_time_ids},
            ).sample  # B×C×h×w
        per_sample = (pred.float() - noise).square().mean(dim=(1, 2, 3))  # B
        loss = (weights[t] * per_sample).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            # EMA θ̄ ← θ̄ + (1 − β)(θ − θ̄) with the warm-up β = min(β_max, (1 + k) / (10 + k)).
            torch._foreach_lerp_(ema, params, 1.0 - min(ema_decay, (1 + step) / (10 + step)))
        if step % 10 == 0:
            recent = [*recent[-9:], loss.item()]
        if step % 500 == 0:
            logger.info("base step %d loss %.4f", step, loss.item())
    with torch.no_grad():
        for param, average in zip(params, ema):
            param.copy_(average)
    plan.finish(params)
    for module in modules:
        module.eval()
    return float(np.mean(recent)) if recent else float("nan")


def default_fp32_loading(pipeline_dir: Path) -> None:
    """Make plain ``from_pretrained`` load the fp16 text encoders in fp32, as diffusers loads the UNet and VAE.

    transformers 5 loads in the dtype a config records ("dtype": "float16" after saving fp16 weights) while
    diffusers loads fp32; mixed dtypes break ``StableDiffusionXLPipeline.from_pretrained(path)`` on CPU. The
    weights stay fp16 on disk; ``torch_dtype=torch.float16`` still loads everything in fp16.
    """
    for name in ("text_encoder", "text_encoder_2"):
        path = Path(pipeline_dir) / name / "config.json"
        config = json.loads(path.read_text())
        config["dtype"] = "float32"
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def save_pipeline(pipe: StableDiffusionXLPipeline, out_dir: Path) -> Path:
    """Save ``pipe`` as an fp16-safetensors ``StableDiffusionXLPipeline`` directory."""
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.to("cpu", torch.float16)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    default_fp32_loading(Path(out_dir))
    size = sum(f.stat().st_size for f in Path(out_dir).rglob("*") if f.is_file())
    logger.info("saved base pipeline (%.1f MB) -> %s", size / 1e6, out_dir)
    return Path(out_dir)


def pretrain_base(
    out_dir: Path,
    steps: int | None = None,
    batch_size: int | None = None,
    device: str | torch.device = "cpu",
    scale: str | PretrainScale = "full",
    seconds: float | None = None,
    seed: int = 0,
    data: tuple[torch.Tensor, list[str]] | None = None,
    init_from: str | Path | None = None,
    record: PretrainRecord | None = None,
) -> Path:
    """Pretrain the world's SDXL-architecture base model and save it as a pipeline directory in ``out_dir``.

    Args:
        out_dir: output pipeline directory (fp16 safetensors; loads with
            ``StableDiffusionXLPipeline.from_pretrained``).
        steps: denoising training steps (default: the scale's ``base_steps``); the VAE phase uses the scale's.
        batch_size: denoising batch size (default: the scale's).
        device: torch device ("cuda" for the real run).
        scale: a name in ``SCALES`` or a ``PretrainScale``.
        seconds: wall-clock budget of the denoising phase (default: the scale's ``base_seconds``).
        seed: seed of initialisation, data and noise.
        data: (uint8 N×3×H×W images, captions) to train on instead of ``world_data`` of the scale's size.
        init_from: a saved base pipeline to continue from: its VAE is kept as it is (no VAE phase) and the UNet
            and text encoders train on with a fresh optimizer, warm-up and schedule, so that a run longer than one
            time budget can be split into several (the saved weights are the EMA of the previous run). A grown
            scale (``PretrainScale.grown``) without it continues from the first world's base grown to the scale.
        record: collects the phases' step counts and fingerprints, or replays a recorded run
            (``lora2.world.replay``); the kernels are deterministic on a GPU either way.
    """
    cfg = resolve_scale(scale)
    cfg = replace(
        cfg,
        base_steps=steps if steps is not None else cfg.base_steps,
        base_batch_size=batch_size if batch_size is not None else cfg.base_batch_size,
        base_seconds=seconds if seconds is not None else cfg.base_seconds,
    )
    device = torch.device(device)
    record = record or PretrainRecord()
    make_deterministic(device)
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    start = time.monotonic()
    images, captions = data if data is not None else world_data(cfg.num_images, seed, cfg.image_size, device)
    logger.info("world data: %d images in %.1f s", len(images), time.monotonic() - start)
    images = images.to(device)
    pipe = _pipeline_with_vae(cfg, images, device, seed, init_from, record)
    latent_mean, latent_std = encode_latents(pipe.vae, images, device)
    del images
    ids_1 = tokenize(pipe.tokenizer, captions)  # N×L
    ids_2 = tokenize(pipe.tokenizer_2, captions)  # N×L
    loss = train_base(
        pipe,
        latent_mean,
        latent_std,
        ids_1,
        ids_2,
        cfg.base_steps,
        cfg.base_batch_size,
        device,
        lr=cfg.base_lr,
        caption_dropout=cfg.caption_dropout,
        snr_gamma=cfg.snr_gamma,
        seconds=cfg.base_seconds,
        image_size=cfg.image_size,
        seed=seed,
        warmup_steps=cfg.base_warmup,
        record=record,
    )
    logger.info("base: final loss %.4f after %.0f s in all", loss, time.monotonic() - start)
    path = save_pipeline(pipe, Path(out_dir))
    if init_from is not None or cfg.grown:
        _keep_tokenizers(Path(init_from or ASSETS_DIR / "base"), path)
    return path


def _pipeline_with_vae(
    cfg: PretrainScale,
    images: torch.Tensor,
    device: torch.device,
    seed: int,
    init_from: str | Path | None,
    record: PretrainRecord,
) -> StableDiffusionXLPipeline:
    """The pipeline whose UNet and text encoders pretraining trains: continued from ``init_from`` or, for a grown
    scale, from the first world's base grown to it (VAE kept as it is either way), or initialised at random with its
    VAE trained first on ``images``."""
    if init_from is not None or cfg.grown:
        with tempfile.TemporaryDirectory() as scratch:
            if init_from is None:
                depths = tuple(cfg.unet_config["transformer_layers_per_block"])
                init_from = grow_base(ASSETS_DIR / "base", Path(scratch) / "base", depths, seed)
            pipe = StableDiffusionXLPipeline.from_pretrained(init_from, torch_dtype=torch.float32)
        pipe.vae.to(device).eval()
        logger.info("continuing from %s (VAE kept, scaling_factor %.4f)", init_from, pipe.vae.config.scaling_factor)
        return pipe
    pipe = initial_pipeline(cfg, seed)
    train_vae(
        pipe.vae,
        images,
        cfg.vae_steps,
        cfg.vae_batch_size,
        device,
        lr=cfg.vae_lr,
        kl_weight=cfg.kl_weight,
        seconds=cfg.vae_seconds,
        seed=seed,
        record=record,
    )
    return pipe


def _keep_tokenizers(source: Path, out_dir: Path) -> None:
    """Give a continued base its source's tokenizer files byte for byte: re-saving them through transformers adds
    the defaults of whichever version runs (seen with 5.17), changing files whose vocabulary did not change."""
    for name in ("tokenizer", "tokenizer_2"):
        shutil.rmtree(out_dir / name)
        shutil.copytree(source / name, out_dir / name)


def initial_pipeline(scale: str | PretrainScale, seed: int = 0) -> StableDiffusionXLPipeline:
    """The randomly initialised pipeline of a scale's component sizes, the one pretraining starts from."""
    cfg = resolve_scale(scale)
    with tempfile.TemporaryDirectory() as skeleton:
        build_tiny_sdxl(
            Path(skeleton) / "init",
            seed=seed,
            image_size=cfg.image_size,
            unet_config=cfg.unet_config or None,
            text_config=cfg.text_config or None,
            vae_config=cfg.vae_config or None,
        )
        return StableDiffusionXLPipeline.from_pretrained(Path(skeleton) / "init", torch_dtype=torch.float32)


def component_sizes(pipe: StableDiffusionXLPipeline, image_size: int) -> dict[str, Any]:
    """Parameters of each component of a base pipeline, their fp16 bytes, and the latent shape of ``image_size``."""
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    parameters = {name: sum(p.numel() for p in getattr(pipe, name).parameters()) for name in names}
    side = image_size // 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    return {
        "image_size": image_size,
        "latent_shape": [pipe.vae.config.latent_channels, side, side],
        "parameters": parameters,
        "total_parameters": sum(parameters.values()),
        "fp16_bytes": 2 * sum(parameters.values()),
    }


def resolve_scale(scale: str | PretrainScale) -> PretrainScale:
    """A ``PretrainScale`` given itself or by name in ``SCALES``."""
    if isinstance(scale, PretrainScale):
        return scale
    if scale not in SCALES:
        raise ValueError(f"unknown pretraining scale {scale!r}; choose one of {sorted(SCALES)}")
    return SCALES[scale]
