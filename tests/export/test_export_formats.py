"""Export and reload of LoRA² adapters at different ranks; other projects' loaders are the judges.

Every check compares the tiny SDXL pipeline's outputs (text encoder 1 hidden states, text encoder 2 pooled
embeddings, UNet noise prediction) with those of the in-memory LoRA² model, fp32, atol 1e-4.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import COMPONENTS, adapt, assert_outputs_close, components, outputs, targets
from safetensors import safe_open

import lora2
from lora2.export import default_component, read_adapter
from lora2.export.names import PatternTable

FORMATS = ["diffusers", "kohya", "peft", "lora2"]


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    """One export per format of the trained pipeline."""
    pipe = trained[0]
    root = tmp_path_factory.mktemp("saved")
    return {
        fmt: lora2.save_lora(components(pipe), root / fmt, format=fmt, metadata={"steps": 500, "subject": "dog"})
        for fmt in FORMATS
    }


def test_adapters_really_change_outputs_and_ranks_differ(trained):
    _, ours, ranks, _, base = trained
    for got, want in zip(ours, base):
        assert (got - want).abs().max() > 1e-2
    for name in COMPONENTS:
        assert len(set(ranks[name].values())) >= 4, ranks[name]


def test_in_memory_equals_merged(trained):
    pipe, ours = copy.deepcopy(trained[0]), trained[1]
    for model in components(pipe).values():
        lora2.merge(model)
    assert_outputs_close(outputs(pipe), ours, atol=1e-5)
    for model in components(pipe).values():
        lora2.merge_and_unload(model)
    assert not any(True for m in components(pipe).values() for _ in lora2.lora_layers(m))
    assert_outputs_close(outputs(pipe), ours, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_lora_into_plain_model_restores_ranks_nu_and_outputs(fmt, trained, saved, load_pipe):
    _, ours, ranks, log_nu, _ = trained
    pipe = load_pipe()
    parts = components(pipe)
    info = lora2.load_lora(parts, saved[fmt])
    assert info["format"] == fmt and info["injected"] and info["nu_restored"]
    assert info["metadata"] == {"steps": 500, "subject": "dog"}
    assert info["ranks"] == ranks
    for name, model in parts.items():
        assert lora2.ranks(model) == ranks[name]
        assert {n: layer.log_nu.item() for n, layer in lora2.lora_layers(model)} == log_nu[name]  # exact
        assert all(layer.adaptive for _, layer in lora2.lora_layers(model))
    assert_outputs_close(outputs(pipe), ours, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_load_lora_into_injected_model_with_other_config(fmt, trained, saved, load_pipe):
    _, ours, ranks, log_nu, _ = trained
    pipe = load_pipe()
    parts = components(pipe)
    for name, model in parts.items():
        config = lora2.LoRA2Config(target_modules=targets(name), init_rank=2, max_rank=32, lambda_scaling="sum")
        lora2.inject(model, config)
    info = lora2.load_lora(parts, saved[fmt])
    assert not info["injected"] and info["nu_restored"]
    for name, model in parts.items():
        assert lora2.ranks(model) == ranks[name]
        assert {n: layer.log_nu.item() for n, layer in lora2.lora_layers(model)} == log_nu[name]
    assert_outputs_close(outputs(pipe), ours, atol=1e-5)


def test_lora2_native_file_restores_the_exact_state(trained, saved, load_pipe):
    pipe = load_pipe()
    lora2.load_lora(components(pipe), saved["lora2"])
    for name, model in components(pipe).items():
        want = dict(lora2.lora_layers(getattr(trained[0], name)))
        for module, layer in lora2.lora_layers(model):
            ref = want[module]
            assert torch.equal(layer.lora_A[: layer.r], ref.lora_A[: ref.r])
            assert torch.equal(layer.active_b(), ref.active_b())
            assert torch.equal(layer.log_nu, ref.log_nu)
    assert_outputs_close(outputs(pipe), trained[1], atol=0.0)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_diffusers_load_lora_weights_reproduces_our_model(fmt, trained, saved, load_pipe):
    pipe = load_pipe()
    pipe.load_lora_weights(str(saved[fmt]))
    assert_outputs_close(outputs(pipe), trained[1], atol=1e-4)


def test_diffusers_finds_the_file_in_a_directory(trained, saved, load_pipe):
    pipe = load_pipe()
    pipe.load_lora_weights(str(saved["diffusers"].parent))
    assert_outputs_close(outputs(pipe), trained[1], atol=1e-4)


def test_peft_from_pretrained_reproduces_our_model(trained, saved, load_pipe):
    from peft import PeftModel

    pipe = load_pipe()
    for name in COMPONENTS:
        setattr(pipe, name, PeftModel.from_pretrained(getattr(pipe, name), saved["peft"] / name))
    assert_outputs_close(outputs(pipe), trained[1], atol=1e-4)


def test_peft_set_peft_model_state_dict(trained, saved, load_pipe):
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    pipe = load_pipe()
    directory = saved["peft"] / "unet"
    config = LoraConfig.from_pretrained(str(directory))
    unet = inject_adapter_in_model(config, pipe.unet)
    result = set_peft_model_state_dict(unet, load_file(directory / "adapter_model.safetensors"))
    assert not result.unexpected_keys
    want = dict(lora2.lora_layers(trained[0].unet))
    for name, module in unet.named_modules():
        if name in want:
            assert torch.allclose(module.get_delta_weight("default"), want[name].get_delta_weight(), atol=1e-6)


def test_diffusers_file_layout(saved, trained):
    ranks = trained[2]
    with safe_open(str(saved["diffusers"]), framework="pt") as handle:
        keys = set(handle.keys())
        header = handle.metadata()
    conv = "unet.down_blocks.0.resnets.0.conv1"
    assert f"{conv}.lora_A.weight" in keys
    meta = json.loads(header["lora_adapter_metadata"])
    assert set(meta["unet.rank_pattern"]) == set(meta["unet.alpha_pattern"])
    assert meta["unet.rank_pattern"] == meta["unet.alpha_pattern"]  # alpha = rank: scale 1
    assert len(meta["unet.rank_pattern"]) < len(set(ranks["unet"].values()))  # one key per rank other than r
    patterns = PatternTable(meta["unet.rank_pattern"])  # peft's matching
    for name, rank in ranks["unet"].items():
        found = patterns.get(name)
        assert (meta["unet.r"] if found is None else found) == rank
    assert any(k.startswith("text_encoder.text_model.encoder.layers.0") for k in keys)
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.0") for k in keys)
    lora2_header = json.loads(header["lora2"])
    assert lora2_header["components"]["unet"]["config"]["max_rank"] == 16
    file = read_adapter(saved["diffusers"])
    module = file.adapter["unet"][conv.removeprefix("unet.")]
    assert module.down.shape[2:] == (3, 3) and module.up.shape[2:] == (1, 1)


def test_kohya_file_layout(saved):
    with safe_open(str(saved["kohya"]), framework="pt") as handle:
        keys = set(handle.keys())
        alphas = {handle.get_tensor(k).item() for k in keys if k.endswith(".alpha")}
    # SGM names, as kohya's SDXL trainer writes them (tiny layout: one resnet per block); see test_kohya.py
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight" in keys
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha" in keys
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc2.lora_down.weight" in keys
    assert len(alphas) == 1  # one alpha per file (see lora2.export.kohya)


def test_foreign_diffusers_file_loads_as_fixed_rank_lora(trained, saved, load_pipe, tmp_path):
    """A file written by diffusers itself (no lora2 header) → fixed-rank layers, Λ = I, same outputs."""
    from diffusers import StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    donor = load_pipe()
    donor.load_lora_weights(str(saved["diffusers"]))
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(donor.unet, adapter_name="default_0"),
        text_encoder_lora_layers=get_peft_model_state_dict(donor.text_encoder, adapter_name="default_0"),
        text_encoder_2_lora_layers=get_peft_model_state_dict(donor.text_encoder_2, adapter_name="default_0"),
    )
    from lora2.tools import inspect_file

    report = inspect_file(tmp_path)
    assert report["totals"]["total_rank"] == sum(sum(r.values()) for r in trained[2].values())
    pipe = load_pipe()
    info = lora2.load_lora(components(pipe), tmp_path)
    assert info["lora2"] is None and info["injected"] and not info["nu_restored"]
    assert info["ranks"] == trained[2]
    for model in components(pipe).values():
        assert not any(layer.adaptive for _, layer in lora2.lora_layers(model))
    assert_outputs_close(outputs(pipe), trained[1], atol=1e-4)


def test_single_component_save_and_load(trained, load_pipe, tmp_path):
    pipe = trained[0]
    path = lora2.save_lora(pipe.unet, tmp_path / "unet_only.safetensors")
    assert set(read_adapter(path).adapter) == {"unet"}
    other = load_pipe()
    info = lora2.load_lora(other.unet, path)
    assert info["ranks"] == trained[2]["unet"]
    for name, module in lora2.lora_layers(pipe.unet):
        layer = other.unet.get_submodule(name)
        assert torch.allclose(layer.get_delta_weight(), module.get_delta_weight(), atol=1e-6)
    assert default_component(pipe.text_encoder) == "text_encoder"
    assert default_component(pipe.text_encoder_2) == "text_encoder_2"
    assert default_component(pipe.unet) == "unet"


def test_fp16_export(trained, tmp_path):
    path = lora2.save_lora(components(trained[0]), tmp_path, format="kohya", dtype=torch.float16)
    with safe_open(str(path), framework="pt") as handle:
        assert all(handle.get_tensor(k).dtype == torch.float16 for k in handle.keys())


def test_resume_training_after_load(trained, saved, load_pipe):
    """A loaded adaptive model keeps training: gradients reach A, B and ν, and ranks follow ν after steps."""
    pipe = load_pipe()
    unet = pipe.unet
    lora2.load_lora(unet, saved["lora2"], strict=False)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    before = lora2.ranks(unet)
    for _ in range(3):
        loss = outputs(pipe)[2].square().mean() + lora2.regularization(unet)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert all(layer.log_nu.grad is not None for _, layer in lora2.lora_layers(unet))
    assert lora2.ranks(unet).keys() == before.keys()


def test_two_adapters_on_other_seeds_differ(load_pipe, tmp_path):
    """Guard against a loader that ignores the file: a second adapter gives other outputs."""
    one, two = load_pipe(), load_pipe()
    adapt(one, seed=0)
    adapt(two, seed=3)
    path = lora2.save_lora(components(two), tmp_path)
    fresh = load_pipe()
    fresh.load_lora_weights(str(path))
    assert_outputs_close(outputs(fresh), outputs(two), atol=1e-4)
    assert (outputs(fresh)[2] - outputs(one)[2]).abs().max() > 1e-2


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_tool_outputs_load_in_diffusers(fmt, trained, saved, load_pipe, tmp_path):
    """merge (w = ½, ½ of the same adapter) and full-rank resize give files diffusers reproduces exactly."""
    from lora2.tools import MergeSpec, ResizeSpec, merge_files, resize_file

    src = str(saved[fmt])
    merged = merge_files(MergeSpec([src, src], str(tmp_path / "merged.safetensors"), weights=[0.5, 0.5]))
    resized, report = resize_file(ResizeSpec(src, str(tmp_path / "resized.safetensors"), "fixed", 64))
    assert all(r["new_rank"] == r["old_rank"] for modules in report.values() for r in modules.values())
    for path in (merged, resized):
        assert read_adapter(path).format == fmt
        pipe = load_pipe()
        pipe.load_lora_weights(str(path))
        assert_outputs_close(outputs(pipe), trained[1], atol=1e-4)


def test_inspect_reads_ranks_and_nu(trained, saved):
    from lora2.tools import inspect_file

    for fmt in FORMATS:
        report = inspect_file(saved[fmt])
        by_module = {(row["component"], row["module"].replace("text_model.", "")): row for row in report["modules"]}
        for component in COMPONENTS:
            for name, rank in trained[2][component].items():
                row = by_module[(component, name.replace("text_model.", ""))]
                assert row["rank"] == rank and row["nu"] is not None
        assert report["totals"]["bytes_fp32"] == 4 * report["totals"]["parameters"]
