"""Bad input gets a ValueError naming the file and the module, key or value; nothing is loaded partially."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lora2


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.proj = nn.Linear(8, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.proj(self.conv(x).mean((2, 3)))))


def make_adapted(seed: int = 0) -> Toy:
    torch.manual_seed(seed)
    model = Toy()
    lora2.inject(model, lora2.LoRA2Config(target_modules=["conv", "proj", "out"], init_rank=2, max_rank=8))
    with torch.no_grad():
        for index, (_, layer) in enumerate(lora2.lora_layers(model)):
            layer.set_rank(index + 1)
            layer.log_nu.fill_(math.log(lora2.rank.nu_for_rank(index + 1, layer.config.quantile)))
            layer.lora_B.normal_(0, 0.5)
    return model


@pytest.fixture
def saved(tmp_path):
    return lora2.save_lora(make_adapted(), tmp_path / "toy.safetensors")


def plain() -> Toy:
    torch.manual_seed(0)
    return Toy()


def rewrite(path, change) -> None:
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        header = handle.metadata()
    change(tensors, header)
    save_file(tensors, str(path), metadata=header)


def test_roundtrip_toy(saved):
    model, x = plain(), torch.randn(2, 3, 5, 5)
    info = lora2.load_lora(model, saved)
    assert info["ranks"] == {"conv": 1, "proj": 2, "out": 3}
    torch.testing.assert_close(model(x), make_adapted()(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_pickle_checkpoints_are_refused_by_name(tmp_path, suffix):
    path = tmp_path / f"lora{suffix}"
    path.write_bytes(b"not even opened")
    with pytest.raises(ValueError, match=r"pickle.*safetensors only|only safetensors") as err:
        lora2.load_lora(plain(), path)
    assert str(path) in str(err.value)


def test_pickle_content_is_refused(tmp_path):
    path = tmp_path / "disguised.safetensors"
    torch.save({"proj.lora_A.weight": torch.zeros(2, 8)}, path)
    with pytest.raises(ValueError, match="pickle") as err:
        lora2.load_lora(plain(), path)
    assert str(path) in str(err.value)


def test_text_is_refused(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, I am not a tensor file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        lora2.load_lora(plain(), path)


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) - 100])
    with pytest.raises(ValueError, match="corrupt or truncated") as err:
        lora2.load_lora(plain(), saved)
    assert str(saved) in str(err.value)


def test_missing_key_names_module(saved):
    rewrite(saved, lambda t, h: t.pop("unet.proj.lora_B.weight"))
    with pytest.raises(ValueError, match=r"'proj'.*lora_B\.weight is missing"):
        lora2.load_lora(plain(), saved)


def test_unknown_key_is_named(saved):
    rewrite(saved, lambda t, h: t.update({"unet.proj.magnitude": torch.zeros(3)}))
    with pytest.raises(ValueError, match=r"unsupported key 'unet\.proj\.magnitude'"):
        lora2.load_lora(plain(), saved)


def test_wrong_shape_names_module(saved):
    rewrite(saved, lambda t, h: t.update({"unet.out.lora_A.weight": torch.zeros(3, 15)}))
    with pytest.raises(ValueError, match=r"module 'out'.*do not fit Linear") as err:
        lora2.load_lora(plain(), saved)
    assert str(saved) in str(err.value)


def test_rank_mismatch_between_down_and_up(saved):
    rewrite(saved, lambda t, h: t.update({"unet.out.lora_A.weight": torch.zeros(2, 16)}))
    with pytest.raises(ValueError, match=r"module 'out'.*rank mismatch"):
        lora2.load_lora(plain(), saved)


def test_extra_module_in_file(saved):
    def add(tensors, header):
        tensors["unet.head.lora_A.weight"] = torch.zeros(1, 4)
        tensors["unet.head.lora_B.weight"] = torch.zeros(4, 1)

    rewrite(saved, add)
    with pytest.raises(ValueError, match=r"match no nn.Linear/nn.Conv2d module of Toy: \['head'\]"):
        lora2.load_lora(plain(), saved)


def test_module_missing_from_file_for_injected_model(saved):
    rewrite(saved, lambda t, h: [t.pop("unet.conv.lora_A.weight"), t.pop("unet.conv.lora_B.weight")])
    model = make_adapted()
    with pytest.raises(ValueError, match=r"no weights for 1 adapted module\(s\): \['conv'\]"):
        lora2.load_lora(model, saved)


def test_module_in_file_not_adapted_in_model(saved):
    model = plain()
    lora2.inject(model, lora2.LoRA2Config(target_modules=["proj", "out"]))
    with pytest.raises(ValueError, match=r"match no LoRA² layer of Toy: \['conv'\]"):
        lora2.load_lora(model, saved)


def test_nothing_changes_when_loading_fails(saved):
    rewrite(saved, lambda t, h: t.update({"unet.out.lora_A.weight": torch.zeros(3, 15)}))
    model = make_adapted(seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        lora2.load_lora(model, saved)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    fresh = plain()
    with pytest.raises(ValueError):
        lora2.load_lora(fresh, saved)
    assert not any(True for _ in lora2.lora_layers(fresh))


def test_rank_above_max_rank_of_model(saved, tmp_path):
    model = plain()
    lora2.inject(model, lora2.LoRA2Config(target_modules=["conv", "proj", "out"], init_rank=1, max_rank=2))
    with pytest.raises(ValueError, match=r"module 'out' has rank 3 > max_rank 2"):
        lora2.load_lora(model, saved)


def test_bad_lora2_header(saved):
    rewrite(saved, lambda t, h: h.update({"lora2": "{not json"}))
    with pytest.raises(ValueError, match=r"header entry 'lora2' is not valid JSON"):
        lora2.load_lora(plain(), saved)


def test_bad_nu_in_header(saved):
    def corrupt(tensors, header):
        entry = json.loads(header["lora2"])
        entry["components"]["unet"]["modules"]["proj"]["log_nu"] = "NaN"
        header["lora2"] = json.dumps(entry)

    rewrite(saved, corrupt)
    with pytest.raises(ValueError, match=r"module 'proj' of 'unet': log_nu 'NaN'"):
        lora2.load_lora(plain(), saved)


def test_nan_weights(saved):
    rewrite(saved, lambda t, h: t["unet.proj.lora_B.weight"].fill_(float("nan")))
    with pytest.raises(ValueError, match=r"'proj'.*NaN"):
        lora2.load_lora(plain(), saved)


def test_components_not_loaded_are_an_error(tmp_path):
    model = make_adapted()
    path = lora2.save_lora({"unet": model, "text_encoder": make_adapted(1)}, tmp_path / "two.safetensors")
    with pytest.raises(ValueError, match=r"components \['text_encoder'\] are not loaded"):
        lora2.load_lora(plain(), path)
    with pytest.raises(ValueError, match=r"no adapters for components \['prior'\] \(it holds"):
        lora2.load_lora({"prior": plain()}, path)
    with pytest.raises(ValueError, match=r"components \['text_encoder'\] are not loaded"):
        lora2.load_lora({"unet": plain()}, path)
    info = lora2.load_lora({"unet": plain()}, path, strict=False)
    assert info["ranks"] == {"unet": {"conv": 1, "proj": 2, "out": 3}}
    with pytest.raises(ValueError, match=r"no adapters for components \['text_encoder_2'\]"):
        lora2.load_lora({"unet": plain(), "text_encoder": plain(), "text_encoder_2": plain()}, path)


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="holds no LoRA² layers"):
        lora2.save_lora(plain(), tmp_path)
    with pytest.raises(ValueError, match="format must be one of"):
        lora2.save_lora(make_adapted(), tmp_path, format="ckpt")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        lora2.save_lora(make_adapted(), tmp_path, metadata={"device": torch.device("cpu")})
    with pytest.raises(ValueError, match="peft format is a directory"):
        lora2.save_lora(make_adapted(), tmp_path / "x.safetensors", format="peft")
    with pytest.raises(ValueError, match="model must be an nn.Module"):
        lora2.save_lora({"unet": 3}, tmp_path)


def test_missing_file_and_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        lora2.load_lora(plain(), tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="no adapter found"):
        lora2.load_lora(plain(), tmp_path)


def test_peft_dir_with_pickle_only(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="adapter_model.safetensors is missing"):
        lora2.load_lora(plain(), tmp_path)


@pytest.mark.parametrize("fmt", ["kohya", "peft", "lora2"])
def test_toy_roundtrip_every_format(tmp_path, fmt):
    model, x = make_adapted(), torch.randn(2, 3, 5, 5)
    path = lora2.save_lora(model, tmp_path / fmt, format=fmt)
    fresh = plain()
    lora2.load_lora(fresh, path)
    torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=0)


def test_custom_component_names(tmp_path):
    model, x = make_adapted(), torch.randn(2, 3, 5, 5)
    path = lora2.save_lora({"controlnet": model}, tmp_path / "c.safetensors")
    fresh = plain()
    assert lora2.load_lora({"controlnet": fresh}, path)["ranks"] == {"controlnet": {"conv": 1, "proj": 2, "out": 3}}
    torch.testing.assert_close(fresh(x), model(x), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="kohya format has no prefix for component 'controlnet'"):
        lora2.save_lora({"controlnet": model}, tmp_path, format="kohya")
