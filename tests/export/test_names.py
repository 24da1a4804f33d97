"""Names read from files never decide where lora2 writes: every reader refuses component and module names that are
not identifier-like, and every writer stays under its output folder."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from lora2.cli import main
from lora2.export import LoraModule, read_adapter, write_adapter
from lora2.export.files import inside
from lora2.export.names import check_name

HOSTILE = ["/abs/elsewhere", "../up", "a/b", "a\\b", "..", "a..b", ".hidden", "trailing.", "C:x", "a b", "ü"]


def pair(rank: int = 2, d: int = 4) -> dict[str, torch.Tensor]:
    return {"lora_A.weight": torch.randn(rank, d), "lora_B.weight": torch.randn(d, rank)}


def lora2_header(components: dict) -> dict[str, str]:
    described = {c: {"modules": {m: {"rank": 2} for m in modules}} for c, modules in components.items()}
    return {"lora2": json.dumps({"lora2_header": 1, "components": described})}


def files_under(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names}


@pytest.mark.parametrize("name", HOSTILE)
def test_check_name_refuses_paths(name):
    with pytest.raises(ValueError, match="not allowed") as error:
        check_name("x.safetensors", name, "component")
    assert "x.safetensors" in str(error.value)


def test_check_name_keeps_model_names():
    for name in ("unet", "text_model.encoder.layers.0.self_attn.q_proj", "down_blocks_0_resnets_1_conv1", "to_out.0"):
        assert check_name("f", name, "module") == name


@pytest.mark.parametrize("name", ["/abs/elsewhere", "..", "a..b"])
def test_a_header_component_is_checked(tmp_path, name):
    """The issue's case: a diffusers file whose keys and lora2 header name an absolute folder as component."""
    path = tmp_path / "evil.safetensors"
    tensors = {f"{name}.mod.{k}": v for k, v in pair().items()} | {f"unet.mod.{k}": v for k, v in pair().items()}
    save_file(tensors, str(path), metadata=lora2_header({name: ["mod"], "unet": ["mod"]}))
    with pytest.raises(ValueError, match=r"evil.safetensors: component name .* is not allowed"):
        read_adapter(path)


@pytest.mark.parametrize(
    "key",
    [
        "unet.../../x.lora_A.weight",  # diffusers module
        "lora_unet_../x.lora_down.weight",  # kohya module
        "base_model.model./abs.lora_A.weight",  # peft-style keys in a diffusers file
    ],
)
def test_a_module_name_is_checked_by_every_reader(tmp_path, key):
    path = tmp_path / "evil.safetensors"
    down, up = torch.randn(2, 4), torch.randn(4, 2)
    partner = key.replace("lora_A", "lora_B").replace("lora_down", "lora_up")
    save_file({key: down, partner: up}, str(path))
    with pytest.raises(ValueError, match="evil.safetensors: module .*name .* is not allowed"):
        read_adapter(path)


def test_a_native_file_component_is_checked(tmp_path):
    path = tmp_path / "evil.safetensors"
    header = json.loads(lora2_header({"/abs": ["mod"]})["lora2"])
    header["format"] = "lora2"
    tensors = {
        "/abs.mod.lora_A": torch.randn(2, 4),
        "/abs.mod.lora_B": torch.randn(4, 2),
        "/abs.mod.log_nu": torch.zeros(()),
    }
    save_file(tensors, str(path), metadata={"lora2": json.dumps(header)})
    with pytest.raises(ValueError, match="component name '/abs' is not allowed"):
        read_adapter(path)


def test_a_peft_folder_component_is_checked(tmp_path):
    """A multi-component peft folder takes its component names from sub-folder names."""
    source = tmp_path / "src"
    write_adapter({"unet": {"m": LoraModule(*pair().values())}, "te": {"m": LoraModule(*pair().values())}},
                  source, "peft", {}, torch.float32)  # fmt: skip
    (source / "te").rename(source / "t e")
    with pytest.raises(ValueError, match="component name 't e' is not allowed"):
        read_adapter(source)


def test_resize_of_a_hostile_file_writes_nothing_anywhere(tmp_path, monkeypatch):
    """`lora2 resize evil --format peft --out mo/p` once wrote into the absolute folder named by the file."""
    elsewhere = tmp_path / "elsewhere"
    work = tmp_path / "work"
    work.mkdir()
    tensors = {f"{elsewhere}.mod.{k}": v for k, v in pair().items()} | {f"unet.mod.{k}": v for k, v in pair().items()}
    save_file(
        tensors, str(work / "evil.safetensors"), metadata=lora2_header({str(elsewhere): ["mod"], "unet": ["mod"]})
    )
    monkeypatch.chdir(work)
    argv = ["resize", "evil.safetensors", "--method", "fixed", "--param", "1", "--format", "peft", "--out", "mo/p"]
    assert main(argv) == 2
    assert files_under(tmp_path) == {"work/evil.safetensors"}


def test_writers_stay_under_out(tmp_path):
    module = LoraModule(*pair().values())
    with pytest.raises(ValueError, match=r"component name '\.\./x' is not allowed"):
        write_adapter({"../x": {"m": module}, "unet": {"m": module}}, tmp_path / "out", "peft", {}, torch.float32)
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "unet").symlink_to(outside)  # a link left in the output folder
    with pytest.raises(ValueError, match="resolves outside the output folder"):
        write_adapter({"unet": {"m": module}, "te": {"m": module}}, out, "peft", {}, torch.float32)
    (out / "pytorch_lora_weights.safetensors").symlink_to(outside / "x.safetensors")
    with pytest.raises(ValueError, match="resolves outside the output folder"):
        write_adapter({"unet": {"m": module}}, out, "diffusers", {}, torch.float32)
    assert files_under(outside) == set()
    assert sorted(p.name for p in out.iterdir()) == ["pytorch_lora_weights.safetensors", "unet"]  # the links only
    assert inside(out, "te", "a.json") == out / "te" / "a.json"
