"""Training configuration: one flat dataclass, read from YAML and overridden by command-line flags.

Every field is also a flag of ``lora2 train`` (``max_train_steps`` → ``--max-train-steps``; the underscore
spelling of diffusers' scripts is accepted too). The LoRA² fields (``target_modules`` … ``entropy_weight``) are
those of :class:`lora2.LoRA2Config`; ``rank_mode`` picks adaptive LoRA² or fixed-rank LoRA through the same code.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lora2.lora.config import DEFAULT_TARGETS, LoRA2Config

_LORA2_DEFAULTS = LoRA2Config()

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DEFAULT_SAMPLE_PROMPTS = (
    "{instance}",
    "{instance} on the beach",
    "{instance} in the snow",
    "a painting of {instance}",
)
ADAPTER_TYPES = ("lora2", "dora", "adalora")
_CHOICES = {
    "adapter_type": ADAPTER_TYPES,
    "model_type": ("auto", "sdxl", "sd15"),
    "rank_mode": ("adaptive", "fixed"),
    "lambda_scaling": ("first", "sum", "none"),
    "optimizer": ("adamw", "adam", "adamw8bit", "adam8bit"),
    "lr_scheduler": ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"),
    "mixed_precision": ("no", "fp16", "bf16"),
    "small_images": ("upscale", "error"),
    "report_to": ("tensorboard", "none"),
}
_HELP = {
    "base": "base pipeline: hub id or local folder (default: the built-in world model when ready)",
    "instance_data_dir": "folder of subject images, or a DreamBooth subject folder",
    "instance_prompt": "training prompt with the identifier (default 'a <identifier> <class_name>')",
    "rank_mode": "adaptive = LoRA² (learned ranks), fixed = plain LoRA of rank --init-rank",
    "adapter_type": "lora2 (LoRA² / fixed-rank LoRA), or the peft baselines dora / adalora (UNet only)",
    "adalora_tinit": "AdaLoRA: fraction of the steps trained at init_rank before pruning starts (peft tinit)",
    "adalora_tfinal": "AdaLoRA: fraction of the steps trained at the final ranks (peft tfinal)",
    "adalora_delta_t": "AdaLoRA: steps between two budget allocations (peft deltaT)",
    "orth_reg_weight": "AdaLoRA: weight of the orthogonal regularization of P and Q",
    "nu_lr": "learning rate of the log ν parameters (their own param group)",
    "resume": "'latest' or a checkpoint folder",
    "small_images": "images smaller than the resolution: upscale with a warning, or raise an error",
}


@dataclass
class TrainConfig:
    """All settings of one DreamBooth LoRA² run (see ``lora2 train --help`` for the flags).

    Paths and model: base, revision, variant, model_type, output_dir, overwrite, resume.
    Data: instance_data_dir, instance_prompt, identifier, class_name, class_prompt, with_prior_preservation,
        class_data_dir, num_class_images, prior_loss_weight, class_generation_steps, resolution, center_crop,
        random_flip, cache_latents, small_images.
    Adapter (LoRA2Config): rank_mode, target_modules, init_rank, max_rank, quantile, lambda_scaling, lora_alpha,
        chunk_size, target_rank, rank_reg_weight, weight_reg_weight, entropy_weight, rank_pattern, lora_dropout,
        exclude_modules; train_text_encoder, text_encoder_target_modules, text_encoder_lr.
    Adapter type: ``adapter_type`` "lora2" (the fields above), or a peft baseline on the UNet, built from the same
        fields where their meaning fits (see ``lora2.train.peft_adapters``):
        "dora": ``LoraConfig(use_dora=True, r=init_rank, lora_alpha=lora_alpha or init_rank (s = 1),
        target_modules, exclude_modules, lora_dropout, rank_pattern)``;
        "adalora": ``AdaLoraConfig(init_r=init_rank, target_r=target_rank (mean final rank per layer),
        lora_alpha=lora_alpha or init_rank (α/r = 1), total_step=max_train_steps, tinit=round(adalora_tinit ·
        max_train_steps), tfinal=round(adalora_tfinal · max_train_steps), deltaT=adalora_delta_t,
        orth_reg_weight, target_modules, exclude_modules, lora_dropout)``.
        Both train with learning_rate; rank_mode, max_rank, quantile, lambda_scaling, chunk_size, rank_reg_weight,
        weight_reg_weight and nu_lr are unused; the entropy term applies when entropy_weight > 0.
        train_text_encoder is lora2 only; resume is lora2 and dora only (AdaLoRA's importance statistics are not
        checkpointed).
    Optimisation: max_train_steps, train_batch_size, gradient_accumulation_steps, learning_rate, nu_lr, optimizer,
        adam_beta1/2, adam_epsilon, adam_weight_decay, lr_scheduler, lr_warmup_steps, lr_num_cycles, lr_power,
        max_grad_norm, mixed_precision, gradient_checkpointing, snr_gamma, noise_offset, seed, device.
    Operations: checkpointing_steps, checkpoints_total_limit, validation_steps, validation_prompt,
        num_validation_images, sample_prompts, sample_steps, guidance_scale, rank_check_steps, report_to,
        export_formats.
    """

    # paths and model
    base: str = ""
    revision: str | None = None
    variant: str | None = None
    model_type: str = "auto"
    output_dir: str = ""
    overwrite: bool = False
    resume: str | None = None
    # data
    instance_data_dir: str = ""
    instance_prompt: str | None = None
    identifier: str = "sks"
    class_name: str | None = None
    class_prompt: str | None = None
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_generation_steps: int = 25
    resolution: int | None = None
    center_crop: bool = True
    random_flip: bool = False
    cache_latents: bool = True
    small_images: str = "upscale"
    # adapter (LoRA2Config, or the peft baselines)
    adapter_type: str = "lora2"
    rank_mode: str = "adaptive"
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    # adapter defaults are LoRA2Config's, so the library and the trainer cannot drift apart
    init_rank: int = _LORA2_DEFAULTS.init_rank
    max_rank: int = _LORA2_DEFAULTS.max_rank
    quantile: float = _LORA2_DEFAULTS.quantile
    lambda_scaling: str = _LORA2_DEFAULTS.lambda_scaling
    lora_alpha: float | None = _LORA2_DEFAULTS.lora_alpha
    chunk_size: int = _LORA2_DEFAULTS.chunk_size
    target_rank: float = _LORA2_DEFAULTS.target_rank
    rank_reg_weight: float = _LORA2_DEFAULTS.rank_reg_weight
    weight_reg_weight: float = _LORA2_DEFAULTS.weight_reg_weight
    entropy_weight: float = _LORA2_DEFAULTS.entropy_weight
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lora_dropout: float = 0.0
    exclude_modules: list[str] = field(default_factory=list)
    train_text_encoder: bool = False
    text_encoder_target_modules: list[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    text_encoder_lr: float | None = None
    adalora_tinit: float = 0.1
    adalora_tfinal: float = 0.2
    adalora_delta_t: int = 10
    orth_reg_weight: float = 0.5
    # optimisation
    max_train_steps: int = 500
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    nu_lr: float = 1e-2
    optimizer: str = "adamw"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    adam_weight_decay: float = 1e-4
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    snr_gamma: float | None = None
    noise_offset: float = 0.0
    seed: int = 0
    device: str = "auto"
    # operations
    checkpointing_steps: int = 100
    checkpoints_total_limit: int | None = 3
    validation_steps: int = 0
    validation_prompt: str | None = None
    num_validation_images: int = 2
    sample_prompts: list[str] = field(default_factory=lambda: list(DEFAULT_SAMPLE_PROMPTS))
    sample_steps: int = 25
    guidance_scale: float = 5.0
    rank_check_steps: int = 50
    report_to: str = "tensorboard"
    export_formats: list[str] = field(default_factory=lambda: ["diffusers", "kohya"])

    def __post_init__(self) -> None:
        for key, choices in _CHOICES.items():
            if getattr(self, key) not in choices:
                raise ValueError(f"{key} must be one of {choices}, got {getattr(self, key)!r}")
        positive = ("max_train_steps", "train_batch_size", "gradient_accumulation_steps")
        for key in positive + ("checkpointing_steps", "sample_steps", "class_generation_steps", "rank_check_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)!r}")
        for key in ("learning_rate", "nu_lr"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a multiple of 8 (VAE downsampling), got {self.resolution}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(f"checkpoints_total_limit must be >= 1 or None, got {self.checkpoints_total_limit}")
        if not self.identifier.strip():
            raise ValueError("identifier must be a non-empty token such as 'sks'")
        for fmt in self.export_formats:
            if fmt not in ("diffusers", "kohya", "peft", "lora2"):
                raise ValueError(f"export_formats entries must be diffusers, kohya, peft or lora2, got {fmt!r}")
        self.lora_config()  # validates the LoRA² fields
        if self.adapter_type != "lora2":
            self._check_peft_adapter()

    def _check_peft_adapter(self) -> None:
        """Validate the DoRA / AdaLoRA settings (by building the peft config: peft's own checks run too)."""
        from lora2.train.peft_adapters import adalora_schedule, peft_config

        if self.train_text_encoder:
            raise ValueError(f"train_text_encoder needs adapter_type 'lora2', got adapter_type {self.adapter_type!r}")
        if self.adapter_type == "adalora":
            if self.rank_pattern:
                raise ValueError(f"rank_pattern is not supported with adapter_type 'adalora', got {self.rank_pattern}")
            if self.target_rank != int(self.target_rank) or not 1 <= self.target_rank <= self.init_rank:
                raise ValueError(
                    f"adapter_type 'adalora' needs an integer target_rank in [1, init_rank={self.init_rank}] "
                    f"(the mean final rank), got {self.target_rank!r}"
                )
            for key in ("adalora_tinit", "adalora_tfinal"):
                if not 0.0 <= getattr(self, key) < 1.0:
                    raise ValueError(
                        f"{key} must lie in [0, 1) (a fraction of max_train_steps), got {getattr(self, key)!r}"
                    )
            tinit, tfinal = adalora_schedule(self)
            if tinit >= self.max_train_steps - tfinal:
                raise ValueError(
                    f"AdaLoRA schedule leaves no pruning phase: tinit {tinit} >= max_train_steps "
                    f"{self.max_train_steps} - tfinal {tfinal}; lower adalora_tinit / adalora_tfinal"
                )
            if self.adalora_delta_t < 1:
                raise ValueError(f"adalora_delta_t must be >= 1, got {self.adalora_delta_t!r}")
            if self.orth_reg_weight < 0:
                raise ValueError(f"orth_reg_weight must be >= 0, got {self.orth_reg_weight!r}")
        peft_config(self)

    # ------------------------------------------------------------------ derived configs
    def lora_config(self, target_modules: list[str] | None = None) -> LoRA2Config:
        """The LoRA2Config of the UNet adapter (or of a text encoder, given its ``target_modules``)."""
        return LoRA2Config(
            target_modules=list(target_modules or self.target_modules),
            init_rank=self.init_rank,
            max_rank=self.max_rank,
            quantile=self.quantile,
            adaptive=self.rank_mode == "adaptive",
            lambda_scaling=self.lambda_scaling,
            lora_alpha=self.lora_alpha,
            chunk_size=self.chunk_size,
            target_rank=self.target_rank,
            rank_reg_weight=self.rank_reg_weight,
            weight_reg_weight=self.weight_reg_weight,
            entropy_weight=self.entropy_weight,
            rank_pattern=dict(self.rank_pattern) if target_modules is None else {},
            lora_dropout=self.lora_dropout,
            exclude_modules=list(self.exclude_modules),
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """Build from a mapping whose keys are field names (dashes allowed); unknown keys are an error."""
        data = {key.replace("-", "_"): value for key, value in data.items()}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown training config keys: {unknown}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a YAML file holding a mapping of field names to values."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of option names to values")
        return cls.from_dict(data)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


# ---------------------------------------------------------------------- command-line flags
def _base_type(annotation: str) -> tuple[type, bool, bool]:
    """(scalar type, is_list, is_dict) of a field annotation written as a string (``from __future__``)."""
    hint = eval(annotation, {"list": list, "dict": dict, "str": str, "int": int, "float": float, "bool": bool})  # noqa: S307 - our own annotations
    args = [a for a in typing.get_args(hint) if a is not type(None)] if isinstance(hint, types.UnionType) else [hint]
    inner = args[0]
    origin = typing.get_origin(inner)
    if origin is list:
        return typing.get_args(inner)[0], True, False
    if origin is dict:
        return str, False, True
    return inner, False, False


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parse_optional(kind: type):
    def parse(text: str):
        return None if text.lower() in ("none", "null") else kind(text)

    return parse


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per TrainConfig field; flags not given are absent from the namespace, so YAML values stay."""
    for f in dataclasses.fields(TrainConfig):
        kind, is_list, is_dict = _base_type(f.type)
        flags = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            flags.append(f"--{f.name}")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        help_text = f"{_HELP.get(f.name, '')} (default: {default})".strip()
        options = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text}
        if f.name in _CHOICES:
            options["choices"] = _CHOICES[f.name]
        if kind is bool:
            # --flag, --flag true/false, --no-flag
            parser.add_argument(*flags, nargs="?", const=True, type=_parse_bool, **options)
            parser.add_argument(
                f"--no-{f.name.replace('_', '-')}", dest=f.name, action="store_false", default=argparse.SUPPRESS
            )
        elif is_list:
            parser.add_argument(*flags, nargs="+", type=kind, **options)
        elif is_dict:
            parser.add_argument(*flags, type=json.loads, **{**options, "help": "JSON mapping"})
        else:
            # choices are plain strings: "none" is a value of --report-to, not None
            parser.add_argument(*flags, type=str if f.name in _CHOICES else _parse_optional(kind), **options)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML file (``args.config``, optional) overridden by every flag that was given."""
    base = TrainConfig.from_yaml(args.config).to_dict() if getattr(args, "config", None) else {}
    for f in dataclasses.fields(TrainConfig):
        if hasattr(args, f.name):
            base[f.name] = getattr(args, f.name)
    return TrainConfig.from_dict(base)
