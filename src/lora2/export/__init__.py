"""Adapter files: diffusers/peft and kohya formats, plus lora2 metadata (being written)."""


def save_lora(model, path, format="diffusers"):  # noqa: D103 - placeholder until the export module lands
    raise NotImplementedError


def load_lora(model, path):  # noqa: D103
    raise NotImplementedError
