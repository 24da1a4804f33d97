"""DreamBooth training with LoRA² (or fixed-rank LoRA): one visible loop, in the style of a torchtune recipe.

The peft baselines (``adapter_type`` "dora" / "adalora", ``lora2.train.peft_adapters``) run through the same loop:
their regularization term is AdaLoRA's orthogonal regularization (none for DoRA), and AdaLoRA's budget allocation
``update_and_allocate(step)`` runs after each optimizer step, before the gradients are cleared.

Loss per optimizer step (LoRA², eq. of L_total):

    L = MSE(ε̂ or v̂) + w_prior · MSE_prior + λ_r Σ_ℓ |ν_ℓ − ν_target| + λ_w Σθ²/2 + λ_e · H(identifier maps)

Ranks change after every ``optimizer.step()`` (the post-step hook that ``lora2.inject`` installs), so parameters are
re-allocated during training. Multi-process training (``torchrun`` / ``accelerate launch``) therefore does not wrap
the UNet in DDP (its reducer holds fixed parameter lists): the gradients of all trainable parameters are averaged
with one flattened ``all_reduce`` after backward, so ν, and thus every rank, stay identical on every process; the
rank vectors are compared across processes every ``rank_check_steps`` and at the end.

Random state: the global torch RNG is seeded identically on every process (adapter init and the fresh rows of
growing ranks come from it, so they match across processes); per-process noise, timesteps, flips and crops come
from the trainer's own ``torch.Generator`` (seed + process index); the data order is a pure function of (seed, step).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from torch import nn
from tqdm.auto import tqdm

import lora2
from lora2.lora.model import lora_layers
from lora2.train import checkpoint as ckpt
from lora2.train import peft_adapters
from lora2.train.config import TrainConfig
from lora2.train.data import IMAGE_SUFFIXES, TrainImage, batch_indices, crop_and_flip, list_images, prepare_image
from lora2.train.entropy import EntropyCollector, install_entropy_processors
from lora2.train.model import (
    Components,
    add_time_ids,
    encode_prompts,
    identifier_positions,
    latent_distribution,
    load_components,
    native_resolution,
    resolve_base,
)
from lora2.train.outputs import METHOD_LABELS, image_grid, rank_heatmap, save_adapter, write_model_card

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
CONFIG_FILE = "train_config.yaml"
# what a run writes into its output folder (all removed by --overwrite; the class-image cache is kept)
RUN_ARTIFACTS = (
    CONFIG_FILE,
    LOG_FILE,
    "README.md",
    "peft",
    "rank_heatmap.png",
    "sample_grid.png",
    "samples",
    "tensorboard",
    "validation",
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    """What a run produced. status: "completed" or "interrupted" (SIGTERM/SIGINT: checkpoint written).

    ranks: final rank per module (``<prefix>.<module>``); losses: total loss per step of this run;
    adapter_state: every layer's full storage (A, B, log ν), as written into checkpoints.
    """

    output_dir: Path
    step: int
    status: str
    ranks: dict[str, int]
    files: dict[str, Path] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    adapter_state: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------------- processes
@dataclass
class _Processes:
    rank: int = 0
    world_size: int = 1
    created_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _init_processes() -> _Processes:
    """Join the process group of torchrun / accelerate launch (env WORLD_SIZE > 1), or reuse an initialised one."""
    if dist.is_available() and dist.is_initialized():
        return _Processes(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return _Processes(dist.get_rank(), dist.get_world_size(), created_group=True)
    return _Processes()


def _device(config: TrainConfig) -> torch.device:
    if config.device != "auto":
        return torch.device(config.device)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # NCCL collectives of this process use its own GPU
        return device
    return torch.device("cpu")


def average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    """Average gradients over processes with one flattened all_reduce (a missing gradient counts as zero)."""
    if world_size == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])  # (Σ numel,)
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for param, grad in zip(params, grads):
        param.grad = flat[offset : offset + grad.numel()].view_as(param).clone()
        offset += grad.numel()


def verify_ranks(modules: dict[str, nn.Module], world_size: int, step: int, device: torch.device) -> None:
    """All-gather every process's rank vector; ``RuntimeError`` if any process differs."""
    if world_size == 1:
        return
    ranks = torch.tensor(list(ckpt.adapter_ranks(modules).values()), dtype=torch.long, device=device)  # (L,)
    gathered = [torch.empty_like(ranks) for _ in range(world_size)]
    dist.all_gather(gathered, ranks)
    for process, other in enumerate(gathered):
        if not torch.equal(other, gathered[0]):
            diff = (other != gathered[0]).nonzero().flatten().tolist()[:5]
            raise RuntimeError(f"step {step}: LoRA² ranks differ between process 0 and {process} at layers {diff}")


# ---------------------------------------------------------------------- signals
class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and exits at the end of the current optimizer step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def handler(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, then writing a checkpoint", self.signal_name)


@contextmanager
def _signal_handlers(flag: _StopFlag) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, flag.handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------- setup helpers
def _prepare_output_dir(overwrite: bool, output_dir: Path) -> None:
    """Refuse a folder that already holds files (other than the class-image cache) unless ``overwrite``; then remove
    what an earlier run wrote there."""
    class_dir = output_dir / "class_images"
    existing = [p for p in output_dir.iterdir() if p != class_dir] if output_dir.is_dir() else []
    if existing and not overwrite:
        raise ValueError(
            f"output folder {output_dir} already holds a run ({', '.join(sorted(p.name for p in existing)[:5])}): "
            "pass --resume latest to continue it or --overwrite to replace it"
        )
    for path in existing:
        if path.name in RUN_ARTIFACTS or path.name.startswith("checkpoint-") or path.suffix == ".safetensors":
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        else:
            logger.warning("--overwrite leaves %s in place (not written by lora2 train)", path)
    output_dir.mkdir(parents=True, exist_ok=True)


def resolve_instance(config: TrainConfig) -> tuple[list[Path], str, str | None]:
    """(image paths, instance prompt, class name) from an image folder or a DreamBooth subject folder."""
    folder = Path(config.instance_data_dir)
    if not config.instance_data_dir:
        raise ValueError("--instance-data-dir is required")
    class_name = config.class_name
    if class_name is None and (folder.parent / "prompts_and_classes.txt").is_file():
        from lora2.data.dreambooth import load_subject

        class_name = load_subject(folder).class_name
    paths = list_images(folder)
    if config.instance_prompt:
        prompt = config.instance_prompt
    elif class_name:
        prompt = f"a {config.identifier} {class_name}"
    else:
        raise ValueError(f"{folder}: give --instance-prompt (e.g. 'a {config.identifier} dog') or --class-name")
    return paths, prompt, class_name


@torch.no_grad()
def generate_class_images(components: Components, config: TrainConfig, prompt: str, folder: Path) -> list[Path]:
    """DreamBooth prior images: keep those in ``folder`` and generate the missing ones with the base pipeline."""
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    missing = config.num_class_images - len(have)
    if missing > 0:
        logger.info("generating %d class images for %r into %s", missing, prompt, folder)
        for index in tqdm(range(len(have), config.num_class_images), desc="class images"):
            generator = torch.Generator().manual_seed(config.seed + index)
            image = components.pipe(
                prompt,
                num_inference_steps=config.class_generation_steps,
                height=config.resolution,
                width=config.resolution,
                generator=generator,
            ).images[0]
            path = folder / f"class_{index:05d}.png"
            tmp = folder / f".class_{index:05d}.tmp.png"
            image.save(tmp)
            tmp.replace(path)
    return list_images(folder)[: config.num_class_images]


def _optimizer(config: TrainConfig, modules: dict[str, nn.Module]) -> torch.optim.Optimizer:
    """Adam/AdamW (optionally 8-bit) with param groups: UNet weights, text-encoder weights, log ν (own lr)."""
    groups, nus = [], []
    for prefix, module in modules.items():
        weights = peft_adapters.trainable_parameters(module)  # empty unless adapter_type is dora / adalora
        for _, layer in lora_layers(module):
            weights += [layer.lora_A, layer.lora_B]
            if layer.adaptive:
                nus.append(layer.log_nu)
        lr = config.learning_rate if prefix == "unet" else (config.text_encoder_lr or config.learning_rate)
        groups.append({"params": weights, "lr": lr, "weight_decay": config.adam_weight_decay})
    if nus:
        groups.append({"params": nus, "lr": config.nu_lr, "weight_decay": 0.0})
    kwargs = {"betas": (config.adam_beta1, config.adam_beta2), "eps": config.adam_epsilon}
    if config.optimizer.endswith("8bit"):
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ValueError(f"--optimizer {config.optimizer} needs bitsandbytes: pip install bitsandbytes") from error
        cls = bnb.optim.AdamW8bit if config.optimizer == "adamw8bit" else bnb.optim.Adam8bit
    else:
        cls = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return cls(groups, **kwargs)


def _regularization(config: TrainConfig, modules: dict[str, nn.Module]) -> torch.Tensor:
    """The adapter's regularization term: LoRA²'s λ_r·L_reg + λ_w·Σθ²/2, AdaLoRA's orth_reg_weight · R(P, Q), or
    none (DoRA)."""
    if config.adapter_type == "lora2":
        return sum(lora2.regularization(module) for module in modules.values())
    if config.adapter_type == "adalora" and config.orth_reg_weight > 0:
        return config.orth_reg_weight * peft_adapters.orthogonal_regularization(modules["unet"])
    return torch.zeros((), device=modules["unet"].device)


def _parameter_count(module: nn.Module) -> int:
    if peft_adapters.has_peft_adapter(module):
        return peft_adapters.peft_parameter_count(module)
    return lora2.adapter_parameter_count(module)


def _rng_states(generator: torch.Generator, device: torch.device, processes: _Processes) -> dict[str, torch.Tensor]:
    own = {"cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        own["cuda"] = torch.cuda.get_rng_state(device)
    if processes.world_size == 1:
        return {f"rank0.{k}": v for k, v in own.items()}
    gathered: list = [None] * processes.world_size
    dist.all_gather_object(gathered, own)
    return {f"rank{p}.{k}": v for p, states in enumerate(gathered) for k, v in states.items()}


def _restore_rng(states: dict[str, torch.Tensor], generator: torch.Generator, device, processes: _Processes) -> None:
    key = f"rank{processes.rank}"
    if f"{key}.cpu" not in states or f"rank{processes.world_size}.cpu" in states:
        saved = len({k.split(".")[0] for k in states})
        raise ValueError(
            f"checkpoint was written by {saved} processes; resume with the same number (now {processes.world_size})"
        )
    torch.set_rng_state(states[f"{key}.cpu"])
    generator.set_state(states[f"{key}.generator"])
    if device.type == "cuda" and f"{key}.cuda" in states:
        torch.cuda.set_rng_state(states[f"{key}.cuda"], device)


def _truncate_log(path: Path, step: int) -> None:
    """Keep the JSONL entries up to ``step`` (a resumed run rewrites what came after its checkpoint)."""
    if not path.is_file():
        return
    keep = [
        line for line in path.read_text(encoding="utf-8").splitlines() if line and json.loads(line)["step"] <= step
    ]
    ckpt.atomic_write_text(path, "".join(line + "\n" for line in keep))


def _read_rank_history(path: Path) -> tuple[list[int], list[dict[str, int]]]:
    steps, history = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        steps.append(record["step"])
        history.append(record["ranks"])
    return steps, history


@contextmanager
def adapters_disabled(modules: dict[str, nn.Module]) -> Iterator[None]:
    """Run the base model: every LoRA² (or peft) layer passes its input through the frozen layer only."""
    layers = [layer for module in modules.values() for _, layer in lora_layers(module)]
    peft_layers = [layer for module in modules.values() for _, layer in peft_adapters.peft_layers(module)]
    for layer in layers:
        layer.disable_adapters = True
    for layer in peft_layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.disable_adapters = False
        for layer in peft_layers:
            layer.enable_adapters(True)


@torch.no_grad()
def sample_images(components: Components, config: TrainConfig, prompts: list[str], seed: int, autocast) -> list:
    """One image per prompt from the pipeline as it is (adapters as set), each from ``seed``; RNG untouched."""
    images = []
    with torch.random.fork_rng(devices=[]), autocast:
        for prompt in prompts:
            generator = torch.Generator().manual_seed(seed)
            images.append(
                components.pipe(
                    prompt,
                    num_inference_steps=config.sample_steps,
                    guidance_scale=config.guidance_scale,
                    height=config.resolution,
                    width=config.resolution,
                    generator=generator,
                ).images[0]
            )
    return images


def diffusion_loss(
    prediction: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, noise_scheduler, snr_gamma: float | None
) -> torch.Tensor:
    """Per-sample MSE (B,), optionally with min-SNR-γ weighting (Hang et al. 2023: w = min(SNR, γ)/SNR, or /(SNR+1)
    for v-prediction)."""
    mse = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, target.dim())))
    if snr_gamma is None:
        return mse  # (B,)
    snr = compute_snr(noise_scheduler, timesteps)  # (B,)
    weight = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return mse * weight / (snr + 1)
    return mse * weight / snr


@dataclass
class _Data:
    """Micro-batches of instance (and class) samples: VAE latents, SDXL time ids, prompt embeddings.

    latent_cache maps (kind, index, flipped) to the VAE posterior (mean, std, crop) when images are center-cropped
    and the VAE is frozen; otherwise images are cropped, flipped and encoded on the fly. prompt_cache maps a kind to
    its (embeddings, pooled) when the text encoders are frozen.
    """

    config: TrainConfig
    components: Components
    images: dict[str, list[TrainImage]]
    prompts: dict[str, str | None]
    generator: torch.Generator
    device: torch.device
    processes: _Processes
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]
    latent_cache: dict[tuple[str, int, bool], tuple] = field(default_factory=dict)
    prompt_cache: dict[str, tuple] = field(default_factory=dict)

    def fill_caches(self) -> None:
        config, vae = self.config, self.components.vae
        if not config.train_text_encoder:
            with torch.no_grad():
                self.prompt_cache = {
                    kind: self.encode([self.prompts[kind]]) for kind in self.images if self.images[kind]
                }
        if config.cache_latents and config.center_crop:
            for kind, items in self.images.items():
                for index, item in enumerate(items):
                    for flip in (False, True) if config.random_flip else (False,):
                        pixels, crop = crop_and_flip(item, config.resolution, True, flip, None)  # (3, R, R)
                        mean, std = latent_distribution(vae, pixels[None])  # (1, C, h, w) each
                        self.latent_cache[(kind, index, flip)] = (mean, std, crop)

    def samples(self, micro_step: int) -> list[tuple[str, int]]:
        """(kind, index) of this process's samples: instance samples first, then as many class samples."""
        seeds = {"instance": self.config.seed, "class": self.config.seed + 1}
        rank, world = self.processes.rank, self.processes.world_size
        return [
            (kind, index)
            for kind, items in self.images.items()
            if items
            for index in batch_indices(len(items), seeds[kind], micro_step, self.config.train_batch_size, rank, world)
        ]

    def latents(self, samples: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents sampled from the VAE posterior (B, C, h, w) and SDXL time ids (B, 6)."""
        config, latents, time_ids = self.config, [], []
        for kind, index in samples:
            item = self.images[kind][index]
            flip = config.random_flip and bool(torch.rand((), generator=self.generator) < 0.5)
            if self.latent_cache:
                mean, std, crop = self.latent_cache[(kind, index, flip)]
            else:
                pixels, crop = crop_and_flip(item, config.resolution, config.center_crop, flip, self.generator)
                mean, std = latent_distribution(self.components.vae, pixels[None])  # (1, C, h, w) each
            noise = torch.randn(mean.shape, generator=self.generator).to(self.device)  # (1, C, h, w)
            latents.append(mean + std * noise)
            time_ids.append(add_time_ids(item.original_size, crop, (config.resolution, config.resolution)))
        return torch.cat(latents), torch.stack(time_ids).to(self.device)  # (B, C, h, w), (B, 6)

    def text(self, kinds: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt embeddings (B, T, D) and pooled embeddings (B, P) or None, from the cache or the encoders."""
        if not self.prompt_cache:
            return self.encode([self.prompts[kind] for kind in kinds])
        parts = [self.prompt_cache[kind] for kind in kinds]
        pooled = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None  # (B, P)
        return torch.cat([p[0] for p in parts]), pooled  # (B, T, D)


# ---------------------------------------------------------------------- the loop
def train(config: TrainConfig) -> TrainResult:  # noqa: C901 - one visible recipe
    """Run DreamBooth fine-tuning with LoRA² adapters as configured; returns where the outputs are."""
    device = _device(config)
    processes = _init_processes()
    if not config.output_dir:
        raise ValueError("--output-dir is required")
    output_dir = Path(config.output_dir)
    resume_path = ckpt.resolve_resume(output_dir, config.resume) if config.resume else None
    if resume_path is not None and config.adapter_type == "adalora":
        raise ValueError(
            f"--resume {config.resume}: adapter_type 'adalora' cannot resume ({resume_path}): AdaLoRA's importance "
            "statistics and budget schedule are not checkpointed; start a new run with --overwrite"
        )
    if config.resume and resume_path is None:
        logger.warning("--resume latest: no checkpoint in %s yet, starting a new run", output_dir)
    if processes.main and resume_path is None:
        _prepare_output_dir(config.overwrite or config.resume == "latest", output_dir)
    processes.barrier()

    # ---- data
    if config.resolution is None:
        config = dataclasses.replace(config, resolution=native_resolution(resolve_base(config.base), config.revision))
        logger.info("resolution %d (the base model's native size)", config.resolution)
    paths, instance_prompt, class_name = resolve_instance(config)
    images: list[TrainImage] = [prepare_image(p, config.resolution, config.small_images) for p in paths]

    # ---- model
    base = resolve_base(config.base)
    torch.manual_seed(config.seed)  # identical on every process: adapter init and grown rank rows match
    components = load_components(base, config.revision, config.variant, config.model_type)
    weight_dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[config.mixed_precision]
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=config.mixed_precision != "no")
    unet, vae = components.unet, components.vae
    for module in [unet, vae, *components.text_encoders]:
        module.requires_grad_(False)
    vae.to(device)  # stays fp32: latents are computed once (the SDXL VAE overflows in fp16)
    for module in [unet, *components.text_encoders]:
        module.to(device)
        if weight_dtype != torch.float32:
            module.to(dtype=weight_dtype)  # frozen weights in half precision; adapters are created in fp32 later

    # ---- class images (prior preservation)
    class_images: list[TrainImage] = []
    class_prompt = config.class_prompt or (f"a {class_name}" if class_name else None)
    if config.with_prior_preservation:
        if not class_prompt:
            raise ValueError("--with-prior-preservation needs --class-prompt or --class-name")
        class_dir = Path(config.class_data_dir) if config.class_data_dir else output_dir / "class_images"
        if processes.main:
            with torch.random.fork_rng(devices=[]):
                generate_class_images(components, config, class_prompt, class_dir)
        processes.barrier()
        class_paths = list_images(class_dir)[: config.num_class_images]
        class_images = [prepare_image(p, config.resolution, config.small_images) for p in class_paths]
    logger.info("%d instance images, prompt %r; %d class images", len(images), instance_prompt, len(class_images))

    # ---- adapters
    adalora = None  # peft's AdaLoraModel when adapter_type is "adalora": its budget allocation runs every step
    if config.adapter_type == "lora2":
        lora2.inject(unet, config.lora_config())
    else:
        tuner = peft_adapters.inject_peft(unet, config)
        adalora = tuner if config.adapter_type == "adalora" else None
    modules: dict[str, nn.Module] = {"unet": unet}
    if config.train_text_encoder:
        names = ["text_encoder", "text_encoder_2"][: len(components.text_encoders)]
        for name, encoder in zip(names, components.text_encoders):
            lora2.inject(encoder, config.lora_config(config.text_encoder_target_modules))
            modules[name] = encoder
    if config.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    collector = None
    if config.entropy_weight > 0:
        collector = EntropyCollector(
            identifier_positions(components.tokenizers[0], instance_prompt, config.identifier)
        )
        layers = install_entropy_processors(unet, collector)
        logger.info("entropy term on %d cross-attention layers, tokens %s", len(layers), collector.token_positions)

    # ---- data: caches of prompt embeddings and VAE posteriors while the encoders are frozen
    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        with autocast:
            return encode_prompts(components, prompts)

    generator = torch.Generator().manual_seed(config.seed + 7919 * processes.rank)
    data = _Data(
        config,
        components,
        {"instance": images, "class": class_images},
        {"instance": instance_prompt, "class": class_prompt},
        generator,
        device,
        processes,
        encode,
    )
    data.fill_caches()

    # ---- optimizer, schedule, resume
    start_step = 0
    if resume_path is not None:
        state, tensors, rng_states = ckpt.load_checkpoint(resume_path)
        ckpt.restore_adapter(modules, tensors, state["ranks"])
        start_step = state["step"]
    optimizer = _optimizer(config, modules)
    lr_scheduler = get_scheduler(
        config.lr_scheduler,
        optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=config.max_train_steps,
        num_cycles=config.lr_num_cycles,
        power=config.lr_power,
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.mixed_precision == "fp16")
    if resume_path is not None:
        ckpt.load_optimizer_state(resume_path, optimizer, state)
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["grad_scaler"]:
            scaler.load_state_dict(state["grad_scaler"])
        _restore_rng(rng_states, generator, device, processes)
        logger.info("resumed from %s at step %d", resume_path, start_step)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]  # refreshed after rank changes

    # ---- logs
    log_path = output_dir / LOG_FILE
    writer = None
    if processes.main:
        if resume_path is None:
            config.save_yaml(output_dir / CONFIG_FILE)
        _truncate_log(log_path, start_step)
        if config.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        if start_step == 0:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": 0, "ranks": ckpt.adapter_ranks(modules)}) + "\n")

    def save(step: int) -> Path | None:
        rng = _rng_states(generator, device, processes)
        path = None
        if processes.main:
            trainer_state = {"world_size": processes.world_size, "config": config.to_dict(), "samples_seen": step}
            path = ckpt.save_checkpoint(
                output_dir,
                step,
                modules,
                optimizer,
                lr_scheduler,
                scaler,
                rng,
                trainer_state,
                config.checkpoints_total_limit,
            )
        processes.barrier()
        return path

    # ---- training
    batch = config.train_batch_size
    num_train_timesteps = components.noise_scheduler.config.num_train_timesteps
    stop = _StopFlag()
    losses: list[float] = []
    step, status = start_step, "completed"
    ranks = ckpt.adapter_ranks(modules)
    unet.train()
    progress = tqdm(total=config.max_train_steps, initial=start_step, desc="lora2 train", disable=not processes.main)
    with _signal_handlers(stop), progress, writer or nullcontext():
        while step < config.max_train_steps:
            terms = torch.zeros(5, dtype=torch.float64)  # loss, mse, prior, regularization, entropy
            for micro in range(config.gradient_accumulation_steps):
                micro_step = step * config.gradient_accumulation_steps + micro
                samples = data.samples(micro_step)
                kinds = [kind for kind, _ in samples]
                latents, time_ids = data.latents(samples)  # (B, C, h, w), (B, 6)
                noise = torch.randn(latents.shape, generator=generator)  # (B, C, h, w)
                if config.noise_offset:
                    noise += config.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
                noise = noise.to(device)
                timesteps = torch.randint(0, num_train_timesteps, (len(samples),), generator=generator).to(device)
                noisy = components.noise_scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
                if components.prediction_type == "v_prediction":
                    target = components.noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                embeds, pooled = data.text(kinds)  # (B, T, D), (B, P) | None
                added = None
                if components.kind == "sdxl":
                    added = {"text_embeds": pooled, "time_ids": time_ids.to(embeds.dtype)}
                if collector is not None:
                    collector.start(torch.tensor([kind == "instance" for kind in kinds]))
                with autocast:
                    prediction = unet(noisy.to(weight_dtype), timesteps, embeds, added_cond_kwargs=added).sample
                per_sample = diffusion_loss(
                    prediction, target, timesteps, components.noise_scheduler, config.snr_gamma
                )
                mse = per_sample[:batch].mean()
                prior = per_sample[batch:].mean() if class_images else torch.zeros((), device=device)
                regularization = _regularization(config, modules)
                entropy = collector.loss() if collector is not None else torch.zeros((), device=device)
                loss = mse + config.prior_loss_weight * prior + regularization + config.entropy_weight * entropy
                scaler.scale(loss / config.gradient_accumulation_steps).backward()
                if collector is not None:
                    collector.stop()  # after backward: gradient checkpointing recomputes through the same path
                parts = torch.stack([loss, mse, prior, regularization, entropy]).detach().double().cpu()
                terms += parts / config.gradient_accumulation_steps
            if processes.world_size > 1:
                stats = torch.cat([terms, torch.tensor([float(stop.requested)], dtype=torch.float64)]).to(device)
                dist.all_reduce(stats)
                terms = stats[:5].cpu() / processes.world_size
                stop.requested = bool(stats[5] > 0)
            if not torch.isfinite(terms).all():
                raise TrainingDiverged(
                    f"loss is not finite at step {step + 1} (loss, mse, prior, reg, entropy = {terms.tolist()}); "
                    f"training stopped, the last good checkpoint is kept in {output_dir}"
                )
            scaler.unscale_(optimizer)
            average_gradients(trainable, processes.world_size)
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            scaler.step(optimizer)  # the LoRA² post-step hook recomputes ranks and re-allocates here
            scaler.update()
            lr_scheduler.step()
            if adalora is not None:
                adalora.update_and_allocate(step + 1)  # scores use the gradients: before zero_grad
            optimizer.zero_grad(set_to_none=True)
            trainable = [p for group in optimizer.param_groups for p in group["params"]]
            step += 1
            losses.append(float(terms[0]))

            ranks = ckpt.adapter_ranks(modules)
            total_rank = sum(ranks.values())
            params = sum(_parameter_count(module) for module in modules.values())
            if processes.main:
                record = dict(zip(("loss", "mse", "prior", "regularization", "entropy"), terms.tolist()))
                record.update(
                    step=step, lr=lr_scheduler.get_last_lr()[0], total_rank=total_rank, adapter_params=params
                )
                record["ranks"] = ranks
                with open(log_path, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                if writer is not None:
                    for key in (
                        "loss",
                        "mse",
                        "prior",
                        "regularization",
                        "entropy",
                        "lr",
                        "total_rank",
                        "adapter_params",
                    ):
                        writer.add_scalar(f"train/{key}", record[key], step)
                    writer.add_histogram("train/ranks", torch.tensor(list(ranks.values())), step)
                progress.set_postfix(loss=f"{terms[0]:.4f}", rank=total_rank, size=f"{params * 4 / 2**20:.1f}MB")
                progress.update(1)
            if step % config.rank_check_steps == 0 or step == config.max_train_steps:
                verify_ranks(modules, processes.world_size, step, device)
            if config.validation_steps and step % config.validation_steps == 0 and processes.main:
                unet.eval()
                prompt = config.validation_prompt or instance_prompt
                folder = output_dir / "validation"
                folder.mkdir(exist_ok=True)
                for index in range(config.num_validation_images):
                    image = sample_images(components, config, [prompt], config.seed + index, autocast)[0]
                    image.save(folder / f"step{step:06d}_{index}.png")
                    if writer is not None:
                        writer.add_image(f"validation/{index}", np.asarray(image), step, dataformats="HWC")
                unet.train()
            if stop.requested:
                save(step)
                status = "interrupted"
                logger.warning(
                    "stopped by %s at step %d; resume with --resume latest", stop.signal_name or "signal", step
                )
                break
            if step % config.checkpointing_steps == 0 or step == config.max_train_steps:
                save(step)

    # ---- outputs
    files: dict[str, Path] = {}
    if status == "completed" and processes.main:
        unet.eval()
        metadata = {"training": {k: v for k, v in config.to_dict().items() if k != "resume"}, "base_model": base}
        files.update(save_adapter(modules, output_dir, config.export_formats, metadata))
        steps, history = _read_rank_history(log_path)
        files["rank_heatmap"] = output_dir / "rank_heatmap.png"
        rank_heatmap(history, steps, files["rank_heatmap"])
        prompts = [p.replace("{instance}", instance_prompt) for p in config.sample_prompts]
        with adapters_disabled(modules):
            base_images = sample_images(components, config, prompts, config.seed, autocast)
        tuned_images = sample_images(components, config, prompts, config.seed, autocast)
        samples_dir = output_dir / "samples"
        samples_dir.mkdir(exist_ok=True)
        for index, (base_image, tuned_image) in enumerate(zip(base_images, tuned_images)):
            base_image.save(samples_dir / f"base_{index:02d}.png")
            tuned_image.save(samples_dir / f"{config.adapter_type}_{index:02d}.png")
        files["samples"] = samples_dir
        files["sample_grid"] = output_dir / "sample_grid.png"
        image_grid(
            [[b, t] for b, t in zip(base_images, tuned_images)],
            prompts,
            ["base", METHOD_LABELS[config.adapter_type]],
            files["sample_grid"],
        )
        files["model_card"] = output_dir / "README.md"
        settings = {
            k: getattr(config, k)
            for k in (
                "adapter_type",
                "rank_mode",
                "init_rank",
                "max_rank",
                "target_rank",
                "quantile",
                "learning_rate",
                "nu_lr",
                "max_train_steps",
                "train_batch_size",
                "resolution",
                "seed",
                "rank_reg_weight",
                "entropy_weight",
                "with_prior_preservation",
            )
        }
        write_model_card(
            files["model_card"],
            base,
            instance_prompt,
            ranks,
            settings,
            components.kind,
            "sample_grid.png",
            method=config.adapter_type,
        )
        files["log"] = log_path
        logger.info("total rank %d over %d modules; outputs in %s", sum(ranks.values()), len(ranks), output_dir)
    processes.barrier()
    if processes.created_group:
        dist.destroy_process_group()
    state = {key: value.detach().cpu().clone() for key, value in ckpt.adapter_tensors(modules).items()}
    return TrainResult(output_dir, step, status, ckpt.adapter_ranks(modules), files, losses, state)
