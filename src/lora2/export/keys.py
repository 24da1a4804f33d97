"""Key names and file names of the adapter formats, as data."""

from __future__ import annotations

FORMATS = ("diffusers", "kohya", "peft", "lora2")

# File names inside a directory ``path`` (a path ending in ".safetensors" is used as the file name itself).
FILE_NAMES = {
    "diffusers": "pytorch_lora_weights.safetensors",  # diffusers.loaders.lora_base.LORA_WEIGHT_NAME_SAFE
    "kohya": "lora_kohya.safetensors",
    "lora2": "lora2_adapter.safetensors",
}
PEFT_CONFIG_NAME = "adapter_config.json"
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"
# When a directory holds several formats, load_lora reads the first present in this order.
DIRECTORY_PREFERENCE = ("lora2", "diffusers", "peft", "kohya")

# safetensors header entries
LORA2_HEADER_KEY = "lora2"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
LORA2_HEADER_VERSION = 1

# Components that diffusers pipelines prefix keys with; other leading key segments belong to module names.
KNOWN_COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "prior")

# kohya / sd-scripts prefixes: written (component → prefix) and read (prefix → component). SDXL naming: te1/te2;
# SD 1.x/2.x (one text encoder) use "lora_te_" (sd-scripts LoRANetwork.LORA_PREFIX_TEXT_ENCODER).
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
KOHYA_SD_TEXT_PREFIX = "lora_te_"
KOHYA_READ_PREFIXES = {
    "lora_unet_": "unet",
    "lora_te1_": "text_encoder",
    "lora_te2_": "text_encoder_2",
    "lora_te_": "text_encoder",
    "lora_transformer_": "transformer",
}
KOHYA_DOWN = ".lora_down.weight"
KOHYA_UP = ".lora_up.weight"
KOHYA_ALPHA = ".alpha"

PEFT_PREFIX = "base_model.model."

# Checkpoint suffixes that hold pickles: refused without being opened.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# Which file each tool reads in full, for an SDXL adapter (README "Which file for which tool", the model card;
# benchmarks/loaders.py measures the loaders): tool → format, a key of FILE_NAMES or "peft" (a directory).
TOOL_FORMATS = {
    "ComfyUI": "kohya",
    "AUTOMATIC1111": "kohya",
    "Forge": "kohya",
    "sd-scripts": "kohya",
    "InvokeAI": "kohya",
    "diffusers": "diffusers",
    "peft": "peft",
}
