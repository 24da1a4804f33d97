"""The backbone configs shipped in lora2/configs build the published architectures (on the meta device)."""

from __future__ import annotations

import pytest
import torch

from lora2.configs import unet_config


@pytest.mark.parametrize(
    ("backbone", "parameters", "attention_projections"),
    [("sdxl", 2_567_463_684, 560), ("koala700m", 782_822_724, 168)],
)
def test_configs_build_the_published_unets(backbone, parameters, attention_projections):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config(backbone))
    assert sum(p.numel() for p in unet.parameters()) == parameters
    targets = [n for n, _ in unet.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert len(targets) == attention_projections


def test_unknown_backbone_is_refused():
    with pytest.raises(ValueError, match="unknown backbone 'sd3'"):
        unet_config("sd3")
