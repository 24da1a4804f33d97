"""`lora2 generate` checks an adapter like `lora2 inspect` and against the pipeline before diffusers loads it: a bad
file is one line naming it (exit code 2), never a traceback or a black image."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch
from safetensors.torch import save_file

from lora2.cli import main
from lora2.train.generate import GenerateConfig, generate


@pytest.fixture(scope="module")
def good_tensors(tiny_base) -> dict[str, torch.Tensor]:
    """A rank-2 LoRA on every attention query projection of the tiny UNet."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, module in unet.named_modules():
        if name.endswith("attn1.to_q"):
            tensors[f"unet.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=generator) * 0.1
            tensors[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=generator) * 0.1
    return tensors


def _first(tensors: dict, suffix: str) -> str:
    return next(key for key in sorted(tensors) if key.endswith(suffix))


def _bad_file(kind: str, tmp_path, tensors: dict):
    path = tmp_path / ("lora.pt" if kind == "pickle" else "lora.safetensors")
    tensors = dict(tensors)
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("a LoRA, promised\n")
    elif kind in ("pickle", "renamed pickle"):
        torch.save(tensors, path)
    else:
        key = _first(tensors, "lora_A.weight")
        if kind == "nan":
            tensors[key] = tensors[key].clone()
            tensors[key][0, 0] = float("nan")
        elif kind == "too large":  # finite weights whose product passes float32's range
            partner = key.replace("lora_A", "lora_B")
            tensors[key], tensors[partner] = tensors[key] * 1e20, tensors[partner] * 1e20
        elif kind == "shape mismatch":
            tensors[key] = torch.randn(2, tensors[key].shape[1] + 3)
        elif kind == "unknown module":
            tensors = {k.replace("attn1.to_q", "attn1.to_nothing"): v for k, v in tensors.items()}
        elif kind == "component not in pipeline":
            tensors = {k.replace("unet.", "transformer.", 1): v for k, v in tensors.items()}
        save_file(tensors, str(path))
    return path


EXPECTED = {
    "empty": "not a safetensors file",
    "text": "not a safetensors file",
    "pickle": "pickle checkpoints",
    "renamed pickle": "pickle/torch.save checkpoint",
    "nan": "weights contain NaN or Inf",
    "too large": "weights too large",
    "shape mismatch": r"weights down \(2, \d+\), up \(\d+, 2\) do not fit Linear",
    "unknown module": "match no nn.Linear/nn.Conv2d module of UNet2DConditionModel",
    "component not in pipeline": "component 'transformer' is not part of the pipeline",
}


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_a_bad_adapter_is_one_clear_error(kind, tiny_base, good_tensors, tmp_path, caplog):
    lora = _bad_file(kind, tmp_path, good_tensors)
    out = tmp_path / "image.png"
    argv = ["generate", "--base", str(tiny_base), "--lora", str(lora), "--prompt", "a dog", "--steps", "1"]
    with caplog.at_level(logging.ERROR, logger="lora2"):
        assert main([*argv, "--device", "cpu", "--out", str(out)]) == 2
    (error,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert error.startswith(str(lora)) and "\n" not in error
    assert re.search(EXPECTED[kind], error), error
    assert not out.exists()


def test_a_lora2_native_file_is_refused_with_the_way_out(tiny_base, good_tensors, tmp_path):
    from lora2.export.files import write_safetensors

    path = tmp_path / "lora2_adapter.safetensors"
    names = sorted({key.removeprefix("unet.").rsplit(".lora_", 1)[0] for key in good_tensors})
    config = {"target_modules": ["to_q"], "init_rank": 2, "max_rank": 2, "adaptive": False}
    modules = {name: {"rank": 2} for name in names}
    header = {"lora2_header": 1, "format": "lora2", "components": {"unet": {"config": config, "modules": modules}}}
    tensors = {}
    for name in names:
        tensors[f"unet.{name}.lora_A"] = good_tensors[f"unet.{name}.lora_A.weight"]
        tensors[f"unet.{name}.lora_B"] = good_tensors[f"unet.{name}.lora_B.weight"]
        tensors[f"unet.{name}.log_nu"] = torch.zeros(())
    write_safetensors(path, tensors, {"lora2": json.dumps(header)})
    config = GenerateConfig(prompts=["a dog"], out=str(tmp_path / "x.png"), base=str(tiny_base), lora=str(path))
    with pytest.raises(ValueError, match="a lora2 adapter, which diffusers' load_lora_weights does not read"):
        generate(config)


def test_a_good_adapter_still_generates(tiny_base, good_tensors, tmp_path):
    path = tmp_path / "good" / "pytorch_lora_weights.safetensors"
    path.parent.mkdir()
    save_file(good_tensors, str(path))
    config = GenerateConfig(
        prompts=["a dog"], out=str(tmp_path / "x.png"), base=str(tiny_base), lora=str(path.parent), steps=1,
        device="cpu",
    )  # fmt: skip
    assert generate(config) == [tmp_path / "x.png"]
