"""`lora2 eval` on a tiny random SDXL pipeline: runs, writes JSON, is reproducible; bad inputs fail early."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest
import torch
import yaml
from log_capture import Messages

from lora2.cli import main
from lora2.eval.evaluate import (
    EvalConfig,
    adapter_summary,
    default_base,
    default_batch_size,
    evaluate,
    load_pipeline,
    resolve_evaluators,
)
from lora2.eval.metrics import DEFAULT_CLIP, DEFAULT_DINO
from lora2.train.run_folder import RunFolder


def _config(tiny_sdxl, tiny_adapter, dreambooth_root, evaluators, tmp_path, **overrides):
    dino, clip = evaluators
    values = dict(
        base=str(tiny_sdxl),
        lora=str(tiny_adapter),
        subject=str(dreambooth_root / "pup"),
        num_images=1,
        max_prompts=1,
        num_inference_steps=2,
        dino_model=str(dino),
        clip_model=str(clip),
        resolution=32,
        output=str(tmp_path / "eval.json"),
    )
    return EvalConfig(**{**values, **overrides})


def test_eval_writes_json_and_is_deterministic(tiny_sdxl, tiny_adapter, dreambooth_root, evaluators, tmp_path):
    result = evaluate(_config(tiny_sdxl, tiny_adapter, dreambooth_root, evaluators, tmp_path))
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["summary"] == result["summary"]
    assert saved["per_prompt"][0]["prompt"] == "a sks dog wearing a red hat"
    assert saved["per_prompt"][0]["prompt_without_identifier"] == "a dog wearing a red hat"
    for metric in ("dino", "clip_i", "clip_t"):
        assert -1.0 <= saved["summary"][metric]["mean"] <= 1.0
    assert saved["adapter"]["mean_rank"] == pytest.approx(3.5)
    again = evaluate(
        _config(tiny_sdxl, tiny_adapter, dreambooth_root, evaluators, tmp_path, output=str(tmp_path / "b.json"))
    )
    assert again["per_prompt"] == result["per_prompt"]


def test_scores_do_not_depend_on_the_batch_size(tiny_sdxl, tiny_adapter, dreambooth_root, evaluators, tmp_path):
    """Image j of a prompt has its own generator: a GPU's default batch (64) and a CPU's (8) give the same cells."""
    assert default_batch_size(torch.device("cpu")) == 8 and default_batch_size(torch.device("cuda")) == 64
    results = []
    for batch_size in (1, 3):
        output = str(tmp_path / f"eval{batch_size}.json")
        grid = dict(num_images=2, max_prompts=2, batch_size=batch_size, output=output)
        results.append(evaluate(_config(tiny_sdxl, tiny_adapter, dreambooth_root, evaluators, tmp_path, **grid)))
    for one, three in zip(*(r["per_prompt"] for r in results)):
        for metric in ("dino", "clip_i", "clip_t"):
            assert three[metric] == pytest.approx(one[metric], abs=1e-4)


def test_eval_from_run_folder_via_cli(tiny_sdxl, tiny_adapter, dreambooth_root, evaluators, tmp_path):
    run = tmp_path / "run"  # the layout of lora2.train.run_folder
    run.mkdir()
    shutil.copy(tiny_adapter, run / "pytorch_lora_weights.safetensors")
    config = {
        "base": str(tiny_sdxl),
        "instance_data_dir": str(dreambooth_root / "toy1"),
        "identifier": "zwx",
        "resolution": 32,
    }
    (run / "train_config.yaml").write_text(yaml.safe_dump(config))
    dino, clip = evaluators
    code = main(
        [
            "eval",
            "--run",
            str(run),
            "--num-images",
            "1",
            "--max-prompts",
            "1",
            "--num-inference-steps",
            "1",
            "--dino-model",
            str(dino),
            "--clip-model",
            str(clip),
        ]
    )
    assert code == 0
    saved = json.loads((run / "eval.json").read_text())
    assert saved["subject"] == "toy1" and saved["per_prompt"][0]["prompt"] == "a zwx toy in the jungle"


def test_adapter_summary_counts_ranks_and_size(tiny_adapter):
    summary = adapter_summary(tiny_adapter)
    assert set(summary["ranks"].values()) == {2, 5}
    assert all(name.startswith(("down_blocks", "mid_block", "up_blocks")) for name in summary["ranks"])
    assert summary["size_gb_fp32"] == pytest.approx(summary["parameters"] * 4 / 2**30)


def test_adapter_load_says_nothing_about_text_encoders_the_file_does_not_adapt(tiny_sdxl, tiny_adapter):
    from diffusers import DiffusionPipeline

    handler = Messages()
    logging.getLogger("diffusers").addHandler(handler)  # diffusers' loggers do not propagate to the root logger
    try:
        DiffusionPipeline.from_pretrained(str(tiny_sdxl)).load_lora_weights(str(tiny_adapter))  # plain diffusers
        if not any("No LoRA keys" in message for message in handler.messages):
            pytest.skip("this diffusers version does not report text encoders without LoRA keys")
        handler.messages.clear()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pipe = load_pipeline(str(tiny_sdxl), tiny_adapter, torch.device("cpu"), torch.float32)
    finally:
        logging.getLogger("diffusers").removeHandler(handler)
    assert handler.messages == []
    assert [str(w.message) for w in caught if "torch_dtype" in str(w.message)] == []
    assert any(hasattr(module, "lora_A") for module in pipe.unet.modules())


def test_bad_inputs_fail_before_loading_models(tmp_path, dreambooth_root, tiny_adapter):
    (tmp_path / "run").mkdir()
    with pytest.raises(ValueError, match="no adapter"):
        RunFolder(tmp_path / "run").find_adapter()
    with pytest.raises(ValueError, match="no training config"):
        evaluate(EvalConfig(run=str(tmp_path / "run")))
    with pytest.raises(ValueError, match="give --run"):
        EvalConfig(lora=str(tiny_adapter))
    empty = tmp_path / "db"
    shutil.copytree(dreambooth_root, empty)
    for image in (empty / "pup").iterdir():
        image.unlink()
    with pytest.raises(ValueError, match="no images"):
        evaluate(EvalConfig(base="unused", lora=str(tiny_adapter), subject=str(empty / "pup")))
    assert main(["eval", "--run", str(tmp_path / "run")]) == 2


def test_world_subjects_use_the_world_evaluators(dreambooth_root, tmp_path, monkeypatch):
    import lora2.world

    fake = {
        "subjects_dir": str(dreambooth_root),
        "clip_evaluator": "/w/clip",
        "dino_evaluator": "/w/dino",
        "base_model": "/w/base",
        "ready": {"subjects_dir": True, "clip_evaluator": True, "dino_evaluator": True},
    }
    monkeypatch.setattr(lora2.world, "info", lambda materialize=True: fake)
    assert resolve_evaluators(dreambooth_root / "pup", None, None) == ("/w/dino", "/w/clip")
    assert resolve_evaluators(dreambooth_root / "pup", "mine", None) == ("mine", "/w/clip")
    assert resolve_evaluators(tmp_path / "elsewhere", None, None) == (DEFAULT_DINO, DEFAULT_CLIP)
    with pytest.raises(ValueError, match="no base model"):  # base_model not ready
        default_base()
    # a run on the world's base model: the world's evaluators for any subject folder
    fake["ready"]["base_model"] = True
    assert resolve_evaluators(tmp_path / "elsewhere", None, None, "/w/base") == ("/w/dino", "/w/clip")
    assert resolve_evaluators(tmp_path / "elsewhere", None, None, "/other/base") == (DEFAULT_DINO, DEFAULT_CLIP)


def test_a_bad_adapter_is_refused_before_diffusers_loads_it(
    tiny_sdxl, tiny_adapter, dreambooth_root, evaluators, tmp_path
):
    """The file checks of `lora2 inspect` (here NaN weights) and a shape check against the pipeline, then one line."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(tiny_adapter)
    key = sorted(k for k in tensors if k.endswith("lora_A.weight"))[0]
    nan, shape = tmp_path / "nan.safetensors", tmp_path / "shape.safetensors"
    save_file({**tensors, key: tensors[key] * float("nan")}, str(nan))
    save_file({**tensors, key: torch.zeros(tensors[key].shape[0], 7)}, str(shape))
    pickle = tmp_path / "renamed.safetensors"
    torch.save(tensors, pickle)
    for path, message in ((nan, "weights contain NaN or Inf"), (shape, "do not fit Linear"), (pickle, "pickle")):
        with pytest.raises(ValueError, match=message) as error:
            evaluate(_config(tiny_sdxl, path, dreambooth_root, evaluators, tmp_path))
        assert str(error.value).startswith(str(path))
    assert not (tmp_path / "eval.json").exists()


def test_offline_hub_evaluator_fails_at_once_in_one_line(monkeypatch):
    from transformers import AutoConfig

    from lora2.eval.metrics import DinoEncoder

    seen = {}
    real = AutoConfig.from_pretrained

    def spy(name, **kwargs):
        seen.update(kwargs)
        return real(name, **kwargs)

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(AutoConfig, "from_pretrained", spy)
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE is set") as error:
        DinoEncoder.from_pretrained("facebook/dino-vits16")
    assert "\n" not in str(error.value) and seen == {"local_files_only": True}  # no network, so no retries
