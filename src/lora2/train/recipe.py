"""DreamBooth training with LoRA² (fixed-rank LoRA, or a peft baseline): one visible recipe, as torchtune writes them.

``train(config)`` = ``DreamBoothRecipe(config)``: ``setup()`` (run folder, model, data, adapter, optimizer, resume,
logs: each one ``_setup_*`` method), ``train()`` (the loop), ``train_step()`` (one optimizer step, all of it),
``save_checkpoint()`` and ``save_outputs()``. What differs between adapter types lives in their backends
(``lora2.train.adapters``); the run folder's layout in ``lora2.train.run_folder``.

Loss per optimizer step (LoRA², eq. of L_total):

    L = MSE(ε̂ or v̂) + w_prior · MSE_prior + λ_r Σ_ℓ |ν_ℓ − ν_target| + λ_w Σθ²/2 + λ_e · H(identifier maps)

(the backend gives the regularization term: LoRA²'s λ_r·L_reg + λ_w·Σθ²/2, AdaLoRA's orthogonal regularization,
none for DoRA). After each optimizer step the backend acts: LoRA² ranks follow ν (``lora2.sync_ranks``, which moves
re-allocated parameters in the optimizer), AdaLoRA allocates its budget.

Random state: the global torch RNG is seeded identically on every process (adapter init and the fresh rows of
growing ranks come from it, so they match across processes); per-process noise, timesteps, flips, crops, caption
dropout and tag shuffling come from the trainer's own ``torch.Generator`` (seed + process index); the data order
(aspect-ratio buckets too) is a pure function of (seed, step).

People's photos (``lora2.train.captions``, ``buckets``, ``masks``, ``ema``): per-image captions, aspect-ratio buckets
with SDXL's size and crop conditioning, masked loss, an EMA of the adapter used for the outputs; each is one call here.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

import lora2.train.checkpoint as ckpt
from lora2.logs import quiet_half_precision_cast
from lora2.train.adapters import backend_class
from lora2.train.batches import TrainingData, instance_images, prior_images
from lora2.train.captions import caption_companions, caption_source, instance_captions
from lora2.train.config import TrainConfig
from lora2.train.data import TrainImage, list_images
from lora2.train.distributed import (
    GradientReducer,
    average_terms,
    init_processes,
    restore_rng,
    rng_states,
    training_device,
    verify_ranks,
)
from lora2.train.ema import start_ema
from lora2.train.entropy import EntropyCollector, adapted_cross_attention, install_entropy_processors
from lora2.train.fast_path import UNetRunner, resolve_mode, unverified
from lora2.train.loss import diffusion_loss, noised_inputs
from lora2.train.model import encode_prompts, identifier_positions, load_components, native_resolution, resolve_base
from lora2.train.optimizers import build_optimizer, build_scheduler
from lora2.train.outputs import image_grid, rank_heatmap, write_model_card
from lora2.train.run_folder import (
    CHECKPOINT_PREFIX,
    CLASS_IMAGES_DIR,
    CONFIG_FILE,
    LOG_FILE,
    MODEL_CARD,
    RANK_HEATMAP,
    SAMPLE_GRID,
    SAMPLES_DIR,
    VALIDATION_DIR,
    RunFolder,
)
from lora2.train.sampling import generate_class_images, on_device, sample_images
from lora2.train.tracking import StepLog

logger = logging.getLogger(__name__)

CARD_SETTINGS = (
    "adapter_type", "rank_mode", "init_rank", "max_rank", "target_rank", "quantile", "optimizer", "learning_rate",
    "nu_lr", "max_train_steps", "train_batch_size", "resolution", "aspect_buckets", "caption_extension",
    "caption_dropout_rate", "shuffle_caption", "keep_tokens", "masked_loss", "ema_decay", "seed", "rank_reg_weight",
    "entropy_weight", "with_prior_preservation",
)  # fmt: skip
ENTROPY_NEEDS = "the one instance prompt with the identifier and an adapted cross-attention (attn2) layer"


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or infinite; the message says which checkpoint is kept."""


class Interrupted(Exception):
    """SIGTERM/SIGINT arrived; the run wrote a checkpoint and can be resumed."""


@dataclass
class TrainResult:
    """What a run produced. status: "completed" or "interrupted" (SIGTERM/SIGINT: checkpoint written).

    ranks: final rank per module (``<prefix>.<module>``); losses: total loss per step of this run;
    adapter_state: the adapter's full state, as written into checkpoints (live weights); ema_state: its EMA (when
    --ema-decay is on); signal_name: the signal that stopped it.
    """

    output_dir: Path
    step: int
    status: str
    ranks: dict[str, int]
    files: dict[str, Path] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list)
    adapter_state: dict[str, torch.Tensor] = field(default_factory=dict)
    ema_state: dict[str, torch.Tensor] = field(default_factory=dict)
    signal_name: str = ""
    fast_path: dict = field(default_factory=dict)


class _StopFlag:
    """Set by SIGTERM/SIGINT; the loop checkpoints and stops at the end of the current optimizer step."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def handler(self, signum, frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        logger.warning("%s received: finishing this step, then writing a checkpoint", self.signal_name)

    @contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class DreamBoothRecipe:
    """One DreamBooth run: build everything in ``setup()``, then ``train()``."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.processes = init_processes()
        self.device = training_device(config.device)
        self.compile_mode = resolve_mode(config.compile, self.device)  # fails before anything is loaded
        self.folder = RunFolder(config.output_dir)
        self.backend = backend_class(config.adapter_type)(config)
        self.stop = _StopFlag()
        self.losses: list[float] = []
        self.start_step = 0
        self.resume_path: Path | None = None

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        self._setup_model()
        self._setup_data()
        self._setup_adapter()
        self._setup_optimizer()
        self._setup_fast_path()
        self._setup_logging()

    def resolve_resume(self) -> Path | None:
        """The checkpoint to resume (None: a new run), checking the folder can be used — before writing to it."""
        config, folder = self.config, self.folder
        path = ckpt.resolve_resume(folder.root, config.resume) if config.resume else None
        if path is not None and not self.backend.resumable:
            raise ValueError(
                f"--resume {config.resume}: adapter_type {config.adapter_type!r} cannot resume ({path}): AdaLoRA's "
                "importance statistics and budget schedule are not checkpointed; start a new run with --overwrite"
            )
        if path is None and config.resume == "latest":
            folder.check_resumable_without_checkpoint()
            logger.warning("--resume latest: no checkpoint in %s yet, starting a new run", folder.root)
        elif path is None:
            folder.check_new(config.overwrite)
        return path

    @contextmanager
    def run_folder(self) -> Iterator[None]:
        """Check the folder (main process, before writing anything), hold its lock, prepare it; every process then
        knows the checkpoint to resume."""
        if not self.processes.main:
            self.processes.barrier()
            self.resume_path = (
                ckpt.resolve_resume(self.folder.root, self.config.resume) if self.config.resume else None
            )
            yield
            return
        self.resume_path = self.resolve_resume()
        with self.folder.locked():
            if self.resume_path is None:
                self.folder.prepare_new(self.config.overwrite)
            else:
                self.folder.adopt()
            self.folder.record(CONFIG_FILE, LOG_FILE, CHECKPOINT_PREFIX + "*")
            self.processes.barrier()
            yield

    def _setup_model(self) -> None:
        config = self.config
        self.base = resolve_base(config.base)
        if config.resolution is None:
            self.config = config = config.replace(resolution=native_resolution(self.base, config.revision))
            logger.info("resolution %d (the base model's native size)", config.resolution)
        self.instance_paths, self.instance_prompt, self.class_name = resolve_instance(config)
        self.captions = instance_captions(self.instance_paths, config, self.instance_prompt, self.class_name)
        self.images: list[TrainImage] = instance_images(self.instance_paths, config)  # square, or bucketed
        torch.manual_seed(config.seed)  # identical on every process: adapter init and grown rank rows match
        self.components = components = load_components(self.base, config.revision, config.variant, config.model_type)
        self.autocast_args = {"device_type": self.device.type, "dtype": config.weight_dtype,
                              "enabled": config.mixed_precision != "no"}  # fmt: skip
        self.autocast = torch.autocast(**self.autocast_args)
        for module in [components.unet, components.vae, *components.text_encoders]:
            module.requires_grad_(False)
        components.vae.to(self.device)  # stays fp32: latents are computed once (the SDXL VAE overflows in fp16)
        with quiet_half_precision_cast():
            for module in [components.unet, *components.text_encoders]:
                # frozen weights in half precision (adapters are fp32), cast on the way: never fp32 on the GPU
                module.to(device=self.device, dtype=config.weight_dtype)

    def _setup_data(self) -> None:
        config, processes = self.config, self.processes
        self.class_prompt = config.class_prompt or (f"a {self.class_name}" if self.class_name else None)
        class_images: list[TrainImage] = []
        if config.with_prior_preservation:
            if not self.class_prompt:
                raise ValueError("--with-prior-preservation needs --class-prompt or --class-name")
            class_dir = Path(config.class_data_dir) if config.class_data_dir else self.folder.path(CLASS_IMAGES_DIR)
            if processes.main:
                with torch.random.fork_rng(devices=[]):
                    generate_class_images(self.components, config, self.class_prompt, class_dir, self.autocast)
            processes.barrier()
            class_images = prior_images(list_images(class_dir)[: config.num_class_images], config)
        self.has_class_images = bool(class_images)
        logger.info("%d instance images, prompt %r; %d class images", len(self.images), self.instance_prompt,
                    len(class_images))  # fmt: skip
        self.generator = torch.Generator().manual_seed(config.seed + 7919 * processes.rank)
        self.data = TrainingData(
            config,
            self.components,
            {"instance": self.images, "class": class_images},
            {"instance": self.instance_prompt, "class": self.class_prompt},
            self.generator,
            self.device,
            processes,
            self._encode,
            self.captions,
        )

    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self.autocast:
            return encode_prompts(self.components, prompts)

    def _setup_adapter(self) -> None:
        config, components = self.config, self.components
        self.modules: dict[str, nn.Module] = {"unet": components.unet}
        if config.train_text_encoder:
            names = ["text_encoder", "text_encoder_2"][: len(components.text_encoders)]
            self.modules.update(zip(names, components.text_encoders))
        self.backend.inject(self.modules)
        if config.gradient_checkpointing:
            components.unet.enable_gradient_checkpointing()
        self.collector = None
        self.config = self._setup_entropy()
        self.data.fill_caches()
        self._park_frozen_modules()

    def _setup_entropy(self) -> TrainConfig:
        """Resolve λ_e and, where it is > 0, install the entropy processors; returns the config with λ_e resolved.

        Unset, λ_e is the adapter type's (``method_entropy_weight``: LoRA² 1e-4) where the term applies, else 0 with
        the reason in the log; set explicitly, it applies or fails with the reason (``ValueError``)."""
        config = self.config
        weight = self.backend.method_entropy_weight() if config.entropy_weight is None else config.entropy_weight
        if weight == 0:
            return config.replace(entropy_weight=0.0)
        try:
            positions = self._entropy_positions()
        except ValueError as reason:
            if config.entropy_weight is not None:
                message = f"entropy_weight needs {ENTROPY_NEEDS}: {reason}; set it to 0 or leave it unset"
                raise ValueError(message) from reason
            logger.info("entropy term off (entropy_weight unset; it needs %s): %s", ENTROPY_NEEDS, reason)
            return config.replace(entropy_weight=0.0)
        if config.entropy_weight is None:
            logger.info("entropy_weight %g (LoRA²'s λ_e; --entropy-weight 0 turns the term off)", weight)
        self.collector = EntropyCollector(positions)
        layers = install_entropy_processors(self.components.unet, self.collector)
        logger.info("entropy term on %d cross-attention layers, tokens %s", len(layers), positions)
        return config.replace(entropy_weight=weight)

    def _entropy_positions(self) -> list[int]:
        """The identifier's token positions the entropy term reads; ``ValueError`` with the reason where the term
        cannot apply to this run (the one owner of its conditions)."""
        if self.data.varies_prompts:
            raise ValueError("the prompt varies by image (captions or caption options)")
        if not adapted_cross_attention(self.components.unet):
            raise ValueError(
                "no cross-attention (attn2) layer is adapted: add attn2's to_q/to_k/to_v/to_out.0 to target_modules"
            )
        return identifier_positions(self.components.tokenizers[0], self.instance_prompt, self.config.identifier)

    def _park_frozen_modules(self) -> None:
        """Once latents and prompt embeddings are cached, the VAE and frozen text encoders leave the GPU (they come
        back only for sampling): the memory goes to the UNet's activations."""
        self.parked = []
        if self.device.type == "cuda":
            if self.data.caches_latents:
                self.parked.append(self.components.vae)
            if self.data.caches_prompts:
                self.parked += self.components.text_encoders
        for module in self.parked:
            module.to("cpu")
        if self.parked:
            torch.cuda.empty_cache()

    def _setup_optimizer(self) -> None:
        config = self.config
        if self.resume_path is not None:
            self._training_state, tensors, self._rng = ckpt.load_checkpoint(self.resume_path)
            self.backend.restore(tensors, self._training_state["ranks"])
            self.start_step = self._training_state["step"]
        self.optimizer = build_optimizer(config, self.backend.parameter_groups())
        self.reducer = GradientReducer(self.processes.world_size)
        self.lr_scheduler = build_scheduler(config, self.optimizer)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        if self.resume_path is not None:
            state = self._training_state
            ckpt.load_optimizer_state(self.resume_path, self.optimizer, state)
            self.lr_scheduler.load_state_dict(state["lr_scheduler"])
            if state["grad_scaler"]:
                self.scaler.load_state_dict(state["grad_scaler"])
            restore_rng(self._rng, self.generator, self.device, self.processes)
            logger.info("resumed from %s at step %d", self.resume_path, self.start_step)
        self.ema = start_ema(config.ema_decay, self.backend, self.resume_path)  # None when off

    def _setup_fast_path(self) -> None:
        """The UNet's runner: CUDA graphs (``--compile graphs``; ``auto``: on CUDA, with the options they are verified
        with) or eager."""
        config = self.config
        mode, untried = self.compile_mode, unverified(config, self.processes.world_size)
        if config.compile == "auto" and mode == "graphs" and untried:
            logger.info("--compile auto: eager, the fast path is not verified with %s (--compile graphs tries it)",
                        ", ".join(untried))  # fmt: skip
            mode = "none"
        self.unet_runner = UNetRunner(self.components.unet, self.collector, mode, self.autocast_args, self.optimizer)
        if self.data.training_sizes > 1:
            self.unet_runner.disable(
                f"{self.data.training_sizes} aspect-ratio buckets: a graph per latent size would hold its own "
                "activation memory, and one graph would be re-captured at every change of bucket"
            )

    def _setup_logging(self) -> None:
        config, folder = self.config, self.folder
        if self.processes.main:
            if self.resume_path is None:
                config.save_yaml(folder.config_path)
            folder.truncate_log(self.start_step)
        self.log = StepLog(
            folder, config.report_to, config.max_train_steps, self.start_step, self.processes.main, config.to_dict()
        )
        self.log.start(self.start_step, self.backend.ranks())

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        """Optimizer steps until ``max_train_steps`` (or a signal: checkpoint, then stop)."""
        config, step, status = self.config, self.start_step, "completed"
        self.components.unet.train()
        with self.stop.installed(), closing(self.log):
            while step < config.max_train_steps:
                terms = self.train_step(step)
                step += 1
                self.losses.append(float(terms[0]))
                ranks = self.backend.ranks()
                self.log.step(step, terms, self.lr_scheduler.get_last_lr()[0], ranks, self.backend.parameter_count())
                if step % config.rank_check_steps == 0 or step == config.max_train_steps:
                    verify_ranks(ranks, self.processes.world_size, step, self.device)
                if config.validation_steps and step % config.validation_steps == 0:
                    self.validate(step)
                if self.stop.requested:
                    self.save_checkpoint(step)
                    status = "interrupted"
                    logger.warning(
                        "stopped by %s at step %d; resume with --resume latest", self.stop.signal_name, step
                    )
                    break
                if step % config.checkpointing_steps == 0 or step == config.max_train_steps:
                    self.save_checkpoint(step)
        self._release_optimizer()
        files = self.save_outputs() if status == "completed" else {}
        self.processes.barrier()
        state = {key: value.detach().cpu().clone() for key, value in self.backend.state().items()}
        ema = {key: value.cpu().clone() for key, value in self.ema.average.items()} if self.ema else {}
        fast_path = self.unet_runner.summary()
        if fast_path["captures"]:
            logger.info("CUDA graphs: %d captures, %.1f s in all", fast_path["captures"], fast_path["capture_seconds"])
        return TrainResult(
            self.folder.root, step, status, self.backend.ranks(), files, self.losses, state, ema,
            self.stop.signal_name, fast_path,
        )  # fmt: skip

    def train_step(self, step: int) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns the loss terms averaged over
        micro-batches and processes: (loss, mse, prior, regularization, entropy)."""
        config, batch = self.config, self.config.train_batch_size
        scheduler = self.components.noise_scheduler
        terms = torch.zeros(5, dtype=torch.float64)
        for micro in range(config.gradient_accumulation_steps):
            samples = self.data.samples(step * config.gradient_accumulation_steps + micro)
            kinds = [sample.kind for sample in samples]
            latents, time_ids, masks = self.data.latents(samples)  # (B, C, h, w), (B, 6), (B, 1, h, w) | None
            noisy, timesteps, target = noised_inputs(
                latents, scheduler, config.noise_offset, self.generator, self.device
            )
            embeds, pooled = self.data.text(samples)  # (B, T, D), (B, P) | None: the captions of this step
            added = {"text_embeds": pooled, "time_ids": time_ids.to(embeds.dtype)} if pooled is not None else None
            rows = torch.tensor([kind == "instance" for kind in kinds])  # (B,) rows whose prompt has the identifier
            prediction, entropy = self.unet_runner(noisy.to(config.weight_dtype), timesteps, embeds, added, rows)
            per_sample = diffusion_loss(prediction, target, timesteps, scheduler, config.snr_gamma, masks)  # (B,)
            mse = per_sample[:batch].mean()
            prior = per_sample[batch:].mean() if self.has_class_images else torch.zeros((), device=self.device)
            regularization = self.backend.regularization()
            entropy = entropy if entropy is not None else torch.zeros((), device=self.device)
            loss = mse + config.prior_loss_weight * prior + regularization + config.entropy_weight * entropy
            if micro == config.gradient_accumulation_steps - 1:
                self.reducer.arm(self._trainable())  # gradients are averaged over processes during this backward
            if config.gradient_accumulation_steps > 1:
                self.unet_runner.prepare_gradients(self._trainable())
            self.scaler.scale(loss / config.gradient_accumulation_steps).backward()
            self.unet_runner.after_backward()
            parts = torch.stack([loss, mse, prior, regularization, entropy]).detach().double().cpu()
            terms += parts / config.gradient_accumulation_steps
        terms, self.stop.requested = average_terms(terms, self.stop.requested, self.processes, self.device)
        if not torch.isfinite(terms).all():
            names = ("loss", "mse", "prior", "reg", "entropy")
            self._diverged(
                step + 1,
                "loss is not finite (" + ", ".join(f"{n} {v:.4g}" for n, v in zip(names, terms.tolist())) + ")",
            )
        self.optimizer_step(step + 1)
        return terms

    def optimizer_step(self, step: int) -> None:
        """Unscale, average over processes, clip, step; the backend acts (ranks, budget); then clear gradients."""
        trainable = self._trainable()
        self.reducer.finish()
        self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(trainable, self.config.max_grad_norm)
            if not self.scaler.is_enabled() and not torch.isfinite(norm):  # fp16's scaler skips such steps itself
                self._diverged(step, f"the gradient norm is {float(norm)}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.lr_scheduler.step()
        try:
            self.backend.after_step(self.optimizer, step)  # LoRA²: ranks follow ν; AdaLoRA: budget (uses gradients)
        except FloatingPointError as error:
            self._diverged(step, str(error))
        if self.ema is not None:
            self.ema.update()  # after the ranks followed ν: the average follows re-allocated layers
        self.optimizer.zero_grad(set_to_none=True)

    def _release_optimizer(self) -> None:
        """After the last checkpoint the optimizer's state and the UNet's graphs are not needed: their memory goes to
        the final samples."""
        self.unet_runner.release()
        self.optimizer.zero_grad(set_to_none=True)
        self.optimizer.state.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _trainable(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def _diverged(self, step: int, what: str) -> None:
        """Stop with ``TrainingDiverged``, saying which checkpoint is kept (or that none is)."""
        kept = ckpt.list_checkpoints(self.folder.root)
        where = f"the last checkpoint is {kept[-1]}" if kept else f"no checkpoint was written in {self.folder.root}"
        raise TrainingDiverged(f"training diverged at step {step}: {what}; stopped, {where}")

    # ------------------------------------------------------------------ checkpoints and outputs
    def save_checkpoint(self, step: int) -> None:
        """Write ``checkpoint-<step>`` (main process; every process contributes its RNG state)."""
        rng = rng_states(self.generator, self.device, self.processes)
        if self.processes.main:
            training = {
                "world_size": self.processes.world_size,
                "config": self.config.to_dict(),
                "samples_seen": step,
                "ranks": self.backend.ranks(),
                "lr_scheduler": self.lr_scheduler.state_dict(),
                "grad_scaler": self.scaler.state_dict(),
            }
            ckpt.save_checkpoint(
                self.folder.root, step, self.backend.state(), training, self.optimizer, rng,
                self.config.checkpoints_total_limit, self.ema.average if self.ema else None,
            )  # fmt: skip
        self.processes.barrier()

    @torch.no_grad()
    def validate(self, step: int) -> None:
        """``num_validation_images`` images of the validation prompt into validation/ (and TensorBoard)."""
        if not self.processes.main:
            return
        config = self.config
        self.components.unet.eval()
        folder = self.folder.path(VALIDATION_DIR)
        self.folder.record(VALIDATION_DIR)
        folder.mkdir(exist_ok=True)
        prompt = config.validation_prompt or self.instance_prompt
        with on_device(self.parked, self.device), self.ema_weights():
            for index in range(config.num_validation_images):
                image = sample_images(self.components, config, [prompt], config.seed + index, self.autocast)[0]
                image.save(folder / f"step{step:06d}_{index}.png")
                self.log.image(f"validation/{index}", image, step)
        self.components.unet.train()

    def ema_weights(self):
        """The adapter holds its EMA inside the block when --ema-decay is on (samples, exported files)."""
        return self.ema.applied() if self.ema is not None else nullcontext()

    def save_outputs(self) -> dict[str, Path]:
        """Adapter files, rank heatmap, samples (base vs adapted), the grid and the model card (main process); with
        --ema-decay, of the EMA weights."""
        if not self.processes.main:
            return {}
        with self.ema_weights():
            return self._save_outputs()

    def _save_outputs(self) -> dict[str, Path]:
        config, folder = self.config, self.folder
        state = self.backend.state()
        if not all(bool(torch.isfinite(value).all()) for value in state.values()):
            self._diverged(self.config.max_train_steps, "the adapter weights are not finite")
        self.components.unet.eval()
        metadata = {"training": {k: v for k, v in config.to_dict().items() if k != "resume"}, "base_model": self.base}
        adapters = self.backend.save(folder, config.export_formats, metadata)
        files = dict(adapters)
        folder.record(RANK_HEATMAP, SAMPLES_DIR, SAMPLE_GRID, MODEL_CARD)
        files["rank_heatmap"] = folder.path(RANK_HEATMAP)
        rank_heatmap(*reversed(folder.rank_history()), files["rank_heatmap"])
        files.update(self._write_samples())
        files["model_card"] = folder.path(MODEL_CARD)
        settings = {key: config.to_dict()[key] for key in CARD_SETTINGS}
        settings["captions"] = caption_source(Path(config.instance_data_dir), config.caption_extension)
        ranks = self.backend.ranks()
        written = {fmt: path.name + ("/" if path.is_dir() else "") for fmt, path in adapters.items()}
        write_model_card(
            files["model_card"], self.base, self.instance_prompt, ranks, settings, self.components.kind,
            type(self.backend), written, SAMPLE_GRID,
        )  # fmt: skip
        files["log"] = folder.log_path
        logger.info("total rank %d over %d modules; outputs in %s", sum(ranks.values()), len(ranks), folder.root)
        return files

    def _write_samples(self) -> dict[str, Path]:
        config, folder = self.config, self.folder
        prompts = [p.replace("{instance}", self.instance_prompt) for p in config.sample_prompts]
        with on_device(self.parked, self.device):
            with self.backend.disabled():
                base_images = sample_images(self.components, config, prompts, config.seed, self.autocast)
            tuned_images = sample_images(self.components, config, prompts, config.seed, self.autocast)
        samples = folder.path(SAMPLES_DIR)
        samples.mkdir(exist_ok=True)
        for index, (base_image, tuned_image) in enumerate(zip(base_images, tuned_images)):
            base_image.save(samples / f"base_{index:02d}.png")
            tuned_image.save(samples / f"{config.adapter_type}_{index:02d}.png")
        grid = folder.path(SAMPLE_GRID)
        rows = [[b, t] for b, t in zip(base_images, tuned_images)]
        image_grid(rows, prompts, ["base", self.backend.label], grid)
        return {"samples": samples, "sample_grid": grid}


def resolve_instance(config: TrainConfig) -> tuple[list[Path], str, str | None]:
    """(image paths, instance prompt, class name) from an image folder or a DreamBooth subject folder."""
    folder = Path(config.instance_data_dir)
    if not config.instance_data_dir:
        raise ValueError("--instance-data-dir is required")
    class_name = config.class_name
    if class_name is None and (folder.parent / "prompts_and_classes.txt").is_file():
        from lora2.data.dreambooth import load_subject

        class_name = load_subject(folder).class_name
    paths = list_images(folder, companions=caption_companions(folder, config.caption_extension))
    if config.instance_prompt:
        prompt = config.instance_prompt
    elif class_name:
        prompt = f"a {config.identifier} {class_name}"
    else:
        raise ValueError(f"{folder}: give --instance-prompt (e.g. 'a {config.identifier} dog') or --class-name")
    return paths, prompt, class_name


def train(config: TrainConfig) -> TrainResult:
    """Run DreamBooth fine-tuning as configured; returns where the outputs are.

    The run folder is checked before anything is written to it, then held with its lock for the whole run.
    """
    recipe = DreamBoothRecipe(config)
    try:
        with recipe.run_folder():
            recipe.setup()
            return recipe.train()
    finally:
        recipe.processes.close()
