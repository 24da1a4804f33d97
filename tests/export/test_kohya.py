"""kohya files: the UNet names kohya's trainers write (SGM for SDXL, diffusers for SD 1.x and KOALA), the ``ss_*``
header, and reading both spellings everywhere. diffusers' and peft's loaders judge ΔW per module, on tiny models in
the SDXL, SD 1.5 and KOALA layouts with every adaptable module adapted at mixed, non-zero ranks."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from importlib import resources
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import lora2
from lora2.export import read_adapter, write_adapter
from lora2.export.formats import tool_table
from lora2.export.keys import TOOL_FORMATS
from lora2.export.names import underscore
from lora2.export.sgm import NameTable, UNetLayout, sdxl_base_layout
from lora2.tools import MergeSpec, ResizeSpec, inspect_file, merge_files, resize_file
from lora2.world.tiny import TINY_UNET_CONFIG, build_tiny_sdxl

TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]  # what kohya, A1111 and ComfyUI adapt
SDXL_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
SD_UNET = {  # SD 1.5's block layout (sd15_unet.json)
    "layers_per_block": 2,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "cross_attention_dim": 768,
}


def _train_helpers():
    path = Path(__file__).parents[1] / "train" / "train_helpers.py"
    spec = importlib.util.spec_from_file_location("train_helpers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adaptable(model: nn.Module, component: str) -> list[str]:
    """Every module lora2 adapts in a kohya-compatible way: all UNet Linear/Conv2d, the CLIP attention/MLP linears."""
    linear = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if component == "unet":
        return linear
    return [n for n in linear if n.rsplit(".", 1)[-1] in TEXT_TARGETS]


def adapt(parts: dict[str, nn.Module], seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Inject LoRA² into every adaptable module, move ν to mixed ranks 1..9 and B off zero; returns ΔW per module."""
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for component, model in parts.items():
        names = adaptable(model, component)
        lora2.inject(model, lora2.LoRA2Config(target_modules=names, init_rank=4, max_rank=12))
        layers = [layer for _, layer in lora2.lora_layers(model)]
        with torch.no_grad():
            for index, layer in enumerate(layers):
                rank = 1 + (index * 5 + seed) % 9
                layer.log_nu.fill_(math.log(lora2.rank.nu_for_rank(rank, layer.config.quantile)))
        lora2.sync_ranks(None, layers)
        with torch.no_grad():
            for layer in layers:
                layer.lora_A.normal_(0.0, 0.2, generator=gen)
                layer.lora_B.normal_(0.0, 0.1, generator=gen)
        deltas[component] = {name: layer.get_delta_weight().detach() for name, layer in lora2.lora_layers(model)}
    return deltas


def peft_deltas(parts: dict[str, nn.Module]) -> dict[str, dict[str, torch.Tensor]]:
    """ΔW of every peft LoRA layer a loader put into the models."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for component, model in parts.items():
        found[component] = {
            name: module.get_delta_weight(module.active_adapters[0]).detach()
            for name, module in model.named_modules()
            if isinstance(module, LoraLayer)
        }
    return found


def assert_same_deltas(got: dict, want: dict, skip: tuple[str, ...] = ()) -> None:
    for component, modules in want.items():
        expected = {name for name in modules if not any(part in name for part in skip)}
        assert set(got.get(component, {})) == expected, component
        for name in expected:
            error = (got[component][name] - modules[name]).norm() / modules[name].norm()
            assert error <= 1e-5, f"{component}.{name}: relative ΔW error {error:.3g}"


def unet_keys(path: Path) -> list[str]:
    with safe_open(str(path), framework="pt") as handle:
        return sorted({k.split(".")[0] for k in handle.keys() if k.startswith("lora_unet_")})


def header(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def adapter_deltas(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    file = read_adapter(path)
    return {c: {underscore(n): m.delta(torch.float64) for n, m in mods.items()} for c, mods in file.adapter.items()}


# ---------------------------------------------------------------- layouts and the name table


def test_layouts_decide_spelling_version_and_text_prefix():
    sdxl = sdxl_base_layout()
    assert (sdxl.kohya_spelling, sdxl.base_model_version) == ("sgm", "sdxl_base_v1-0")
    koala = UNetLayout.from_config({**sdxl.to_dict(), "layers_per_block": 1, "mid_block_type": None})
    assert (koala.kohya_spelling, koala.base_model_version) == ("diffusers", None)
    sd15 = UNetLayout.from_config(SD_UNET)  # mid_block_type absent: diffusers' default cross-attention mid block
    assert (sd15.kohya_spelling, sd15.base_model_version) == ("diffusers", "sd_v1")
    assert UNetLayout.from_config({**SD_UNET, "cross_attention_dim": 1024}).base_model_version == "sd_v2"
    assert UNetLayout.from_dict(sdxl.to_dict(), "x") == sdxl
    with pytest.raises(ValueError, match="x: malformed UNet layout"):
        UNetLayout.from_dict({"layers_per_block": [2]}, "x")


@pytest.mark.parametrize("config", ["sdxl", "tiny"])
def test_sgm_table_matches_diffusers_conversion(config):
    """Every UNet module's SGM name converts back to it through diffusers' own kohya/SGM conversion."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if config == "sdxl":
        text = resources.files("lora2.configs").joinpath("sdxl_unet.json").read_text()
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(json.loads(text))
    else:
        unet = UNet2DConditionModel(
            **TINY_UNET_CONFIG, cross_attention_dim=64, projection_class_embeddings_input_dim=80
        )
    layout = UNetLayout.of_model(unet)
    table = NameTable(layout)
    names = adaptable(unet, "unet")
    probe = {}
    for name in names:
        sgm = table.to_sgm(name)
        assert sgm is not None and table.to_diffusers(sgm) == underscore(name)
        probe[f"lora_unet_{sgm}.lora_down.weight"] = probe[f"lora_unet_{sgm}.lora_up.weight"] = torch.zeros(1, 1)
    assert len(set(probe)) == 2 * len(names)  # no two modules share an SGM name
    converted, _ = _convert_non_diffusers_lora_to_diffusers(_maybe_map_sgm_blocks_to_diffusers(probe, unet.config))
    peft_keys = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {k.removesuffix(".lora_A.weight") for k in peft_keys if k.endswith("lora_A.weight")} == set(names)


def test_sdxl_base_has_every_module_kind():
    table = NameTable(sdxl_base_layout())
    assert table.to_sgm("up_blocks.0.upsamplers.0.conv") == "output_blocks_2_2_conv"  # A1111's SD 1.5 rule: _2_1_
    assert table.to_sgm("down_blocks.1.downsamplers.0.conv") == "input_blocks_6_0_op"
    assert table.to_sgm("add_embedding.linear_1") == "label_emb_0_0"
    assert table.to_sgm("up_blocks.2.resnets.2.conv_shortcut") == "output_blocks_8_0_skip_connection"
    assert table.to_sgm("mid_block.resnets.1.time_emb_proj") == "middle_block_2_emb_layers_1"
    assert table.to_diffusers("input_blocks.4.1.transformer_blocks.0.attn1.to_q") == (
        "down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert table.to_sgm("not_a_module") is None and table.to_diffusers("input_blocks_99_0_op") is None


# ---------------------------------------------------------------- SDXL: written in SGM spelling, judged by loaders


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    """(pipeline folder, ΔW per module, files in every format) of a tiny SDXL adapted everywhere."""
    from diffusers import StableDiffusionXLPipeline

    folder = build_tiny_sdxl(tmp_path_factory.mktemp("sdxl"), seed=0)
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    parts = {name: getattr(pipe, name) for name in SDXL_COMPONENTS}
    deltas = adapt(parts)
    root = tmp_path_factory.mktemp("sdxl_files")
    files = {fmt: lora2.save_lora(parts, root / fmt, format=fmt) for fmt in ("kohya", "diffusers", "peft")}
    return folder, deltas, files, parts


def test_sdxl_kohya_file_uses_sgm_names_and_a_complete_header(sdxl):
    _, deltas, files, _ = sdxl
    keys = unet_keys(files["kohya"])
    assert len(keys) == len(deltas["unet"])
    assert not any(block in key for key in keys for block in ("down_blocks", "mid_block", "up_blocks"))
    for key in (
        "input_blocks_0_0",
        "out_2",
        "time_embed_0",
        "label_emb_0_2",
        "input_blocks_2_0_op",
        "output_blocks_1_2_conv",
        "input_blocks_3_1_transformer_blocks_0_attn1_to_q",
        "input_blocks_3_0_skip_connection",
        "middle_block_2_emb_layers_1",
    ):
        assert f"lora_unet_{key}" in keys
    entries = header(files["kohya"])
    assert entries["ss_base_model_version"] == "sdxl_base_v1-0" and entries["ss_v2"] == "False"
    assert entries["ss_network_module"] == "networks.lora"
    assert entries["ss_network_dim"] == entries["ss_network_alpha"] == "Dynamic"
    assert json.loads(entries["ss_network_args"]) == {"conv_dim": "Dynamic", "conv_alpha": "Dynamic"}
    stored = json.loads(entries["lora2"])["components"]["unet"]
    assert stored["layout"]["layers_per_block"] == [1, 1] and len(stored["modules"]) == len(deltas["unet"])
    with safe_open(str(files["kohya"]), framework="pt") as handle:
        assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in handle.keys())


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_diffusers_loads_every_module_of_the_sdxl_files(fmt, sdxl):
    from diffusers import StableDiffusionXLPipeline

    folder, deltas, files, _ = sdxl
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    pipe.load_lora_weights(str(files[fmt]))
    assert_same_deltas(peft_deltas({name: getattr(pipe, name) for name in SDXL_COMPONENTS}), deltas)


def test_peft_loads_every_module_of_the_sdxl_folder(sdxl):
    from diffusers import StableDiffusionXLPipeline
    from peft import PeftModel

    folder, deltas, files, _ = sdxl
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    parts = {name: PeftModel.from_pretrained(getattr(pipe, name), files["peft"] / name) for name in SDXL_COMPONENTS}
    got = peft_deltas(parts)
    prefix = "base_model.model."
    got = {c: {n.removeprefix(prefix): d for n, d in mods.items()} for c, mods in got.items()}
    assert_same_deltas(got, deltas)


# ---------------------------------------------------------------- reading both spellings everywhere


@pytest.fixture(scope="module")
def old_spelling(sdxl, tmp_path_factory):
    """The SDXL adapter as a kohya file in diffusers spelling (what lora2 wrote before), lora2 header kept."""
    files = sdxl[2]
    file = read_adapter(files["kohya"])
    path = tmp_path_factory.mktemp("old") / "old.safetensors"
    lora2_entry = {"lora2": header(files["kohya"])["lora2"]}
    return write_adapter(file.adapter, path, "kohya", lora2_entry, torch.float32, layout=None)


def test_both_spellings_read_to_the_same_adapter(sdxl, old_spelling):
    files = sdxl[2]
    assert any("down_blocks" in key for key in unet_keys(old_spelling))
    new, old = read_adapter(files["kohya"]), read_adapter(old_spelling)
    assert new.layout == old.layout == UNetLayout.of_model(sdxl[3]["unet"])
    assert {c: set(m) for c, m in new.adapter.items()} == {c: set(m) for c, m in old.adapter.items()}
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in new.adapter["unet"]  # dotted again
    for component, modules in new.adapter.items():
        for name, module in modules.items():
            assert torch.equal(module.delta(), old.adapter[component][name].delta())

    def rows(path):
        return sorted(inspect_file(path)["modules"], key=lambda row: (row["component"], row["module"]))

    assert rows(files["kohya"]) == rows(old_spelling)
    assert {row["module"] for row in rows(files["kohya"]) if row["component"] == "unet"} == set(sdxl[1]["unet"])


@pytest.mark.parametrize("which", ["sgm", "old"])
def test_load_lora_reads_both_spellings(which, sdxl, old_spelling):
    from diffusers import StableDiffusionXLPipeline

    folder, deltas, files, _ = sdxl
    path = files["kohya"] if which == "sgm" else old_spelling
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    parts = {name: getattr(pipe, name) for name in SDXL_COMPONENTS}
    info = lora2.load_lora(parts, path)
    assert info["nu_restored"]
    got = {c: {n: layer.get_delta_weight().detach() for n, layer in lora2.lora_layers(m)} for c, m in parts.items()}
    assert_same_deltas(got, deltas)


def test_resize_and_merge_write_sgm_spelling_from_either_spelling(sdxl, old_spelling, tmp_path):
    files = sdxl[2]
    want = adapter_deltas(files["kohya"])
    resized, _ = resize_file(ResizeSpec(str(old_spelling), str(tmp_path / "resized.safetensors"), "fixed", 64))
    merged = merge_files(
        MergeSpec([str(files["kohya"]), str(old_spelling)], str(tmp_path / "m.safetensors"), weights=[0.5, 0.5])
    )
    from_diffusers, _ = resize_file(
        ResizeSpec(str(files["diffusers"]), str(tmp_path / "d.safetensors"), "fixed", 64, format="kohya")
    )
    for path in (resized, merged, from_diffusers):
        assert unet_keys(path) == unet_keys(files["kohya"]), path
        assert header(path)["ss_base_model_version"] == "sdxl_base_v1-0"
        got = adapter_deltas(path)
        for component, modules in want.items():
            for name, delta in modules.items():
                torch.testing.assert_close(got[component][name], delta, rtol=1e-5, atol=1e-7)


def test_merge_refuses_adapters_of_different_layouts(sdxl, tmp_path):
    koala = dict(sdxl_base_layout().to_dict(), mid_block_type=None)
    module = lora2.export.LoraModule(torch.ones(1, 4), torch.ones(4, 1))
    entry = {"lora2": json.dumps({"lora2_header": 1, "components": {"unet": {"layout": koala, "modules": {}}}})}
    other = write_adapter(
        {"unet": {"extra.linear": module}}, tmp_path / "k.safetensors", "kohya", entry, torch.float32
    )
    with pytest.raises(ValueError, match="different block layouts"):
        merge_files(MergeSpec([str(sdxl[2]["kohya"]), str(other)], str(tmp_path / "m.safetensors")))


def test_sd_scripts_file_without_lora2_header(sdxl, tmp_path):
    """A file as sd-scripts writes it (SGM names, ss_* header, no lora2 entry) loads into the tiny model by the
    model's layout, with the same ΔW as diffusers' loader computes."""
    from diffusers import StableDiffusionXLPipeline

    folder, deltas, files, _ = sdxl
    entries = {k: v for k, v in header(files["kohya"]).items() if k != "lora2"}
    path = tmp_path / "sd_scripts.safetensors"
    save_file(load_file(files["kohya"]), str(path), metadata=entries)
    judge = StableDiffusionXLPipeline.from_pretrained(folder)
    judge.load_lora_weights(str(path))
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    parts = {name: getattr(pipe, name) for name in SDXL_COMPONENTS}
    info = lora2.load_lora(parts, path)
    assert info["lora2"] is None and not info["nu_restored"]
    got = {c: {n: layer.get_delta_weight().detach() for n, layer in lora2.lora_layers(m)} for c, m in parts.items()}
    assert_same_deltas(got, deltas)
    assert_same_deltas(peft_deltas({name: getattr(judge, name) for name in SDXL_COMPONENTS}), deltas)


def test_sdxl_base_names_without_header_are_read_as_sdxl(tmp_path, caplog):
    """A headerless SGM file of SDXL base (kohya's only SGM layout) reads back to diffusers names and resizes to SGM
    names again; names that do not fit SDXL base stay as they are, with a warning."""
    names = ["down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2", "up_blocks.0.upsamplers.0.conv", "conv_out"]
    shapes = {names[0]: (8, 12), names[1]: (6, 5, 3, 3), names[2]: (4, 5, 3, 3)}
    gen = torch.Generator().manual_seed(0)
    adapter = {"unet": {}}
    for rank, name in enumerate(names, start=1):
        d_out, d_in, *kernel = shapes[name]
        adapter["unet"][name] = lora2.export.LoraModule(
            torch.randn(rank, d_in, *kernel, generator=gen), torch.randn(d_out, rank, *([1, 1] if kernel else []))
        )
    path = write_adapter(adapter, tmp_path / "x.safetensors", "kohya", {}, torch.float32, sdxl_base_layout())
    assert unet_keys(path) == [
        "lora_unet_input_blocks_8_1_transformer_blocks_9_ff_net_2",
        "lora_unet_out_2",
        "lora_unet_output_blocks_2_2_conv",
    ]
    file = read_adapter(path)
    assert file.layout == sdxl_base_layout() and set(file.adapter["unet"]) == {underscore(n) for n in names}
    resized, _ = resize_file(ResizeSpec(str(path), str(tmp_path / "r.safetensors"), "fixed", 8))
    assert unet_keys(resized) == unet_keys(path)

    tensors = load_file(path)
    tensors = {k.replace("input_blocks_8_1", "input_blocks_99_1"): v for k, v in tensors.items()}
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, str(odd))
    with caplog.at_level(logging.WARNING):
        file = read_adapter(odd)
    assert "do not fit SDXL base's layout" in caplog.text
    assert file.layout is None and "input_blocks_99_1_transformer_blocks_9_ff_net_2" in file.adapter["unet"]


def test_unknown_layout_keeps_diffusers_spelling_with_a_log_line(tmp_path, caplog):
    module = lora2.export.LoraModule(torch.ones(2, 4), torch.ones(3, 2))
    with caplog.at_level(logging.WARNING):
        path = write_adapter(
            {"unet": {"mid_block.resnets.0.time_emb_proj": module}}, tmp_path, "kohya", {}, torch.float32
        )
    assert unet_keys(path) == ["lora_unet_mid_block_resnets_0_time_emb_proj"]
    assert "UNet layout unknown" in caplog.text
    assert "ss_base_model_version" not in header(path)
    assert header(path)["ss_network_dim"] == "2" and header(path)["ss_network_alpha"] == "2.0"
    assert "ss_network_args" not in header(path)


def test_modules_without_sgm_name_keep_the_whole_unet_in_diffusers_spelling(tmp_path, caplog):
    """diffusers drops every SGM key of a file that mixes spellings, so one unmappable module keeps them all."""

    def module():
        return lora2.export.LoraModule(torch.ones(2, 4), torch.ones(3, 2))

    adapter = {"unet": {"conv_in": module(), "class_embedding.linear_1": module()}}
    with caplog.at_level(logging.WARNING):
        path = write_adapter(adapter, tmp_path, "kohya", {}, torch.float32, sdxl_base_layout())
    assert unet_keys(path) == ["lora_unet_class_embedding_linear_1", "lora_unet_conv_in"]
    assert "1 UNet module(s) have no SGM name" in caplog.text


def test_malformed_layout_in_the_lora2_header_is_refused(tmp_path):
    module = lora2.export.LoraModule(torch.ones(2, 4), torch.ones(3, 2))
    entry = {"lora2": json.dumps({"lora2_header": 1, "components": {"unet": {"layout": "sdxl", "modules": {}}}})}
    path = write_adapter({"unet": {"conv_in": module}}, tmp_path, "kohya", entry, torch.float32)
    with pytest.raises(ValueError, match=r"component 'unet': malformed UNet layout"):
        read_adapter(path)


# ---------------------------------------------------------------- SD 1.5 and KOALA keep diffusers names


def test_sd15_kohya_file_keeps_diffusers_names_as_sd_scripts_writes_them(tmp_path):
    from diffusers import StableDiffusionPipeline

    folder = _train_helpers().build_tiny_sd15(tmp_path / "sd15")
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    parts = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    deltas = adapt(parts, seed=1)
    path = lora2.save_lora(parts, tmp_path / "out", format="kohya")
    keys = unet_keys(path)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q" in keys
    assert not any("input_blocks" in key for key in keys)
    with safe_open(str(path), framework="pt") as handle:
        assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in handle.keys())
    entries = header(path)
    assert entries["ss_base_model_version"] == "sd_v1" and entries["ss_v2"] == "False"
    judge = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    judge.load_lora_weights(str(path))
    assert_same_deltas(peft_deltas({"unet": judge.unet, "text_encoder": judge.text_encoder}), deltas)
    fresh = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    lora2.load_lora({"unet": fresh.unet, "text_encoder": fresh.text_encoder}, path)
    got = {
        c: {n: layer.get_delta_weight().detach() for n, layer in lora2.lora_layers(m)}
        for c, m in {"unet": fresh.unet, "text_encoder": fresh.text_encoder}.items()
    }
    assert_same_deltas(got, deltas)


def test_koala_layout_keeps_diffusers_names_and_the_warning_is_true(tmp_path, caplog):
    """No SGM original (no mid block): diffusers spelling, no ss_base_model_version; the save-time warning names the
    add_embedding modules, and diffusers' loader indeed drops exactly those from the kohya file."""
    from diffusers import StableDiffusionXLPipeline

    folder = build_tiny_sdxl(tmp_path / "koala", seed=0, unet_config={"mid_block_type": None})
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    parts = {name: getattr(pipe, name) for name in SDXL_COMPONENTS}
    deltas = adapt(parts, seed=2)
    with caplog.at_level(logging.INFO):
        path = lora2.save_lora(parts, tmp_path / "out", format="kohya")
    assert "no SGM original" in caplog.text
    warning = next(r.getMessage() for r in caplog.records if "diffusers' kohya conversion" in r.getMessage())
    assert "add_embedding_linear_1" in warning and "add_embedding_linear_2" in warning
    assert "A1111" not in warning and "ComfyUI" not in warning
    keys = unet_keys(path)
    assert "lora_unet_down_blocks_1_attentions_0_proj_in" in keys and not any("mid_block" in k for k in keys)
    assert "ss_base_model_version" not in header(path)
    judge = StableDiffusionXLPipeline.from_pretrained(folder)
    with caplog.at_level(logging.WARNING):
        try:
            judge.load_lora_weights(str(path))
        except ValueError:  # a diffusers version that refuses the unknown keys instead of skipping them
            return
    assert_same_deltas(peft_deltas({n: getattr(judge, n) for n in SDXL_COMPONENTS}), deltas, skip=("add_embedding",))


def test_tool_table_names_the_file_for_every_tool():
    files = {"kohya": "lora_kohya.safetensors", "diffusers": "pytorch_lora_weights.safetensors", "peft": "peft/"}
    lines = tool_table(files)
    assert lines[:2] == ["| tool | file |", "| --- | --- |"]
    assert lines[2] == "| ComfyUI, AUTOMATIC1111, Forge, sd-scripts, InvokeAI | `lora_kohya.safetensors` |"
    assert lines[3:] == ["| diffusers | `pytorch_lora_weights.safetensors` |", "| peft | `peft/` |"]
    assert set(TOOL_FORMATS.values()) == {"kohya", "diffusers", "peft"}
    assert tool_table({"diffusers": "a.safetensors"}) == lines[:2] + ["| diffusers | `a.safetensors` |"]
