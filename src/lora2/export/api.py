"""``save_lora`` and ``load_lora``: LoRA² models to and from adapter files.

Design:

- Standard files (diffusers, kohya, peft) hold each module's plain LoRA pair from ``LoRA2Layer.export_weights``:
  ``down = A[:D]``, ``up = s · B[:, :D] · Λ`` (scale 1), truncated to the module's own rank D, so diffusers, peft,
  A1111 and ComfyUI reproduce the trained model exactly. They also carry the ``lora2`` header entry
  (``lora2.export.metadata``) with ν (as log ν, exact), D and the LoRA2Config. No extra tensors are added: diffusers'
  and kohya loaders reject unknown keys.
- ``load_lora`` into a LoRA² model sets D (``set_rank``), restores ν from the header and recovers
  ``B = up / (s·λ(ν))``: ranks and ν are exact, ΔW is exact up to one fp32 rounding of B.
- ``format="lora2"`` writes the unbaked A, B and log ν as trained (``lora2.export.native``), for bit-exact resumption.
- Files of other tools (no lora2 header) load as fixed-rank LoRA (Λ = I, scale 1) into a plain model; into an
  adaptive LoRA² model they load with ν set to the middle of the file rank's ν interval, so training can continue
  adaptively from the file's function. kohya files in sd-scripts' SGM spelling (``input_blocks_4_1_…``) are mapped
  to diffusers module names with the table of the model's UNet layout (``lora2.export.sgm``).
- kohya files name the UNet as kohya's trainer for its family does: the UNet's layout (its config) is stored in the
  ``lora2`` header so that the tools (merge, resize) write the same spelling.
- Per-format details: ``diffusers`` (peft metadata header), ``kohya`` (one alpha per file), ``peft`` (directories),
  ``names`` (text-encoder spellings).
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from lora2.export.adapter import AdapterFile, LoraModule
from lora2.export.files import write_safetensors
from lora2.export.formats import check_format, output_path, read_adapter, write_adapter
from lora2.export.keys import FILE_NAMES, KNOWN_COMPONENTS
from lora2.export.metadata import build_header
from lora2.export.names import is_flat_clip, is_text_encoder, resolver, to_file_name, underscore
from lora2.export.native import header_config
from lora2.export.native import to_state_dict as native_state_dict
from lora2.export.sgm import NameTable, UNetLayout, is_sgm_name
from lora2.inject import inject
from lora2.logs import quiet_unet_lora_load
from lora2.lora.config import LoRA2Config
from lora2.lora.layer import LoRA2Layer, unbake_up
from lora2.lora.model import lora_layers
from lora2.rank.math import nu_for_rank

logger = logging.getLogger(__name__)

Models = nn.Module | dict[str, nn.Module]


def default_component(model: nn.Module) -> str:
    """The diffusers component name of a model given alone: text encoders, transformer backbones, else "unet"."""
    cls = type(model)
    if cls.__name__ == "CLIPTextModelWithProjection":
        return "text_encoder_2"
    if cls.__module__.startswith("transformers."):
        return "text_encoder"
    if cls.__module__.startswith("diffusers.") and "Transformer" in cls.__name__:
        return "transformer"
    return "unet"


def _components(model: Models) -> dict[str, nn.Module]:
    if isinstance(model, nn.Module):
        return {default_component(model): model}
    if (
        isinstance(model, dict)
        and model
        and all(isinstance(k, str) and isinstance(v, nn.Module) for k, v in model.items())
    ):
        return dict(model)
    raise ValueError(
        f"model must be an nn.Module or a non-empty dict of component name → nn.Module, got {model!r:.80}"
    )


def save_lora(
    model: Models,
    path: str | Path,
    format: str = "diffusers",
    metadata: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write the LoRA² adapters of ``model`` as a LoRA file that standard loaders reproduce exactly.

    Args:
        model: a model injected with ``lora2.inject``, or a dict of component name → model, e.g.
            ``{"unet": unet, "text_encoder": te, "text_encoder_2": te2}`` (diffusers' prefixes). A model given alone
            is named by its type: ``CLIPTextModelWithProjection`` → "text_encoder_2", other transformers models →
            "text_encoder", diffusers transformer backbones → "transformer", anything else → "unet".
        path: a ``.safetensors`` file name, or a directory that receives ``pytorch_lora_weights.safetensors``
            (diffusers), ``lora_kohya.safetensors`` (kohya), ``lora2_adapter.safetensors`` (lora2); for "peft", the
            directory of ``adapter_config.json`` + ``adapter_model.safetensors`` (one sub-directory per component
            when there are several).
        format: "diffusers" (``pipe.load_lora_weights``), "kohya" (A1111, ComfyUI, diffusers' kohya conversion),
            "peft" (``PeftModel.from_pretrained``) or "lora2" (unbaked training state, exact resume).
        metadata: JSON-serialisable training settings stored in the ``lora2`` header entry.
        dtype: dtype of the written weights (the baking is computed in fp32); the lora2 format is always fp32.

    Returns:
        The file (or, for peft, the directory) written.
    """
    check_format(format)
    components = _components(model)
    adapter: dict[str, dict[str, LoraModule]] = {}
    described: dict[str, dict] = {}
    raw: dict[str, dict] = {}
    layout = None
    for component, module in components.items():
        layers = list(lora_layers(module))
        if not layers:
            raise ValueError(f"component {component!r} ({type(module).__name__}) holds no LoRA² layers to save")
        modules, infos, raws = {}, {}, {}
        for name, layer in layers:
            # peft keys must be the model's own names; other formats use the portable spelling (names.py)
            file_name = name if format == "peft" else to_file_name(module, component, name)
            down, up = layer.export_weights()  # (D, d_in[, kh, kw]), (d_out, D[, 1, 1])
            modules[file_name] = LoraModule(down.float(), up.float())
            log_nu = float(layer.log_nu.detach().float())
            infos[file_name] = {
                "rank": layer.r,
                "adaptive": layer.adaptive,
                "scaling": layer.scaling,
                "lambda_scaling": layer.config.lambda_scaling,
                "log_nu": log_nu,
                "nu": math.exp(log_nu),
            }
            raws[file_name] = (layer.lora_A[: layer.r].detach(), layer.active_b().detach(), layer.log_nu.detach())
        adapter[component], raw[component] = modules, raws
        described[component] = {"config": layers[0][1].config.to_dict(), "modules": infos}
        unet_layout = UNetLayout.of_model(module)
        if unet_layout is not None:
            described[component]["layout"] = unet_layout.to_dict()
            layout = layout or unet_layout
    header = build_header(format, described, metadata)
    if format == "lora2":
        written = write_safetensors(output_path(path, format), native_state_dict(raw), header)
    else:
        written = write_adapter(adapter, path, format, header, dtype, layout)
    total = sum(len(m) for m in adapter.values())
    logger.debug("saved %d LoRA² modules (%s format) to %s", total, format, written)
    return written


def _match_components(
    file: AdapterFile, components: dict[str, nn.Module], alone: bool, strict: bool
) -> dict[str, str]:
    """file component → model component."""
    in_file = list(file.adapter)
    if alone:
        ((name, _),) = components.items()
        if name in file.adapter:
            chosen = name
        elif len(in_file) == 1:
            chosen = in_file[0]
        else:
            raise ValueError(
                f"{file.path}: holds components {in_file}; pass a dict such as "
                f"{{{', '.join(repr(c) for c in in_file)}: model}} to say which model gets which"
            )
        mapping = {chosen: name}
    else:
        mapping = {c: c for c in in_file if c in components}
        if set(in_file) == {""} and len(components) == 1:
            mapping = {"": next(iter(components))}
        absent = sorted(set(components) - set(mapping.values()))
        if absent:
            raise ValueError(f"{file.path}: has no adapters for components {absent} (it holds {in_file})")
    unused = sorted(set(in_file) - set(mapping))
    if unused and strict:
        raise ValueError(
            f"{file.path}: components {unused} are not loaded into any model; pass them in a dict "
            "(or strict=False to skip them)"
        )
    if unused:
        logger.warning("%s: skipping components %s", file.path, unused)
    return mapping


def _translate_sgm(file: AdapterFile, model: nn.Module, names: list[str]) -> dict[str, str]:
    """For kohya files in SGM spelling (``input_blocks_4_1_…``), the diffusers names (kohya spelling) of the given
    modules under the model's UNet layout."""
    layout = UNetLayout.of_model(model)
    if file.format != "kohya" or layout is None or not layout.has_ldm_original:
        return {}
    table = NameTable(layout)
    translated = {name: table.to_diffusers(name) for name in names if is_sgm_name(name)}
    return {name: value for name, value in translated.items() if value is not None}


def _expected_shapes(base: nn.Module, rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    out_features, in_features, *kernel = base.weight.shape
    if isinstance(base, nn.Conv2d):
        return (rank, in_features, *kernel), (out_features, rank, 1, 1)
    return (rank, in_features), (out_features, rank)


def _resolve_modules(
    file: AdapterFile, model: nn.Module, names: list[str], candidates: list[str], label: str, what: str
) -> dict[str, str]:
    """file module name → model module name among ``candidates`` (any spelling, ``names.resolver``; kohya SGM names
    translated); ValueError naming the file for unknown, ambiguous or repeated modules."""
    table = resolver(candidates, is_flat_clip(model))
    translated = _translate_sgm(file, model, [n for n in names if table.get(n, table.get(underscore(n))) is None])
    resolved: dict[str, str] = {}
    unknown = []
    for file_name in names:
        spelling = translated.get(file_name, file_name)
        target = table.get(spelling, table.get(underscore(spelling), ""))
        if target is None:
            raise ValueError(f"{label}: module name {file_name!r} is ambiguous in {type(model).__name__}")
        if not target:
            unknown.append(file_name)
        elif target in resolved.values():
            raise ValueError(f"{label}: two entries of the file name the module {target!r}")
        else:
            resolved[file_name] = target
    if unknown:
        raise ValueError(
            f"{label}: {len(unknown)} module(s) of the file match no {what} of {type(model).__name__}: {unknown[:5]}"
        )
    return resolved


def _check_fit(label: str, file_name: str, lora: LoraModule, base: nn.Module) -> None:
    expected_down, expected_up = _expected_shapes(base, lora.rank)
    if tuple(lora.down.shape) != expected_down or tuple(lora.up.shape) != expected_up:
        raise ValueError(
            f"{label}: module {file_name!r}: weights down {tuple(lora.down.shape)}, up "
            f"{tuple(lora.up.shape)} do not fit {type(base).__name__} {tuple(base.weight.shape)} "
            f"(expected {expected_down}, {expected_up})"
        )


def _load_component(
    model: nn.Module, component: str, file: AdapterFile, file_component: str
) -> tuple[dict[str, int], bool, bool]:
    """Load one component; returns (ranks by module, injected here, ν restored)."""
    path, modules = file.path, file.adapter[file_component]
    label = f"{path}: component {file_component or component!r}"
    injected_layers = dict(lora_layers(model))
    if injected_layers:
        candidates = {name: layer.base_layer for name, layer in injected_layers.items()}
    else:
        candidates = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    what = "LoRA² layer" if injected_layers else "nn.Linear/nn.Conv2d module"
    resolved = _resolve_modules(file, model, list(modules), list(candidates), label, what)
    missing = sorted(set(injected_layers) - set(resolved.values()))
    if missing:
        raise ValueError(f"{label}: the file has no weights for {len(missing)} adapted module(s): {missing[:5]}")
    for file_name, name in resolved.items():
        _check_fit(label, file_name, modules[file_name], candidates[name])
        if injected_layers:
            _check_layer(label, file_name, modules[file_name], injected_layers[name])
    described = ((file.lora2 or {}).get("components") or {}).get(file_component) or {}
    injected_here = not injected_layers
    if injected_here:
        _inject_for_file(model, sorted(resolved.values()), modules, described, label, path, file_component)
        injected_layers = dict(lora_layers(model))
    raw = {underscore(name): value for name, value in ((file.raw or {}).get(file_component) or {}).items()}
    ranks, nu_restored = _set_layers(injected_layers, resolved, modules, described, raw, label)
    return ranks, injected_here, nu_restored


def _check_layer(label: str, file_name: str, lora: LoraModule, layer: LoRA2Layer) -> None:
    if layer.merged:
        raise ValueError(f"{label}: module {layer.name!r} is merged; call lora2.unmerge(model) before loading")
    if lora.rank > layer.config.max_rank:
        raise ValueError(
            f"{label}: module {file_name!r} has rank {lora.rank} > max_rank {layer.config.max_rank} of the model's "
            "LoRA² config"
        )


def _inject_for_file(
    model: nn.Module, names: list[str], modules: dict, described: dict, label: str, path: Path, component: str
) -> None:
    """Inject LoRA² into exactly the file's modules: with the stored LoRA2Config when the file has a lora2 header
    (training can resume), else as fixed-rank LoRA at each module's rank."""
    max_rank = max(lora.rank for lora in modules.values())
    if "config" in described:
        stored = header_config(path, component, described).to_dict()
        overrides = {"target_modules": names, "exclude_modules": [], "rank_pattern": {}}
        config = LoRA2Config.from_dict({**stored, **overrides, "max_rank": max(stored["max_rank"], max_rank)})
    else:
        config = LoRA2Config(target_modules=names, adaptive=False, init_rank=1, max_rank=max_rank)
    inject(model, config)
    kind = "LoRA²" if config.adaptive else "fixed-rank"
    logger.info("%s: injected %s LoRA into %d modules", label, kind, len(names))


@torch.no_grad()
def _set_layers(
    layers: dict[str, LoRA2Layer], resolved: dict[str, str], modules: dict, described: dict, raw: dict, label: str
) -> tuple[dict[str, int], bool]:
    """Set each layer's rank, ν (from the header, else the middle of the rank's ν interval) and weights; returns
    (ranks by module, whether any ν came from the header)."""
    infos = {underscore(name): info for name, info in (described.get("modules") or {}).items()}
    nu_restored, ranks, inconsistent = False, {}, []
    for file_name, name in resolved.items():
        layer, lora = layers[name], modules[file_name]
        info = infos.get(underscore(file_name), {})
        layer.set_rank(lora.rank)
        if layer.adaptive:
            if info.get("adaptive") and "log_nu" in info:
                layer.log_nu.fill_(info["log_nu"])
                nu_restored = True
            else:
                layer.log_nu.fill_(math.log(nu_for_rank(lora.rank, layer.config.quantile)))
            if layer.target_rank_from_nu() != lora.rank:
                inconsistent.append(name)
        _assign(layer, lora, raw.get(underscore(file_name)), info)
        ranks[name] = lora.rank
    if inconsistent:
        logger.warning(
            "%s: for %d module(s) ν implies another rank than the file's under this config; the rank will follow ν "
            "at the next optimizer step: %s", label, len(inconsistent), inconsistent[:5],
        )  # fmt: skip
    return ranks, nu_restored


def _assign(layer: LoRA2Layer, lora: LoraModule, raw: tuple | None, info: dict) -> None:
    """Set A[:D], B[:, :D]: raw (native file, same s and Λ) or B = scale·up / (s·λ)."""
    rank = lora.rank
    a, b = layer.lora_A, layer.lora_B
    same_law = (info.get("adaptive"), info.get("scaling"), info.get("lambda_scaling")) == (
        layer.adaptive,
        layer.scaling,
        layer.config.lambda_scaling,
    )
    if raw is not None and same_law:
        a[:rank] = raw[0].to(a.device, a.dtype)
        b[:, :rank] = raw[1].to(b.device, b.dtype)
        return
    lam = layer.scaled_importance().double().cpu()  # (D,)
    a[:rank] = lora.down.to(a.device, a.dtype)
    b[:, :rank] = unbake_up(lora.up.double() * lora.scale, lam).to(b.device, b.dtype)  # (d_out, D[, 1, 1])


def load_lora(model: Models, path: str | Path, strict: bool = True) -> dict:
    """Load an adapter file (diffusers, kohya, peft, lora2-native; found by content) into ``model``.

    ``model`` is one model or a dict of component name → model, as for ``save_lora``. Per component:

    - model already injected with ``lora2.inject``: each LoRA² layer is resized to the file's rank
      (``set_rank``); adaptive layers get ν from the ``lora2`` header (files written by lora2) or, for files of
      other tools, the ν whose effective rank is the file's rank; B is set so that s·BΛ equals the file's
      ``scale · up``. The file and the model must name the same modules.
    - plain model: LoRA² is injected first on exactly the file's modules, with the stored LoRA2Config when the file
      has a lora2 header (training can resume), else as fixed-rank LoRA (Λ = I, scale 1) at each module's rank.

    Create optimizers after loading (or call ``lora2.sync_ranks``): parameters are re-allocated when ranks change.

    Raises:
        ValueError: naming the file and the module or key, for pickles or non-safetensors content, corrupt or
            truncated files, unknown/missing keys, shapes that do not fit the model, modules present on one side
            only, components of the file not loaded (unless ``strict=False``).

    Returns:
        ``{"path", "format", "ranks", "injected", "nu_restored", "lora2", "metadata"}``; ``ranks`` is
        ``{module: D}`` for a single model and ``{component: {module: D}}`` for a dict.
    """
    components = _components(model)
    file = read_adapter(path)
    mapping = _match_components(file, components, isinstance(model, nn.Module), strict)
    ranks, injected, restored = {}, False, False
    for file_component, component in mapping.items():
        r, inj, res = _load_component(components[component], component, file, file_component)
        ranks[component], injected, restored = r, injected or inj, restored or res
    if isinstance(model, nn.Module):
        ranks = next(iter(ranks.values()))
    return {
        "path": str(file.path),
        "format": file.format,
        "ranks": ranks,
        "injected": injected,
        "nu_restored": restored,
        "lora2": file.lora2,
        "metadata": (file.lora2 or {}).get("training", {}),
    }


# formats that diffusers' ``pipe.load_lora_weights`` reads (a peft folder or lora2's training state it does not)
PIPELINE_FORMATS = ("diffusers", "kohya")


def _pipeline_file(path: Path) -> Path:
    """What to give diffusers for ``path``: in a folder its diffusers file, else its kohya file; else ``path``
    (``read_adapter`` then finds what the folder holds, or says why nothing)."""
    if path.is_dir():
        for fmt in PIPELINE_FORMATS:
            if (path / FILE_NAMES[fmt]).is_file():
                return path / FILE_NAMES[fmt]
    return path


def check_pipeline_lora(pipe, path: str | Path) -> AdapterFile:
    """Check an adapter before diffusers' ``pipe.load_lora_weights``, with the checks of ``lora2 inspect``
    (``read_adapter``: safetensors only, finite weights, LoRA pairs, names; DoRA magnitudes allowed), and every
    module against the pipeline: it must name an nn.Linear/nn.Conv2d of a pipeline component with matching shapes.
    ValueError naming the file (and module) otherwise; nothing is loaded."""
    file = read_adapter(_pipeline_file(Path(path)), dora=True)
    if file.format not in PIPELINE_FORMATS:
        raise ValueError(
            f"{file.path}: a {file.format} adapter, which diffusers' load_lora_weights does not read; give a "
            f"diffusers or kohya file (lora2 merge {file.path} --format diffusers --out FILE converts it exactly)"
        )
    parts = {n: getattr(pipe, n) for n in KNOWN_COMPONENTS if isinstance(getattr(pipe, n, None), nn.Module)}
    denoiser = "unet" if "unet" in parts else "transformer"
    for file_component, modules in file.adapter.items():
        component = file_component or denoiser
        label = f"{file.path}: component {component!r}"
        if component not in parts:
            raise ValueError(f"{label} is not part of the pipeline {type(pipe).__name__} (it has {sorted(parts)})")
        model = parts[component]
        candidates = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        resolved = _resolve_modules(file, model, list(modules), list(candidates), label, "nn.Linear/nn.Conv2d module")
        for file_name, name in resolved.items():
            _check_fit(label, file_name, modules[file_name], candidates[name])
    return file


def load_pipeline_lora(pipe, path: str | Path) -> Path:
    """``check_pipeline_lora``, then diffusers' own ``pipe.load_lora_weights`` of exactly the checked file; returns
    it. An error diffusers still raises becomes a ValueError naming the file. diffusers' notice that a text encoder
    has no LoRA keys is dropped for files that adapt no text encoder."""
    file = check_pipeline_lora(pipe, path)
    # diffusers warns for each text encoder the file does not adapt: noise when the file adapts none on purpose
    adapts_text = any(is_text_encoder(component) for component in file.adapter)
    try:
        with nullcontext() if adapts_text else quiet_unet_lora_load():
            pipe.load_lora_weights(str(file.path))
    except (ValueError, KeyError, RuntimeError, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{file.path}: diffusers could not load it into {type(pipe).__name__}: {reason}") from error
    return file.path
