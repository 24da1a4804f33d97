"""UNet module names of the original (LDM/SGM) UNet versus diffusers' ``UNet2DConditionModel``, from the config.

kohya's SDXL trainer runs Stability's SGM UNet (sd-scripts ``library/sdxl_original_unet.py``) and so names its LoRA
modules ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``; its SD 1.x/2.x trainer runs a
diffusers-named UNet (``library/original_unet.py``, ``RE_UPDOWN`` in ``networks/lora.py``) and writes
``lora_unet_down_blocks_1_attentions_0_…`` with one text encoder under ``lora_te_``. The correspondence depends only
on the block layout of the UNet config (ComfyUI's ``comfy.utils.unet_to_diffusers`` builds the same one), with
L_b resnets in down block b and L_b + 1 in the mirrored up block:

    input_blocks.0.0                 conv_in
    input_blocks.n.0 / n.1           down_blocks.b.resnets.i / .attentions.i     n counts resnets and downsamplers
    input_blocks.n.0.op              down_blocks.b.downsamplers.0.conv
    middle_block.0 / .1 / .2         mid_block.resnets.0 / .attentions.0 / .resnets.1
    output_blocks.n.0 / n.1          up_blocks.b.resnets.i / .attentions.i
    output_blocks.n.{1|2}.conv       up_blocks.b.upsamplers.0.conv               (2 after an attention, else 1)
    out.2                            conv_out
    time_embed.0 / .2                time_embedding.linear_1 / _2
    label_emb.0.0 / .2               add_embedding.linear_1 / _2
    resnets: in_layers.2 = conv1, out_layers.3 = conv2, emb_layers.1 = time_emb_proj, skip_connection = conv_shortcut

Tables work on kohya's spelling (dots replaced by underscores). Layouts without an LDM original (another mid
block, e.g. none at all as in KOALA, or other block types) have no table: such kohya files keep diffusers names.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from importlib import resources

from lora2.export.names import underscore

SGM_BLOCKS = ("input_blocks", "middle_block", "output_blocks")
RESNET_NAMES = {
    "conv1": "in_layers.2",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
TOP_LEVEL_NAMES = {
    "conv_in": "input_blocks.0.0",
    "conv_out": "out.2",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
DOWN_TYPES = {"DownBlock2D": False, "CrossAttnDownBlock2D": True}  # block type → has attentions
UP_TYPES = {"UpBlock2D": False, "CrossAttnUpBlock2D": True}
LDM_MID_BLOCK = "UNetMidBlock2DCrossAttn"

# kohya's ``ss_base_model_version`` values (sd-scripts sdxl_model_util.MODEL_VERSION_SDXL_BASE_V1_0,
# model_util.get_model_version_str_for_sd1_sd2); A1111 shows a LoRA with an SDXL checkpoint only for "sdxl_…".
SDXL_BASE_VERSION = "sdxl_base_v1-0"

_SGM_ATTENTION = re.compile(r"^((?:input|output)_blocks_\d+_1_|middle_block_1_)")
_DIFFUSERS_ATTENTION = re.compile(r"^((?:down|up)_blocks_\d+_attentions_\d+_|mid_block_attentions_0_)")


@dataclass(frozen=True)
class UNetLayout:
    """The parts of a diffusers UNet config that decide module names and the kohya spelling."""

    layers_per_block: tuple[int, ...]
    down_block_types: tuple[str, ...]
    up_block_types: tuple[str, ...]
    mid_block_type: str | None
    addition_embed_type: str | None = None
    cross_attention_dim: int | None = None

    @classmethod
    def from_config(cls, config) -> UNetLayout:
        """From a ``UNet2DConditionModel.config`` or its config.json dict (absent keys take diffusers' defaults)."""
        get = config.get if isinstance(config, dict) else lambda key, default=None: getattr(config, key, default)
        down = tuple(get("down_block_types"))
        layers = get("layers_per_block", 2)
        layers = (layers,) * len(down) if isinstance(layers, int) else tuple(layers)
        cross = get("cross_attention_dim", 1280)
        return cls(
            layers_per_block=layers,
            down_block_types=down,
            up_block_types=tuple(get("up_block_types")),
            mid_block_type=get("mid_block_type", LDM_MID_BLOCK),
            addition_embed_type=get("addition_embed_type"),
            cross_attention_dim=cross if isinstance(cross, int) else None,
        )

    @classmethod
    def of_model(cls, model) -> UNetLayout | None:
        """The layout of a diffusers UNet (None for other models)."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "down_block_types", None) is None:
            return None
        return cls.from_config(config)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> UNetLayout:
        """From a lora2 header entry; ValueError naming ``where`` if it is malformed."""
        try:
            layout = cls(
                layers_per_block=tuple(int(n) for n in data["layers_per_block"]),
                down_block_types=tuple(str(t) for t in data["down_block_types"]),
                up_block_types=tuple(str(t) for t in data["up_block_types"]),
                mid_block_type=data.get("mid_block_type"),
                addition_embed_type=data.get("addition_embed_type"),
                cross_attention_dim=data.get("cross_attention_dim"),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{where}: malformed UNet layout {data!r:.200} ({error})") from error
        if len(layout.layers_per_block) != len(layout.down_block_types):
            count, blocks = len(layout.layers_per_block), len(layout.down_block_types)
            raise ValueError(f"{where}: UNet layout has {count} layers_per_block entries for {blocks} down blocks")
        return layout

    @property
    def has_ldm_original(self) -> bool:
        """Whether the LDM/SGM UNet (openaimodel.UNetModel) can express this layout: its block types and its one
        cross-attention mid block."""
        return (
            self.mid_block_type == LDM_MID_BLOCK
            and len(self.up_block_types) == len(self.down_block_types)
            and all(t in DOWN_TYPES for t in self.down_block_types)
            and all(t in UP_TYPES for t in self.up_block_types)
        )

    @property
    def is_sdxl(self) -> bool:
        """SDXL family: time ids and pooled text embeds as added conditioning, two text encoders."""
        return self.addition_embed_type == "text_time"

    @property
    def kohya_spelling(self) -> str:
        """ "sgm" where kohya's trainer for this family writes SGM names (SDXL with an original), else "diffusers"
        (SD 1.x/2.x as sd-scripts writes them; layouts without an original, e.g. KOALA, whose LoRAs come from
        diffusers' trainers)."""
        return "sgm" if self.is_sdxl and self.has_ldm_original else "diffusers"

    @property
    def base_model_version(self) -> str | None:
        """kohya's ``ss_base_model_version`` for this family, None where kohya has none (e.g. KOALA)."""
        if self.is_sdxl:
            return SDXL_BASE_VERSION if self.has_ldm_original else None
        if self.addition_embed_type is None and self.has_ldm_original:
            return "sd_v2" if self.cross_attention_dim == 1024 else "sd_v1"
        return None


class NameTable:
    """diffusers ↔ SGM module names of one layout, in kohya's underscore spelling."""

    def __init__(self, layout: UNetLayout) -> None:
        if not layout.has_ldm_original:
            raise ValueError(f"UNet layout {layout} has no LDM/SGM original: no SGM names")
        exact = {underscore(d): underscore(s) for d, s in TOP_LEVEL_NAMES.items()}
        attention: dict[str, str] = {}

        def block(diffusers: str, sgm: str, index: int, attends: bool) -> None:
            for d, s in RESNET_NAMES.items():
                exact[f"{diffusers}_resnets_{index}_{d}"] = f"{sgm}_0_{underscore(s)}"
            if attends:
                attention[f"{diffusers}_attentions_{index}_"] = f"{sgm}_1_"

        n = 1
        last = len(layout.down_block_types) - 1
        for b, (kind, layers) in enumerate(zip(layout.down_block_types, layout.layers_per_block)):
            for i in range(layers):
                block(f"down_blocks_{b}", f"input_blocks_{n}", i, DOWN_TYPES[kind])
                n += 1
            if b < last:
                exact[f"down_blocks_{b}_downsamplers_0_conv"] = f"input_blocks_{n}_0_op"
                n += 1
        for d, s in RESNET_NAMES.items():
            exact[f"mid_block_resnets_0_{d}"] = f"middle_block_0_{underscore(s)}"
            exact[f"mid_block_resnets_1_{d}"] = f"middle_block_2_{underscore(s)}"
        attention["mid_block_attentions_0_"] = "middle_block_1_"
        n = 0
        for b, (kind, layers) in enumerate(zip(layout.up_block_types, reversed(layout.layers_per_block))):
            for i in range(layers + 1):
                block(f"up_blocks_{b}", f"output_blocks_{n}", i, UP_TYPES[kind])
                if i == layers and b < last:
                    exact[f"up_blocks_{b}_upsamplers_0_conv"] = f"output_blocks_{n}_{2 if UP_TYPES[kind] else 1}_conv"
                n += 1
        self.exact, self.attention = exact, attention
        self.exact_back = {s: d for d, s in exact.items()}
        self.attention_back = {s: d for d, s in attention.items()}

    @staticmethod
    def _convert(name: str, exact: dict, attention: dict, pattern: re.Pattern) -> str | None:
        if name in exact:
            return exact[name]
        match = pattern.match(name)
        if match and match.group(1) in attention:
            return attention[match.group(1)] + name[match.end(1) :]
        return None

    def to_sgm(self, name: str) -> str | None:
        """SGM name of a diffusers module name (either spelling), in kohya spelling; None if it has none."""
        return self._convert(underscore(name), self.exact, self.attention, _DIFFUSERS_ATTENTION)

    def to_diffusers(self, name: str) -> str | None:
        """diffusers name (kohya spelling) of an SGM module name (either spelling); None if it is not one."""
        return self._convert(underscore(name), self.exact_back, self.attention_back, _SGM_ATTENTION)


def is_sgm_name(name: str) -> bool:
    """Whether a UNet module name uses SGM block names (``input_blocks``…, ``time_embed``, ``label_emb``, ``out``)."""
    stem = underscore(name)
    return stem.startswith(SGM_BLOCKS) or stem.startswith(("time_embed_", "label_emb_")) or stem == "out_2"


def sdxl_base_layout() -> UNetLayout:
    """SDXL base 1.0's layout (the config shipped in ``lora2.configs``): the only one kohya writes SGM names for."""
    text = resources.files("lora2.configs").joinpath("sdxl_unet.json").read_text()
    return UNetLayout.from_config(json.loads(text))
