"""TrainConfig: YAML + flag overrides, one flag per field, rank modes sharing one LoRA2Config."""

from __future__ import annotations

import dataclasses

import pytest

from lora2.cli import build_parser
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
    assert config.target_modules == ["to_q", "to_v"] and config.random_flip is False and config.snr_gamma == 5.0
    assert config.rank_pattern == {"to_q": 4}
    options = {
        opt
        for action in build_parser()._subparsers._group_actions[0].choices["train"]._actions
        for opt in action.option_strings
    }
    for field in dataclasses.fields(TrainConfig):
        assert f"--{field.name.replace('_', '-')}" in options


def test_rank_modes_map_to_one_lora_config():
    adaptive = TrainConfig(rank_mode="adaptive", init_rank=4).lora_config()
    fixed = TrainConfig(rank_mode="fixed", init_rank=4).lora_config()
    assert adaptive.adaptive and not fixed.adaptive
    assert dataclasses.replace(fixed, adaptive=True) == adaptive
    text = TrainConfig().lora_config(["q_proj"])
    assert text.target_modules == ["q_proj"]


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
        TrainConfig(**bad)


def test_unknown_yaml_key_is_named(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("max_steps: 3\n")
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig.from_yaml(path)


def test_yaml_round_trip(tmp_path):
    config = TrainConfig(max_train_steps=3, target_modules=["to_k"], snr_gamma=5.0)
    config.save_yaml(tmp_path / "c.yaml")
    assert TrainConfig.from_yaml(tmp_path / "c.yaml") == config
