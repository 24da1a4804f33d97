"""Training configuration: ``TrainConfig`` (trainer settings) holding a ``LoRA2Config`` (adapter settings).

Users see one flat set of option names: every trainer field and every ``LoRA2Config`` field (``init_rank``,
``target_rank``, ``lambda_scaling``, …) is a key of the YAML file and a flag of ``lora2 train`` (``max_train_steps`` →
``--max-train-steps``; the underscore spelling of diffusers' scripts is accepted too). ``rank_mode`` (adaptive /
fixed) is the flat name of ``LoRA2Config.adaptive``. Each adapter field is defined once, in ``LoRA2Config``: its
default, its validation and its help text (the field's line in the class docstring) come from there.

Values from YAML and from flags go through one parser (``parse_value``): ``1e-4`` written without a dot (a string
to PyYAML) is a float, ``'false'`` is False, ``'3'`` is 3; anything else of the wrong type is a ``ValueError`` naming
the option and the value. Ranges are checked in ``__post_init__`` (``TrainConfig``) and ``LoRA2Config``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from lora2.export.keys import FORMATS
from lora2.lora.config import LoRA2Config
from lora2.rank.math import SCALINGS
from lora2.train.adapters import ADAPTER_TYPES, backend_class
from lora2.train.buckets import BUCKET_STEP
from lora2.train.data import IMAGE_SUFFIXES
from lora2.train.fast_path import COMPILE_MODES

TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DEFAULT_SAMPLE_PROMPTS = (
    "{instance}",
    "{instance} on the beach",
    "{instance} in the snow",
    "a painting of {instance}",
)
MIXED_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
OPTIMIZERS = ("adamw", "adam", "adamw8bit", "adam8bit", "prodigy")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
MODEL_TYPES = ("auto", "sdxl", "sd15")
REPORTERS = ("tensorboard", "wandb", "none")
SMALL_IMAGES = ("upscale", "error")
RANK_MODES = ("adaptive", "fixed")
CHOICES = {
    "adapter_type": ADAPTER_TYPES,
    "model_type": MODEL_TYPES,
    "rank_mode": RANK_MODES,
    "lambda_scaling": SCALINGS,
    "optimizer": OPTIMIZERS,
    "lr_scheduler": LR_SCHEDULERS,
    "mixed_precision": tuple(MIXED_PRECISION),
    "small_images": SMALL_IMAGES,
    "report_to": REPORTERS,
    "export_formats": FORMATS,
    "compile": COMPILE_MODES,
}
# lower bounds of numeric trainer fields (inclusive); learning rates and a few more must be strictly positive
_AT_LEAST = {
    "max_train_steps": 1,
    "train_batch_size": 1,
    "gradient_accumulation_steps": 1,
    "checkpointing_steps": 1,
    "checkpoints_total_limit": 1,
    "sample_steps": 1,
    "class_generation_steps": 1,
    "rank_check_steps": 1,
    "num_class_images": 1,
    "num_validation_images": 1,
    "lr_num_cycles": 1,
    "adalora_delta_t": 1,
    "keep_tokens": 0,
    "lr_warmup_steps": 0,
    "validation_steps": 0,
    "seed": 0,
    "max_grad_norm": 0.0,
    "noise_offset": 0.0,
    "prior_loss_weight": 0.0,
    "entropy_weight": 0.0,
    "adam_weight_decay": 0.0,
    "guidance_scale": 0.0,
    "orth_reg_weight": 0.0,
    "lr_power": 0.0,
}
_POSITIVE = ("learning_rate", "nu_lr", "text_encoder_lr", "adam_epsilon", "snr_gamma")
# in [0, 1)
_FRACTIONS = ("adam_beta1", "adam_beta2", "adalora_tinit", "adalora_tfinal", "caption_dropout_rate", "ema_decay")
# flat option names of the LoRA2Config fields (``adaptive`` is spelled ``rank_mode``)
LORA_KEYS = tuple(f.name for f in dataclasses.fields(LoRA2Config) if f.name != "adaptive")


@dataclass
class TrainConfig:
    """All settings of one DreamBooth run (``lora2 train --help`` lists them with these descriptions).

    base: base pipeline, hub id or local folder (default: the built-in world model).
    model_type: auto (detected), sdxl (SDXL, KOALA) or sd15.
    output_dir: the run folder (lora2.train.run_folder describes it).
    overwrite: replace the run in output_dir (only files lora2 wrote there are removed).
    resume: 'latest' or a checkpoint folder.
    instance_data_dir: folder of subject images, or a DreamBooth subject folder (class read from
        prompts_and_classes.txt beside it).
    instance_prompt: training prompt with the identifier (default 'a <identifier> <class_name>').
    class_data_dir: prior-preservation images (default: generated into <output_dir>/class_images).
    caption_extension: per-image caption files '<image name><extension>' (kohya's sidecars, e.g. '.txt'; default:
        none, off); a metadata.jsonl in the folder ({"file_name", "text"} per line) is read either way. The
        identifier is placed before the class name where a caption names it, else the instance prompt is prepended.
    caption_dropout_rate: probability that an instance sample's caption is replaced by the empty prompt (kohya).
    shuffle_caption: shuffle the comma-separated tags of each instance caption every step (kohya; prompt embeddings
        are then computed every step, not cached).
    keep_tokens: with shuffle_caption: the first N tags stay in place (kohya's keep_tokens).
    resolution: training image side (default: the base model's native size, 1024 for SDXL).
    aspect_buckets: train at SDXL-style aspect-ratio buckets of about resolution² pixels (sides multiples of 64,
        aspect 1:4 to 4:1) instead of square crops; each batch from one bucket.
    masked_loss: weight the loss by a mask per image: the PNG's alpha channel, or masks/<same name> in the instance
        folder (white = learn, black = ignore; kohya's masked loss); class images are unmasked.
    small_images: images smaller than the resolution: upscale with a warning, or error.
    adapter_type: lora2 (LoRA² / fixed-rank LoRA), or the peft baselines dora / adalora (UNet only).
    lora: the adapter (LoRA2Config); its fields are options of their own (init_rank, target_rank, ...) and
        rank_mode (adaptive = LoRA², fixed = plain LoRA of rank init_rank).
    entropy_weight: λ_e, weight of the identifier's cross-attention entropy (0 = off, no attention maps computed);
        None (default) means the method's: ``LORA2_ENTROPY_WEIGHT`` (1e-4) for LoRA² (adapter_type lora2, rank_mode
        adaptive) where the term applies (one instance prompt with the identifier, adapted attn2 layers; the log says
        when it does not), else off. A value set explicitly applies or fails with the reason.
    adalora_tinit: AdaLoRA: fraction of the steps trained at init_rank before pruning starts (peft tinit).
    adalora_tfinal: AdaLoRA: fraction of the steps trained at the final ranks (peft tfinal).
    adalora_delta_t: AdaLoRA: steps between two budget allocations (peft deltaT).
    orth_reg_weight: AdaLoRA: weight of the orthogonal regularization of P and Q.
    nu_lr: learning rate of the log ν parameters (their own param group; plain Adam steps with --optimizer prodigy).
    optimizer: adamw, adam, adamw8bit / adam8bit (bitsandbytes), prodigy (prodigyopt; use --learning-rate 1.0).
    ema_decay: EMA of the adapter weights, used for samples and the exported files (0 = off; e.g. 0.999).
    compile: the UNet's forward and backward: graphs = replayed from CUDA graphs (re-captured when an adapter's
        storage or the input shapes change; eager where a combination is not covered, with a warning saying why),
        none = eager, auto = graphs on CUDA with the options they are verified with on a GPU (else eager, saying so),
        none elsewhere.
    text_encoder_lr: learning rate of the text-encoder adapters (default: learning_rate).
    snr_gamma: min-SNR-γ loss weighting (Hang et al. 2023); none = plain MSE.
    rank_check_steps: steps between checks that every process holds the same ranks (multi-GPU).
    report_to: tensorboard, wandb (its run folder under the output folder; WANDB_MODE=offline works offline), none.
    export_formats: adapter files written at the end (diffusers, kohya, peft, lora2).
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
    caption_extension: str | None = None
    caption_dropout_rate: float = 0.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    class_data_dir: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_generation_steps: int = 25
    resolution: int | None = None
    aspect_buckets: bool = False
    center_crop: bool = True
    random_flip: bool = False
    cache_latents: bool = True
    small_images: str = "upscale"
    masked_loss: bool = False
    # adapter: LoRA² (or the peft baselines, built from the same fields where their meaning fits)
    adapter_type: str = "lora2"
    lora: LoRA2Config = field(default_factory=LoRA2Config)
    entropy_weight: float | None = None
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
    ema_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    compile: str = "auto"
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
        for key, choices in CHOICES.items():
            if key in LORA_KEYS or key == "rank_mode":
                continue
            values = getattr(self, key)
            for value in values if isinstance(values, list) else [values]:
                if value not in choices:
                    raise ValueError(f"{key} must be one of {choices}, got {value!r}")
        for key, minimum in _AT_LEAST.items():
            value = getattr(self, key)
            if value is not None and not value >= minimum:
                raise ValueError(f"{key} must be >= {minimum}, got {value!r}")
        for key in _POSITIVE:
            value = getattr(self, key)
            if value is not None and not value > 0:
                raise ValueError(f"{key} must be > 0, got {value!r}")
        for key in _FRACTIONS:
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key} must lie in [0, 1), got {getattr(self, key)!r}")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            raise ValueError(f"resolution must be a multiple of 8 (VAE downsampling), got {self.resolution}")
        self._check_photo_options()
        if not self.identifier.strip():
            raise ValueError("identifier must be a non-empty token such as 'sks'")
        if not isinstance(self.lora, LoRA2Config):
            raise ValueError(f"lora must be a LoRA2Config, got {type(self.lora).__name__}")
        backend_class(self.adapter_type).check_config(self)

    def _check_photo_options(self) -> None:
        if self.aspect_buckets and self.resolution is not None and self.resolution % BUCKET_STEP:
            raise ValueError(
                f"aspect_buckets needs a resolution that is a multiple of {BUCKET_STEP} (bucket sides are), "
                f"got {self.resolution}"
            )
        extension = self.caption_extension
        if extension is not None and (
            not extension.startswith(".") or len(extension) < 2 or "/" in extension or extension in IMAGE_SUFFIXES
        ):
            raise ValueError(f"caption_extension must be a non-image file suffix such as '.txt', got {extension!r}")
        if self.optimizer == "prodigy" and self.text_encoder_lr not in (None, self.learning_rate):
            raise ValueError(
                "optimizer 'prodigy' takes one learning rate for all adapter weights (it scales its own step size): "
                f"text_encoder_lr {self.text_encoder_lr} differs from learning_rate {self.learning_rate}"
            )

    # ------------------------------------------------------------------ derived configs
    @property
    def rank_mode(self) -> str:
        return "adaptive" if self.lora.adaptive else "fixed"

    def text_encoder_lora(self) -> LoRA2Config:
        """The LoRA2Config of the text-encoder adapters: the UNet's, on ``text_encoder_target_modules``."""
        return dataclasses.replace(
            self.lora, target_modules=list(self.text_encoder_target_modules), rank_pattern={}, exclude_modules=[]
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        return MIXED_PRECISION[self.mixed_precision]

    # ------------------------------------------------------------------ flat views
    def to_dict(self) -> dict:
        """Flat mapping of every option name to its value (what train_config.yaml and checkpoints hold)."""
        flat = {}
        for f in dataclasses.fields(self):
            if f.name == "lora":
                flat["rank_mode"] = self.rank_mode
                flat.update({key: _copy(getattr(self.lora, key)) for key in LORA_KEYS})
            else:
                flat[f.name] = _copy(getattr(self, f.name))
        return flat

    def replace(self, **changes) -> TrainConfig:
        """A copy with some flat options changed (validated again)."""
        return TrainConfig.from_dict({**self.to_dict(), **changes})

    @classmethod
    def from_dict(cls, data: dict, source: str = "") -> TrainConfig:
        """Build from flat option names (dashes allowed), parsing each value with ``parse_value``; errors name the
        option, the value and the ``source`` (a file name, "command line")."""
        data = {str(key).replace("-", "_"): value for key, value in data.items()}
        specs = option_specs()
        unknown = sorted(set(data) - set(specs))
        if unknown:
            raise ValueError(f"{source or 'config'}: unknown option(s) {unknown}")
        values = {key: parse_value(specs[key], value, source) for key, value in data.items()}
        lora = {key: values.pop(key) for key in LORA_KEYS if key in values}
        if "rank_mode" in values:
            lora["adaptive"] = values.pop("rank_mode") == "adaptive"
        try:
            return cls(**values, lora=LoRA2Config(**lora))
        except ValueError as error:
            raise ValueError(f"{source}: {error}" if source else str(error)) from None

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Read a YAML file holding a mapping of option names to values (``ValueError`` naming the file)."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from error
        if not isinstance(data, dict):
            raise ValueError(f"config file {path} must hold a mapping of option names to values")
        return cls.from_dict(data, source=str(path))

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


def _copy(value):
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


# ---------------------------------------------------------------------- options: types, parsing, help
@dataclass(frozen=True)
class OptionSpec:
    """One flat option: its scalar type, container, whether None is allowed, choices, default and help."""

    name: str
    kind: type
    container: str  # "scalar", "list", "list_or_regex" (a list, or one string = a regex, as peft), "dict"
    optional: bool
    choices: tuple | None
    default: object
    help: str


def _docstring_help(cls: type) -> dict[str, str]:
    """``name: text`` entries of a class docstring (continuation lines indented deeper), as one line each."""
    entries: dict[str, str] = {}
    current = None
    for line in (cls.__doc__ or "").splitlines():
        match = re.match(r"^    (\w+): (.*)$", line)
        if match:
            current = match.group(1)
            entries[current] = match.group(2).strip()
        elif current and line.startswith("        ") and line.strip():
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


def _spec(name: str, hint, default, help_text: str) -> OptionSpec:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    optional = type(None) in args
    args = [a for a in args if a is not type(None)]
    container, kind = "scalar", args[0]
    if typing.get_origin(args[0]) is list:
        container, kind = ("list_or_regex" if str in args[1:] else "list"), typing.get_args(args[0])[0]
    elif typing.get_origin(args[0]) is dict:
        container, kind = "dict", typing.get_args(args[0])[1]
    return OptionSpec(name, kind, container, optional, CHOICES.get(name), default, help_text)


def option_specs() -> dict[str, OptionSpec]:
    """Every flat option, in the order a run's YAML file lists them."""
    specs = {}
    train_hints, lora_hints = typing.get_type_hints(TrainConfig), typing.get_type_hints(LoRA2Config)
    train_help, lora_help = _docstring_help(TrainConfig), _docstring_help(LoRA2Config)
    lora_defaults = LoRA2Config()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "lora":
            specs["rank_mode"] = OptionSpec(
                "rank_mode", str, "scalar", False, RANK_MODES, "adaptive", train_help["lora"]
            )
            for key in LORA_KEYS:
                specs[key] = _spec(key, lora_hints[key], getattr(lora_defaults, key), lora_help.get(key, ""))
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        specs[f.name] = _spec(f.name, train_hints[f.name], default, train_help.get(f.name, ""))
    return specs


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _scalar(spec: OptionSpec, value, source: str):
    where = f"{source}: {spec.name}" if source else spec.name
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        raise ValueError(f"{where} must be true or false, got {value!r}")
    if spec.kind is str:
        if isinstance(value, str):
            return value
        raise ValueError(f"{where} must be a string, got {value!r} (quote it in YAML)")
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value) if spec.kind is float else int(value)
        except ValueError as error:
            raise ValueError(
                f"{where} must be {'a number' if spec.kind is float else 'an integer'}, got {value!r}"
            ) from error
    if spec.kind is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def parse_value(spec: OptionSpec, value, source: str = ""):
    """One option's value from YAML or a flag, converted to its type (``ValueError`` naming option and value)."""
    value = _parse_container(spec, value, source)
    if spec.choices is not None:
        for item in value if isinstance(value, list) else [value]:
            if item not in spec.choices:
                raise ValueError(
                    f"{source + ': ' if source else ''}{spec.name} must be one of {spec.choices}, got {item!r}"
                )
    return value


def _parse_container(spec: OptionSpec, value, source: str):
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and spec.optional):
        if spec.optional:
            return None
        raise ValueError(f"{source + ': ' if source else ''}{spec.name} must be given a value, got null")
    if spec.container == "dict":
        if not isinstance(value, dict):
            raise ValueError(f'{source}: {spec.name} must be a mapping such as {{"to_q": 4}}, got {value!r}')
        return {str(key): _scalar(spec, item, source) for key, item in value.items()}
    if spec.container == "scalar":
        return _scalar(spec, value, source)
    if isinstance(value, str):
        # one string: a regex over module names (peft's target_modules rule), else a list of one entry
        return value if spec.container == "list_or_regex" else [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{source + ': ' if source else ''}{spec.name} must be a list, got {value!r}")
    return [_scalar(spec, item, source) for item in value]


# ---------------------------------------------------------------------- command-line flags
def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per option; flags not given are absent from the namespace, so YAML values stay."""
    for spec in option_specs().values():
        flags = [f"--{spec.name.replace('_', '-')}"]
        if "_" in spec.name:
            flags.append(f"--{spec.name}")
        options = {
            "dest": spec.name,
            "default": argparse.SUPPRESS,
            "help": f"{spec.help} (default: {spec.default})".strip(),
            "metavar": spec.name.upper() if spec.choices is None else None,
        }
        if spec.choices is not None:
            options["choices"] = spec.choices
        if spec.kind is bool:
            # --flag, --flag true/false, --no-flag
            parser.add_argument(*flags, nargs="?", const="true", **options)
            parser.add_argument(
                f"--no-{spec.name.replace('_', '-')}", dest=spec.name, action="store_const", const="false",
                default=argparse.SUPPRESS,
            )  # fmt: skip
        elif spec.container in ("list", "list_or_regex"):
            parser.add_argument(*flags, nargs="+", **options)
        elif spec.container == "dict":
            parser.add_argument(*flags, type=_json_mapping, **{**options, "help": f"JSON mapping; {options['help']}"})
        else:
            parser.add_argument(*flags, **options)


def _json_mapping(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"expected a JSON mapping such as '{{\"to_q\": 4}}', got {text!r}") from error
    return value


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """YAML file (``args.config``, optional) overridden by every flag that was given; one parser for both."""
    base = TrainConfig.from_yaml(args.config).to_dict() if getattr(args, "config", None) else {}
    specs = option_specs()
    given = {key: parse_value(specs[key], getattr(args, key), "command line") for key in specs if hasattr(args, key)}
    return TrainConfig.from_dict({**base, **given}, source="command line")
