"""``load_pipeline_lora``: the checks before diffusers' ``load_lora_weights`` accept every file lora2 writes for a
pipeline (UNet convs and linears, both text encoders, kohya in either spelling) and name the file and module of a
file that does not fit; diffusers stays the judge of what is loaded."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_outputs_close, components, outputs
from safetensors.torch import load_file, save_file

import lora2
from lora2.export.api import check_pipeline_lora, load_pipeline_lora


@pytest.fixture(scope="module")
def files(trained, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_lora")
    return {
        fmt: lora2.save_lora(components(trained[0]), root / fmt, format=fmt)
        for fmt in ("diffusers", "kohya", "peft", "lora2")
    }


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_checked_files_load_as_diffusers_loads_them(fmt, files, trained, load_pipe):
    pipe = load_pipe()
    assert load_pipeline_lora(pipe, files[fmt].parent) == files[fmt]  # a folder: the file diffusers would pick
    assert_outputs_close(outputs(pipe), trained[1], atol=1e-4)


@pytest.mark.parametrize("fmt", ["peft", "lora2"])
def test_formats_diffusers_cannot_load_are_refused(fmt, files, load_pipe):
    with pytest.raises(ValueError, match=f"a {fmt} adapter, which diffusers' load_lora_weights does not read"):
        check_pipeline_lora(load_pipe(), files[fmt])


def test_a_text_encoder_module_of_another_shape_is_named(files, load_pipe, tmp_path):
    tensors = load_file(files["diffusers"])
    key = next(k for k in sorted(tensors) if k.startswith("text_encoder_2.") and k.endswith("lora_A.weight"))
    tensors[key] = torch.zeros(tensors[key].shape[0], 5)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    module = key.removeprefix("text_encoder_2.").removesuffix(".lora_A.weight")
    with pytest.raises(ValueError, match=rf"bad.safetensors: component 'text_encoder_2': module '{module}': weights"):
        check_pipeline_lora(load_pipe(), path)


def test_a_dora_file_is_checked_for_pipelines_and_refused_by_the_tools(files, load_pipe, tmp_path):
    """DoRA's update is not up @ down: inspect/merge/resize/load_lora refuse it; a pipeline check reads it and its
    magnitude vectors (one finite entry per output feature)."""
    tensors = {k: v for k, v in load_file(files["diffusers"]).items() if k.startswith("unet.")}
    for key in [k for k in tensors if k.endswith("lora_B.weight")]:
        tensors[key.replace("lora_B.weight", "lora_magnitude_vector")] = torch.ones(tensors[key].shape[0])
    path = tmp_path / "dora.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match="dora.safetensors: a DoRA adapter"):
        lora2.export.read_adapter(path)
    assert check_pipeline_lora(load_pipe(), path).magnitudes["unet"]
    key = sorted(k for k in tensors if k.endswith("magnitude_vector"))[0]
    save_file({**tensors, key: torch.ones(3)}, str(path))
    with pytest.raises(ValueError, match=r"DoRA magnitude .* must be a float vector of \d+ entries"):
        check_pipeline_lora(load_pipe(), path)
