"""TrainConfig: YAML + flag overrides, one flag per field, rank modes sharing one LoRA2Config."""

from __future__ import annotations

import dataclasses

import pytest

from lora2.cli import build_parser
from lora2.lora.config import LoRA2Config
from lora2.train.config import TrainConfig, config_from_args


def test_every_field_is_a_flag_and_flags_override_yaml(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_train_steps: 7\nlearning_rate: 1.0e-4\nrank-mode: fixed\nrandom_flip: true\n")
    args = build_parser().parse_args(
        [
            "train",
            "--config",
            str(path),
            "--max-train-steps",
            "9",
            "--target_modules",
            "to_q",
            "to_v",
            "--no-random-flip",
            "--snr-gamma",
            "5",
            "--rank-pattern",
            '{"to_q": 4}',
        ]
    )
    config = config_from_args(args)
    assert config.max_train_steps == 9 and config.learning_rate == 1e-4 and config.rank_mode == "fixed"
    assert config.lora.target_modules == ["to_q", "to_v"] and config.random_flip is False and config.snr_gamma == 5.0
    assert config.lora.rank_pattern == {"to_q": 4}
    options = {
        opt
        for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions
        for opt in action.option_strings
    }
    for name in TrainConfig().to_dict():
        assert f"--{name.replace('_', '-')}" in options


def test_rank_modes_map_to_one_lora_config():
    adaptive = TrainConfig.from_dict({"rank_mode": "adaptive", "init_rank": 4}).lora
    fixed = TrainConfig.from_dict({"rank_mode": "fixed", "init_rank": 4}).lora
    assert adaptive.adaptive and not fixed.adaptive
    assert dataclasses.replace(fixed, adaptive=True) == adaptive
    text = TrainConfig.from_dict({"text_encoder_target_modules": ["q_proj"], "rank_pattern": {"to_q": 4}})
    assert text.text_encoder_lora().target_modules == ["q_proj"] and text.text_encoder_lora().rank_pattern == {}


def test_adapter_defaults_are_lora2_configs():
    flat = TrainConfig().to_dict()
    for f in dataclasses.fields(LoRA2Config):
        if f.name != "adaptive":
            assert flat[f.name] == getattr(LoRA2Config(), f.name), f.name


@pytest.mark.parametrize(
    "bad",
    [
        {"rank_mode": "auto"},
        {"mixed_precision": "fp8"},
        {"resolution": 30},
        {"quantile": 1.5},
        {"max_train_steps": 0},
        {"export_formats": ["ckpt"]},
        {"nu_lr": 0.0},
    ],
)
def test_bad_values_raise(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TrainConfig.from_dict(bad)


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 3\n")
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig.from_yaml(path)


def test_yaml_round_trip(tmp_path):
    config = TrainConfig.from_dict({"max_train_steps": 3, "target_modules": ["to_k"], "snr_gamma": 5.0})
    config.save_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == config


# --------------------------------------------------------------------------- one parser for YAML and flags


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("learning_rate: 1e-4", {"learning_rate": 1e-4}),  # PyYAML reads 1e-4 as a string
        ("overwrite: 'false'", {"overwrite": False}),
        ("max_train_steps: '3'", {"max_train_steps": 3}),
        ("target_modules: to_q", {"target_modules": "to_q"}),  # one string: a regex, as in peft
        ("sample_prompts: '{instance} at night'", {"sample_prompts": ["{instance} at night"]}),
        ("snr_gamma: null", {"snr_gamma": None}),
    ],
)
def test_yaml_values_are_parsed_by_type(tmp_path, yaml_text, expected):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text + "\n")
    flat = TrainConfig.from_yaml(path).to_dict()
    assert {key: flat[key] for key in expected} == expected


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("lr_warmup_steps: -5", "lr_warmup_steps must be >= 0"),
        ("learning_rate: -1e-4", "learning_rate must be > 0"),
        ("learning_rate: fast", "learning_rate must be a number, got 'fast'"),
        ("max_grad_norm: .nan", "max_grad_norm must be a finite number"),
        ("learning_rate: .inf", "learning_rate must be a finite number"),
        ("overwrite: maybe", "overwrite must be true or false"),
        ("max_train_steps: 2.5", "max_train_steps must be an integer"),
        ("target_modules: [to_q", "not valid YAML"),
        ("base: !!python/object:os.system {}", "not valid YAML"),
        ("rank_pattern: [1, 2]", "rank_pattern must be a mapping"),
        ("identifier: 7", "identifier must be a string"),
        ("adaptive: false", "unknown option"),
    ],
)
def test_bad_yaml_is_one_line_naming_file_and_value(tmp_path, yaml_text, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text + "\n")
    with pytest.raises(ValueError, match=message) as error:
        TrainConfig.from_yaml(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_flags_use_the_same_parser(tmp_path):
    args = build_parser().parse_args(["train", "--learning-rate", "1e-4", "--overwrite", "false", "--seed", "3"])
    config = config_from_args(args)
    assert config.learning_rate == 1e-4 and config.overwrite is False and config.seed == 3
    bad = build_parser().parse_args(["train", "--lr-warmup-steps", "-5"])
    with pytest.raises(ValueError, match="lr_warmup_steps must be >= 0"):
        config_from_args(bad)


def test_photo_options_from_yaml_and_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "caption_extension: .txt\ncaption_dropout_rate: 0.1\nshuffle_caption: true\nkeep_tokens: 1\n"
        "aspect_buckets: true\nresolution: 1024\nmasked_loss: 'yes'\noptimizer: prodigy\nlearning_rate: 1\n"
        "ema_decay: 0.999\nreport_to: wandb\n"
    )
    args = build_parser().parse_args(["train", "--config", str(path), "--keep-tokens", "2", "--no-masked-loss"])
    config = config_from_args(args)
    assert (config.caption_extension, config.caption_dropout_rate, config.shuffle_caption) == (".txt", 0.1, True)
    assert (config.keep_tokens, config.aspect_buckets, config.masked_loss) == (2, True, False)
    assert (config.optimizer, config.learning_rate, config.ema_decay) == ("prodigy", 1.0, 0.999)
    assert config.report_to == "wandb"
    with pytest.raises(ValueError, match="ema_decay must lie in"):
        TrainConfig.from_dict({"ema_decay": 1.0})
    with pytest.raises(ValueError, match="adapter_type 'adalora'"):
        TrainConfig.from_dict({"adapter_type": "adalora", "init_rank": 8, "target_rank": 4, "ema_decay": 0.9})
