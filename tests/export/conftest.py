"""A tiny SDXL pipeline with LoRA² adapters at different ranks on its UNet and both text encoders."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import StableDiffusionXLPipeline

import lora2
from lora2.world.tiny import build_tiny_sdxl

# attention, feed-forward, projections, resnet convs (3x3 and the 1x1 shortcut) and the time-embedding projection
UNET_TARGETS = [
    "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
    "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv",
]  # fmt: skip
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def components(pipe) -> dict:
    return {name: getattr(pipe, name) for name in COMPONENTS}


def targets(component: str) -> list[str]:
    return UNET_TARGETS if component == "unet" else TEXT_TARGETS


@torch.no_grad()
def outputs(pipe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text encoder 1 penultimate hidden states, text encoder 2 pooled embeds, UNet noise prediction)."""
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=gen)
    ids = torch.randint(0, 60, (2, 12), generator=gen)
    hidden_1 = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    out_2 = pipe.text_encoder_2(ids, output_hidden_states=True)
    context = torch.cat([hidden_1, out_2.hidden_states[-2]], dim=-1)
    cond = {"text_embeds": out_2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    noise = pipe.unet(latents, torch.tensor([500, 20]), context, added_cond_kwargs=cond).sample
    return hidden_1, out_2.text_embeds, noise


def assert_outputs_close(got, want, atol: float = 1e-4) -> None:
    for index, (a, b) in enumerate(zip(got, want)):
        err = (a - b).abs().max().item()
        assert err <= atol, f"output {index} differs by {err:.3g} (atol {atol})"


@pytest.fixture(scope="session")
def sdxl_dir(tmp_path_factory):
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny_sdxl"), seed=0)


@pytest.fixture(scope="session")
def load_pipe(sdxl_dir):
    def load():
        return StableDiffusionXLPipeline.from_pretrained(sdxl_dir)

    return load


def adapt(pipe, seed: int = 0) -> dict:
    """Inject LoRA² into the three components and move them off identity: ν spread over several ranks (D follows ν),
    random non-zero B. Returns the components dict."""
    gen = torch.Generator().manual_seed(seed)
    parts = components(pipe)
    for name, model in parts.items():
        lora2.inject(model, lora2.LoRA2Config(target_modules=targets(name), init_rank=4, max_rank=16))
        layers = [layer for _, layer in lora2.lora_layers(model)]
        with torch.no_grad():
            for index, layer in enumerate(layers):
                rank = 1 + (index * 5 + seed) % 9  # 1..9
                layer.log_nu.fill_(math.log(lora2.rank.nu_for_rank(rank, layer.config.quantile)))
                layer.log_nu.add_(0.05 * torch.randn((), generator=gen))
        lora2.sync_ranks(None, layers)
        with torch.no_grad():
            for layer in layers:
                layer.lora_A.normal_(0.0, 0.2, generator=gen)
                layer.lora_B.normal_(0.0, 0.1, generator=gen)
    return parts


@pytest.fixture(scope="module")
def trained(load_pipe):
    """(pipeline with perturbed LoRA² adapters, its outputs, its ranks, its log ν, the base pipeline's outputs)."""
    base = outputs(load_pipe())
    pipe = load_pipe()
    parts = adapt(pipe)
    ranks = {name: lora2.ranks(model) for name, model in parts.items()}
    log_nu = {name: {n: layer.log_nu.item() for n, layer in lora2.lora_layers(m)} for name, m in parts.items()}
    return pipe, outputs(pipe), ranks, log_nu, base
