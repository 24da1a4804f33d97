"""Architecture configs of the backbones, shipped as package data (no download needed to build them).

``sdxl_unet.json`` is the SDXL base 1.0 UNet config verbatim; ``koala700m_unet.json`` is the KOALA-700m UNet
(etri-vilab/koala-700m) reconstructed from the SDXL config (layers_per_block 1, transformer_layers_per_block
[1, 2, 5], no mid block; 782,822,724 parameters, the published size).
"""

from __future__ import annotations

import json
from importlib import resources

UNET_CONFIGS = {"sdxl": "sdxl_unet.json", "koala700m": "koala700m_unet.json"}


def unet_config(backbone: str) -> dict:
    """The diffusers ``UNet2DConditionModel`` config of a backbone ("sdxl" or "koala700m") as a dict."""
    if backbone not in UNET_CONFIGS:
        raise ValueError(f"unknown backbone {backbone!r}; known: {sorted(UNET_CONFIGS)}")
    text = resources.files(__package__).joinpath(UNET_CONFIGS[backbone]).read_text(encoding="utf-8")
    return json.loads(text)
