"""The bench's iso-size baseline through the real trainer: the ranks `iso_rank_options` derives from a learned
adapter (flags as `lora2 bench` passes them) are the ranks `lora2 train` writes, at that adapter's parameter count."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file

from lora2.cli import main
from lora2.eval.bench import _method_flags, iso_rank_options
from lora2.eval.evaluate import adapter_summary
from lora2.train.run_folder import MAIN_ADAPTER


def _learned_like(source, path):
    """The fixed-rank adapter ``source`` with ranks cut to 1–4 by module, like a learned-rank file."""
    tensors = load_file(str(source))
    names = sorted(key[: -len(".lora_A.weight")] for key in tensors if key.endswith(".lora_A.weight"))
    for index, name in enumerate(names):
        rank = 1 + index % 4
        tensors[f"{name}.lora_A.weight"] = tensors[f"{name}.lora_A.weight"][:rank].contiguous()
        tensors[f"{name}.lora_B.weight"] = torch.randn_like(tensors[f"{name}.lora_B.weight"][:, :rank]).contiguous()
    save_file(tensors, str(path))
    return path


def test_iso_ranks_reach_the_trainer(tiny_base, instance_dir, tmp_path):
    common = ["train", "--base", str(tiny_base), "--instance-data-dir", str(instance_dir), "--class-name", "dog",
              "--resolution", "32", "--max-train-steps", "1", "--sample-steps", "1", "--report-to", "none",
              "--export-formats", "diffusers", "--device", "cpu"]  # fmt: skip
    assert main([*common, "--output-dir", str(tmp_path / "fixed"), "--rank-mode", "fixed", "--init-rank", "4"]) == 0
    learned = _learned_like(tmp_path / "fixed" / MAIN_ADAPTER, tmp_path / "learned.safetensors")
    options = iso_rank_options(learned)
    argv = [*common, "--output-dir", str(tmp_path / "iso"), "--rank-mode", "fixed", *_method_flags(options)]
    assert main(argv) == 0

    iso, target = adapter_summary(tmp_path / "iso" / MAIN_ADAPTER), adapter_summary(learned)
    assert iso["ranks"].keys() == target["ranks"].keys()
    assert max(iso["ranks"].values()) - min(iso["ranks"].values()) == 1
    assert (
        iso["parameters"]
        <= target["parameters"]
        < iso["parameters"] + 2 * max(module.shape[0] + module.shape[1] for module in load_file(str(learned)).values())
    )
