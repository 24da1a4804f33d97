"""Module names in files versus module names in models.

Text encoders: transformers 5 flattens ``CLIPTextModel`` (``encoder.layers.0…``) while
``CLIPTextModelWithProjection`` and older transformers keep ``text_model.encoder.layers.0…``. Files always use the
``text_model.`` spelling (what diffusers, A1111 and ComfyUI expect; diffusers strips it again for flattened models),
and peft patterns use the spelling without it, which matches either layout by suffix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from torch import nn

TEXT_MODEL = "text_model."
# A component or module name read from a file: dot-separated parts of letters, digits and underscores (every
# diffusers, transformers and kohya module name). No "/" or "\\", no "..", no empty part, nothing absolute.
_SAFE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_MAX_NAME = 1000


def check_name(path: str | Path, name: object, what: str) -> str:
    """``name`` if it is identifier-like (see ``_SAFE_NAME``), else ValueError naming the file.

    Every reader passes the component and module names of a file through here before they reach a path (peft
    writes one folder per component) or a module lookup, so a name read from a file never decides where lora2
    writes.
    """
    if not isinstance(name, str) or len(name) > _MAX_NAME or not _SAFE_NAME.fullmatch(name):
        raise ValueError(
            f"{path}: {what} name {name!r:.100} is not allowed (dot-separated letters, digits and underscores only)"
        )
    return name


def check_names(path: str | Path, components: Mapping[str, Iterable[str]]) -> None:
    """``check_name`` on every component (``""``, the model itself, allowed) and module name of ``components``."""
    for component, modules in components.items():
        if component != "":
            check_name(path, component, "component")
        for module in modules:
            check_name(path, module, f"module (of component {component!r:.100})")


def is_text_encoder(component: str) -> bool:
    return component.startswith("text_encoder")


def is_flat_clip(model: nn.Module) -> bool:
    """A CLIP text model whose modules are not under ``text_model`` (transformers ≥ 5 ``CLIPTextModel``)."""
    return not hasattr(model, "text_model") and hasattr(model, "encoder") and hasattr(model, "embeddings")


def to_file_name(model: nn.Module, component: str, name: str) -> str:
    """The module name written to files."""
    if is_text_encoder(component) and is_flat_clip(model) and not name.startswith(TEXT_MODEL):
        return TEXT_MODEL + name
    return name


def pattern_key(component: str, names: list[str]) -> str:
    """A peft rank_pattern/alpha_pattern key matching exactly these modules under peft's ``get_pattern_key``
    (``re.match(rf"(.*\\.)?({key})$", name)``): ``^(?:a|b)`` anchors full names; text encoders use the names without
    ``text_model.`` and no anchor, so that either CLIP layout matches."""
    if is_text_encoder(component):
        return "(?:" + "|".join(re.escape(name.removeprefix(TEXT_MODEL)) for name in names) + ")"
    return "^(?:" + "|".join(re.escape(name) for name in names) + ")"


def target_name(component: str, name: str) -> str:
    """A peft target_modules entry for this module (exact name, or suffix for text encoders)."""
    return name.removeprefix(TEXT_MODEL) if is_text_encoder(component) else name


class PatternTable:
    """peft's pattern lookup (``get_pattern_key``): the value of the first key matching the end of a name at a dot.

    Keys are compiled once and indexed by their last dotted token when it is a plain word, so looking up every
    module of an SDXL UNet against hundreds of exact-name patterns stays linear rather than quadratic.
    """

    def __init__(self, patterns: dict) -> None:
        self.entries = [(i, re.compile(rf"(.*\.)?({key})$"), value) for i, (key, value) in enumerate(patterns.items())]
        self.by_token: dict[str, list] = {}
        self.always = []
        for entry, key in zip(self.entries, patterns):
            token = key.rsplit(".", 1)[-1]
            if re.fullmatch(r"\w+", token):
                self.by_token.setdefault(token, []).append(entry)
            else:
                self.always.append(entry)

    def get(self, name: str):
        token = name.rsplit(".", 1)[-1]
        for _, regex, value in sorted(self.by_token.get(token, []) + self.always, key=lambda e: e[0]):
            if regex.match(name):
                return value
        return None


def underscore(name: str) -> str:
    """kohya spelling of a module name (dots replaced by underscores)."""
    return name.replace(".", "_")


def resolver(model_names: list[str], flat_clip: bool) -> dict[str, str | None]:
    """Map every spelling a file may use for a model module (dotted, kohya, with/without ``text_model.``) to it.

    A spelling shared by two modules maps to None (ambiguous; the caller reports it).
    """
    table: dict[str, str | None] = {}
    for name in model_names:
        spellings = {name}
        if flat_clip:
            spellings.add(TEXT_MODEL + name)
        elif name.startswith(TEXT_MODEL):
            spellings.add(name.removeprefix(TEXT_MODEL))
        for spelling in list(spellings):
            spellings.add(underscore(spelling))
        for spelling in spellings:
            table[spelling] = None if table.get(spelling, name) != name else name
    return table
