"""Which loader reads lora2's files in full: the key-mapping code of ComfyUI, A1111 and sd-scripts (merge and resume),
run on a full-architecture SDXL adapter, and diffusers / peft on the same architecture at reduced width.

The adapter covers every module lora2 adapts in SDXL (all 794 UNet Linear/Conv2d: attention, proj, ff, resnet
convs and shortcuts, time/add embeddings, samplers, conv_in/out; q/k/v/out_proj/fc1/fc2 of both text encoders:
1058 modules) at ranks 1–32, with random non-zero factors. It is written by lora2's own writer
(``lora2.export.write_adapter``, what ``save_lora`` calls) with the lora2 header and SDXL's UNet layout. The full
models are built on the meta device (names and shapes only); only the adapter tensors are real (265 MB fp32).

Per loader: ``mapped`` = file modules the loader applies to a module of the model, ``total`` = modules in the file,
``max_rel_err`` = max over mapped modules of ‖ΔW_loader − ΔW‖_F / ‖ΔW‖_F in fp32, where ΔW_loader is computed by
the loader's own code where it has one (ComfyUI ``calculate_weight``, A1111 ``NetworkModuleLora.calc_updown``,
sd-scripts ``sdxl_merge_lora.merge_to_sd_model`` / ``LoRAInfModule.get_weight``, peft ``get_delta_weight``) and ΔW
is the adapter's. Which model module a UNet key lands on is judged with ComfyUI's ``unet_to_diffusers`` (third-party,
independent of lora2's table); the SGM module tree is sd-scripts' ``SdxlUNet2DConditionModel`` (the names of
Stability's checkpoint), the text encoders are transformers' CLIP with the ``text_model.`` names sd-scripts'
pinned transformers 4 uses, and A1111's second text encoder is an OpenCLIP-named stand-in (``resblocks.N.attn`` a
``MultiheadAttention``, ``mlp.c_fc`` / ``mlp.c_proj``) as A1111's SGM conditioner holds it.

Third-party code is never part of lora2: this script reads it from the folders given on the command line and
executes only the functions it names (heavy imports stubbed). How the folders were made (commits in loaders.json):

    git --git-dir=/work/.mirror/kohya-ss+sd-scripts/repo archive HEAD networks library | tar -x -C /tmp/tp/sd-scripts
    # ComfyUI and A1111 snapshots are too large to fetch; their files were read with the search tool's read_file
    # at the commits below and saved under the same paths: ComfyUI comfy/lora.py, comfy/utils.py; A1111
    # extensions-builtin/Lora/{networks,network,network_lora,lyco_helpers}.py
    PYTHONPATH=src python benchmarks/loaders.py --sd-scripts /tmp/tp/sd-scripts --comfyui /tmp/tp/ComfyUI \\
        --a1111 /tmp/tp/stable-diffusion-webui --configs ../shared/configs --out benchmarks/results/loaders.json

``--spelling diffusers`` measures a kohya file in diffusers spelling instead (what lora2 wrote before).
"""

from __future__ import annotations

import argparse
import ast
import collections
import gc
import importlib.util
import json
import logging
import math
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lora2.export import LoraModule, write_adapter
from lora2.export.kohya import kohya_prefix, unet_names
from lora2.export.metadata import build_header
from lora2.export.names import underscore
from lora2.export.sgm import UNetLayout

logger = logging.getLogger("loaders")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# comfy/model_detection.py unet_config_from_diffusers_unet, entry SDXL: the unet_config ComfyUI uses for SDXL base
COMFY_SDXL = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}  # fmt: skip


# ---------------------------------------------------------------- third-party code, read from the given folders


def run_definitions(path: Path, names: set[str], namespace: dict) -> dict:
    """Execute only the named top-level functions, classes and assignments of a source file into ``namespace``."""
    tree = ast.parse(path.read_text())

    def defines(node) -> set[str]:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            return {node.name}
        if isinstance(node, ast.Assign):
            return {t.id for t in node.targets if isinstance(t, ast.Name)}
        return set()

    body = [node for node in tree.body if defines(node) & names]
    missing = names - set().union(*(defines(node) for node in body))
    if missing:
        raise SystemExit(f"{path}: does not define {sorted(missing)}")
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def stub_module(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    sys.modules[name] = module
    return module


def import_file(name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


class AnyClass:
    """``comfy.model_base.<anything>``: a fresh class no model is an instance of."""

    def __getattr__(self, name: str) -> type:
        return type(name, (), {})


# ---------------------------------------------------------------- models (meta) and the adapter


def clip_models(configs: Path, width: dict | None = None) -> tuple[nn.Module, nn.Module]:
    """SDXL's two CLIP text encoders; the first wrapped so that its modules are named ``text_model.…`` as in
    transformers 4 (which sd-scripts pins), whatever the installed transformers."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    first = json.loads((configs / "sdxl_text_encoder.json").read_text()) | (width or {})
    second = json.loads((configs / "sdxl_text_encoder_2.json").read_text()) | (width or {})
    te1 = CLIPTextModel(CLIPTextConfig(**first))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**second))
    if not hasattr(te1, "text_model"):
        wrapper = nn.Module()
        wrapper.text_model = te1
        te1 = wrapper
    return te1, te2


def adaptable(model: nn.Module, component: str) -> dict[str, tuple[int, ...]]:
    """name → weight shape of every module lora2 adapts (UNet: all Linear/Conv2d; CLIP: attention and MLP)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and (component == "unet" or name.endswith(TEXT_TARGETS)):
            found[name] = tuple(module.weight.shape)
    return found


def make_adapter(shapes: dict[str, dict[str, tuple]], seed: int = 0) -> dict[str, dict[str, LoraModule]]:
    """Random non-zero LoRA pairs at ranks 1..32 (rank = 1 + 7·i mod 32 over the modules in order)."""
    gen = torch.Generator().manual_seed(seed)
    adapter, index = {}, 0
    for component, modules in shapes.items():
        for name, (d_out, d_in, *kernel) in modules.items():
            rank = 1 + (7 * index) % 32
            index += 1
            down = torch.randn(rank, d_in, *kernel, generator=gen) / math.sqrt(d_in)  # (r, d_in[, kh, kw])
            up = torch.randn(d_out, rank, *([1, 1] if kernel else []), generator=gen)  # (d_out, r[, 1, 1])
            adapter.setdefault(component, {})[name] = LoraModule(down, up)
    return adapter


def write_kohya(adapter: dict, layout: UNetLayout, path: Path, spelling: str) -> tuple[Path, dict[str, tuple]]:
    """The kohya file as ``save_lora`` writes it, and file stem → (component, module)."""
    layout_used = layout if spelling == "sgm" else None
    described = {c: {"modules": {n: {"rank": m.rank} for n, m in mods.items()}} for c, mods in adapter.items()}
    described["unet"]["layout"] = layout.to_dict()
    header = build_header("kohya", described, {"benchmark": "loaders"})
    written = write_adapter(adapter, path, "kohya", header, torch.float32, layout_used)
    stems = {}
    for component, modules in adapter.items():
        names = unet_names(list(modules), layout_used) if component == "unet" else {n: underscore(n) for n in modules}
        for name in modules:
            stems[kohya_prefix(component, layout_used) + names[name]] = (component, name)
    return written, stems


class Scorer:
    """Collects, per file module, whether a loader applied it and its ΔW error."""

    def __init__(self, adapter: dict, total: int) -> None:
        self.by_stem = {(c, underscore(n)): m for c, mods in adapter.items() for n, m in mods.items()}
        self.total, self.errors = total, {}

    def add(self, component: str, name: str, delta: torch.Tensor) -> None:
        want = self.by_stem.get((component, underscore(name)))
        if want is None:
            self.errors[(component, underscore(name))] = math.inf  # applied to a module the adapter does not have
            return
        ref = want.delta(torch.float64)
        error = (
            float((delta.double().reshape(ref.shape) - ref).norm() / ref.norm())
            if delta.numel() == ref.numel()
            else math.inf
        )
        self.errors[(component, underscore(name))] = error

    def result(self, **extra) -> dict:
        good = {key: e for key, e in self.errors.items() if math.isfinite(e)}
        missing = sorted(".".join(key) for key in set(self.by_stem) - set(good))
        worst = max(good.values(), default=None)
        return {"mapped": len(good), "total": self.total, "max_rel_err": worst, "not_mapped": missing[:20], **extra}


def sgm_to_diffusers(unet_to_diffusers) -> dict[str, str]:
    """SGM module name → diffusers module name of SDXL, both underscored, from ComfyUI's unet_to_diffusers."""
    pairs = unet_to_diffusers(COMFY_SDXL)
    inverse = {}
    for diffusers_key, sgm_key in pairs.items():
        if diffusers_key.endswith(".weight") and not diffusers_key.startswith("class_embedding"):
            inverse[underscore(sgm_key.removesuffix(".weight"))] = underscore(diffusers_key.removesuffix(".weight"))
    return inverse


def file_name(component: str, name: str) -> str:
    """A text encoder module name in file spelling (``text_model.…``), whatever the CLIP layout."""
    if component != "unet" and not name.startswith("text_model."):
        return "text_model." + name
    return name


# ---------------------------------------------------------------- ComfyUI


def comfyui(root: Path, sgm: nn.Module, te1: nn.Module, te2: nn.Module, path: Path, scorer: Scorer) -> dict:
    """ComfyUI's ``model_lora_keys_unet`` / ``model_lora_keys_clip`` key map, ``load_lora`` and ``calculate_weight``,
    on SDXL's SGM state-dict keys (``diffusion_model.…``) and its CLIP keys (``clip_l/clip_g.transformer.…``)."""
    tables = {"UNET_MAP_ATTENTIONS", "TRANSFORMER_BLOCKS", "UNET_MAP_RESNET", "UNET_MAP_BASIC", "unet_to_diffusers"}
    utils = run_definitions(root / "comfy" / "utils.py", tables, {})
    cast = types.SimpleNamespace(cast_to_device=lambda t, device, dtype, copy=False: t.to(device=device, dtype=dtype))
    comfy = types.SimpleNamespace(
        utils=types.SimpleNamespace(unet_to_diffusers=utils["unet_to_diffusers"]),
        model_management=cast,
        model_base=AnyClass(),
    )
    names = {
        "LORA_CLIP_MAP",
        "load_lora",
        "model_lora_keys_clip",
        "model_lora_keys_unet",
        "calculate_weight",
        "pad_tensor_to_shape",
    }
    lora = run_definitions(root / "comfy" / "lora.py", names, {"comfy": comfy, "logging": logging, "torch": torch})
    shapes = {f"diffusion_model.{k}": v.shape for k, v in sgm.state_dict().items()}
    shapes |= {f"clip_l.transformer.{k}": v.shape for k, v in te1.state_dict().items()}
    shapes |= {f"clip_g.transformer.{k}": v.shape for k, v in te2.state_dict().items()}
    unet_model = types.SimpleNamespace(
        state_dict=lambda: {k: None for k in shapes if k.startswith("diffusion_model.")},
        model_config=types.SimpleNamespace(unet_config=COMFY_SDXL),
    )
    clip_model = types.SimpleNamespace(state_dict=lambda: {k: None for k in shapes if k.startswith("clip_")})
    key_map = lora["model_lora_keys_clip"](clip_model, lora["model_lora_keys_unet"](unet_model, {}))
    with CountWarnings("lora key not loaded") as unloaded:
        patches = lora["load_lora"](load_file(path), key_map)
    inverse = sgm_to_diffusers(utils["unet_to_diffusers"])
    for model_key, patch in patches.items():
        if model_key not in shapes:  # ComfyUI's add_patches skips keys the model does not have
            continue
        delta = lora["calculate_weight"]([(1.0, patch, 1.0, None, None)], torch.zeros(shapes[model_key]), model_key)
        stem = model_key.removesuffix(".weight")
        if stem.startswith("diffusion_model."):
            scorer.add("unet", inverse.get(underscore(stem.removeprefix("diffusion_model.")), stem), delta)
        else:
            component = "text_encoder" if stem.startswith("clip_l.") else "text_encoder_2"
            scorer.add(component, stem.split(".transformer.", 1)[1], delta)
    adaptable_sgm = {underscore(n) for n, m in sgm.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    return scorer.result(
        keys_not_loaded=unloaded.count, sgm_modules_without_diffusers_name=len(adaptable_sgm - set(inverse))
    )


class CountWarnings(logging.Handler):
    """Counts log records (any logger, INFO and up) whose message starts with a given text, in a ``with`` block."""

    def __init__(self, prefix: str) -> None:
        super().__init__(logging.INFO)
        self.prefix, self.count = prefix, 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += record.getMessage().startswith(self.prefix)

    def __enter__(self) -> CountWarnings:
        logging.getLogger().addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self)


# ---------------------------------------------------------------- AUTOMATIC1111


def openclip_stand_in(config: dict) -> nn.Module:
    """SGM's FrozenOpenCLIPEmbedder2 as A1111 names it: ``model.transformer.resblocks.N.{attn, mlp.c_fc, mlp.c_proj}``
    (``attn`` a MultiheadAttention with in_proj q/k/v and out_proj)."""
    width, heads, hidden = config["hidden_size"], config["num_attention_heads"], config["intermediate_size"]
    blocks = nn.ModuleList()
    for _ in range(config["num_hidden_layers"]):
        block = nn.Module()
        block.attn = nn.MultiheadAttention(width, heads)
        block.mlp = nn.Module()
        block.mlp.c_fc, block.mlp.c_proj = nn.Linear(width, hidden), nn.Linear(hidden, width)
        blocks.append(block)
    wrapped = nn.Module()
    wrapped.model = nn.Module()
    wrapped.model.transformer = nn.Module()
    wrapped.model.transformer.resblocks = blocks
    return wrapped


def a1111_stubs(path: Path, sd_model) -> None:
    """The ``modules`` package of the webui, reduced to what network.py / network_lora.py / networks.py touch."""
    cpu = torch.device("cpu")
    parts = {
        "sd_models": stub_module("modules.sd_models", read_state_dict=lambda filename: load_file(filename)),
        "shared": stub_module("modules.shared", sd_model=sd_model),
        "devices": stub_module("modules.devices", cpu=cpu, device=cpu, dtype=torch.float32),
        "models": stub_module("modules.models"),
    }
    for name in ("cache", "errors", "hashes"):
        parts[name] = stub_module(f"modules.{name}")
    parts["models"].sd3 = stub_module("modules.models.sd3")
    parts["models"].sd3.mmdit = stub_module("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (), {}))
    stub_module("modules", **parts)
    sys.path.insert(0, str(path))


def a1111(root: Path, sgm: nn.Module, te1: nn.Module, te2_config: dict, path: Path, scorer: Scorer, inverse) -> dict:
    """A1111's ``load_network`` (key conversion, ``network_layer_mapping`` of the SDXL model) and
    ``NetworkModuleLora.calc_updown``; q/k/v of OpenCLIP's MultiheadAttention count only when all of q, k, v and
    out_proj of that layer matched, as ``network_apply_weights`` requires."""
    lora_dir = root / "extensions-builtin" / "Lora"
    diffusion = nn.Module()
    diffusion.diffusion_model = sgm
    first = nn.Module()
    first.transformer = te1
    embedders = [types.SimpleNamespace(wrapped=first), types.SimpleNamespace(wrapped=openclip_stand_in(te2_config))]
    sd_model = types.SimpleNamespace(
        is_sdxl=True, conditioner=types.SimpleNamespace(embedders=embedders), model=diffusion
    )
    a1111_stubs(lora_dir, sd_model)
    network = import_file("network", lora_dir / "network.py")
    import_file("lyco_helpers", lora_dir / "lyco_helpers.py")
    network_lora = import_file("network_lora", lora_dir / "network_lora.py")
    names = {
        "re_digits",
        "re_x_proj",
        "re_compiled",
        "suffix_conversion",
        "convert_diffusers_name_to_compvis",
        "assign_network_names_to_compvis_modules",
        "load_network",
    }
    namespace = {
        "os": __import__("os"),
        "re": __import__("re"),
        "torch": torch,
        "network": network,
        "shared": sys.modules["modules.shared"],
        "sd_models": sys.modules["modules.sd_models"],
        "module_types": [network_lora.ModuleTypeLora()],
        "print": logger.warning,
    }
    run_definitions(lora_dir / "networks.py", names, namespace)
    net = namespace["load_network"]("lora2", types.SimpleNamespace(filename=str(path)))
    for key, module in net.modules.items():
        target = module.sd_module
        if isinstance(target, nn.MultiheadAttention) or key.endswith("_attn_out_proj"):
            layer = key.rsplit("_", 2)[0]  # …_attn
            if not all(f"{layer}_{p}" in net.modules for p in ("q_proj", "k_proj", "v_proj", "out_proj")):
                continue
            shape = target.in_proj_weight.shape if isinstance(target, nn.MultiheadAttention) else target.weight.shape
        else:
            shape = target.weight.shape
        delta, _ = module.calc_updown(torch.zeros(shape))
        scorer.add(*a1111_module(key, inverse), delta)
    return scorer.result()


def a1111_module(sd_key: str, inverse: dict[str, str]) -> tuple[str, str]:
    """(component, module name) of an A1111 sd key (OpenCLIP names: ComfyUI's transformers_convert mapping)."""
    if sd_key.startswith("diffusion_model_"):
        return "unet", inverse.get(sd_key.removeprefix("diffusion_model_"), sd_key)
    if sd_key.startswith("0_transformer_"):
        return "text_encoder", sd_key.removeprefix("0_transformer_")
    rest = sd_key.removeprefix("1_model_transformer_resblocks_")
    layer, _, part = rest.partition("_")
    part = {
        "attn_q_proj": "self_attn_q_proj",
        "attn_k_proj": "self_attn_k_proj",
        "attn_v_proj": "self_attn_v_proj",
        "attn_out_proj": "self_attn_out_proj",
        "mlp_c_fc": "mlp_fc1",
        "mlp_c_proj": "mlp_fc2",
    }.get(part, part)
    return "text_encoder_2", f"text_model_encoder_layers_{layer}_{part}"


# ---------------------------------------------------------------- sd-scripts


def load_sd_scripts(root: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """sd-scripts' ``library/sdxl_original_unet.py`` and ``networks/lora.py`` (einops, library.utils stubbed)."""
    sys.path.insert(0, str(root))
    if importlib.util.find_spec("einops") is None:
        stub_module("einops", rearrange=None)  # used in forward passes only
    stub_module("library.utils", setup_logging=lambda *args, **kwargs: None)
    unet_module = import_file("library.sdxl_original_unet", root / "library" / "sdxl_original_unet.py")
    return unet_module, import_file("lora", root / "networks" / "lora.py")


def sd_scripts_module(lora_name: str, inverse: dict[str, str]) -> tuple[str, str]:
    for prefix, component in (("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")):
        if lora_name.startswith(prefix):
            return component, lora_name.removeprefix(prefix)
    stem = lora_name.removeprefix("lora_unet_")
    return "unet", inverse.get(stem, stem)


def capture_merges(root_module: nn.Module, sink) -> None:
    """Give every Linear/Conv2d a zero weight (a broadcast scalar, no memory) and hand the weight a merge assigns to
    ``sink(name, weight)`` instead of storing it (a full SDXL in fp32 would take 10 GB). Class names stay
    "Linear"/"Conv2d", which is what sd-scripts matches."""
    for name, module in root_module.named_modules():
        if type(module) in CAPTURING:
            zero = torch.zeros(()).expand(module.weight.shape)
            module.__class__ = CAPTURING[type(module)]
            module._parameters["weight"] = nn.Parameter(zero, requires_grad=False)
            module.__dict__["capture"] = (name, sink)


def _capturing(base: type) -> type:
    def __setattr__(self, name, value):
        if name == "weight" and "capture" in self.__dict__:
            module_name, sink = self.__dict__["capture"]
            sink(module_name, value.detach())
            return
        base.__setattr__(self, name, value)

    return type(base.__name__, (base,), {"__setattr__": __setattr__})


CAPTURING = {nn.Linear: _capturing(nn.Linear), nn.Conv2d: _capturing(nn.Conv2d)}


def sd_scripts_merge(root, lora, unet_module, configs, path: Path, scorer: Scorer, inverse) -> dict:
    """sd-scripts ``networks/sdxl_merge_lora.py`` ``merge_to_sd_model``: its module map, its ΔW per Linear/conv."""
    with torch.device("meta"):
        unet = unet_module.SdxlUNet2DConditionModel()
        te1, te2 = clip_models(configs)
    prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
    for component, model in zip(COMPONENTS, (unet, te1, te2)):
        capture_merges(
            model,
            lambda name, w, c=component: scorer.add(*sd_scripts_module(prefixes[c] + underscore(name), inverse), w),
        )
    namespace = {
        "torch": torch,
        "itertools": __import__("itertools"),
        "tqdm": lambda items, *a, **k: items,
        "logger": logger,
        "lora": lora,
        "oft": types.SimpleNamespace(),
        "format_lbws": None,
        "get_lbw_block_index": None,
        "LAYER26": None,
        "load_state_dict": lambda file, dtype: ({k: v.to(dtype) for k, v in load_file(file).items()}, {}),
    }
    run_definitions(
        root / "networks" / "sdxl_merge_lora.py", {"merge_to_sd_model", "detect_method_from_training_model"}, namespace
    )
    with CountWarnings("no module found") as unmatched:
        logger.setLevel(logging.INFO)
        namespace["merge_to_sd_model"](te1, te2, unet, [str(path)], [1.0], [], torch.float32)
    return scorer.result(no_module_found=unmatched.count)


def sd_scripts_resume(lora, unet_module, configs, path: Path, scorer: Scorer, inverse) -> dict:
    """Resuming training from the file as train_network.py does with ``--network_weights --dim_from_weights``:
    ``create_network_from_weights``, ``apply_to``, ``load_weights`` (strict=False: keys it has no module for are
    dropped silently); ΔW of each loaded module by ``LoRAInfModule.get_weight``."""
    with torch.device("meta"):
        unet = unet_module.SdxlUNet2DConditionModel()
        te1, te2 = clip_models(configs)
    network, _ = lora.create_network_from_weights(1.0, None, None, [te1, te2], unet, weights_sd=load_file(path))
    network.apply_to([te1, te2], unet)
    info = network.load_weights(str(path))
    missing = {key.split(".")[0] for key in info.missing_keys}
    for module in network.text_encoder_loras + network.unet_loras:
        if module.lora_name not in missing:
            scorer.add(*sd_scripts_module(module.lora_name, inverse), lora.LoRAInfModule.get_weight(module))
    return scorer.result(unexpected_keys=len(info.unexpected_keys))


# ---------------------------------------------------------------- diffusers and peft (pip packages, real models)


def pip_loaders(configs: Path, spelling: str, work: Path) -> dict:
    """diffusers ``pipe.load_lora_weights`` and peft ``PeftModel.from_pretrained`` on SDXL's architecture at reduced
    width (the same 1058 module names), ΔW from peft's ``get_delta_weight`` of the layers they create."""
    from diffusers import StableDiffusionXLPipeline
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from lora2.world.tiny import build_tiny_sdxl

    sdxl = json.loads((configs / "sdxl_unet.json").read_text())
    structure = {
        k: sdxl[k]
        for k in (
            "layers_per_block",
            "down_block_types",
            "up_block_types",
            "mid_block_type",
            "transformer_layers_per_block",
        )
    }
    width = {"block_out_channels": (32, 64, 128), "attention_head_dim": (2, 4, 8)}
    folder = build_tiny_sdxl(
        work / "pipe",
        unet_config=structure | width,
        text_config={"num_hidden_layers": 12},
        text_config_2={"num_hidden_layers": 32},
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(folder)
    models = {c: getattr(pipe, c) for c in COMPONENTS}
    shapes = {c: {file_name(c, n): s for n, s in adaptable(m, c).items()} for c, m in models.items()}
    adapter = make_adapter(shapes)
    total = sum(len(m) for m in adapter.values())
    layout = UNetLayout.of_model(pipe.unet)
    kohya, _ = write_kohya(adapter, layout, work / "small_kohya.safetensors", spelling)
    header = build_header("diffusers", {"unet": {"modules": {}, "layout": layout.to_dict()}}, None)
    model_names = {c: {file_name(c, n): n for n in adaptable(m, c)} for c, m in models.items()}
    peft_adapter = {c: {model_names[c][n]: module for n, module in modules.items()} for c, modules in adapter.items()}
    files = {
        "diffusers": write_adapter(adapter, work / "small_diffusers.safetensors", "diffusers", header, torch.float32),
        "peft": write_adapter(peft_adapter, work / "small_peft", "peft", header, torch.float32),  # model's own names
        "kohya": kohya,
    }

    def score(parts: dict[str, nn.Module], extra: dict) -> dict:
        scorer = Scorer(adapter, total)
        for component, model in parts.items():
            for name, module in model.named_modules():
                if isinstance(module, LoraLayer):
                    name = file_name(component, name.removeprefix("base_model.model."))
                    scorer.add(component, name, module.get_delta_weight(module.active_adapters[0]))
        return scorer.result(**extra)

    model_note = "SDXL block structure (sdxl_unet.json) at block_out_channels 32/64/128, CLIP 12 + 32 layers width 32"
    rows = {}
    for fmt in ("diffusers", "kohya"):
        fresh = StableDiffusionXLPipeline.from_pretrained(folder)
        fresh.load_lora_weights(str(files[fmt]))
        rows["diffusers" if fmt == "diffusers" else "diffusers_kohya_file"] = score(
            {c: getattr(fresh, c) for c in COMPONENTS}, {"file": f"lora2 {fmt} file", "model": model_note}
        )
    fresh = StableDiffusionXLPipeline.from_pretrained(folder)
    parts = {c: PeftModel.from_pretrained(getattr(fresh, c), files["peft"] / c) for c in COMPONENTS}
    rows["peft"] = score(parts, {"file": "lora2 peft folders", "model": model_note})
    return rows


# ---------------------------------------------------------------- main


def sources(folder: Path) -> dict:
    manifest = folder / "SOURCE.json"
    return json.loads(manifest.read_text()) if manifest.is_file() else {"note": f"no SOURCE.json in {folder}"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd-scripts", type=Path, required=True, help="sd-scripts folder (networks/, library/)")
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI folder (comfy/lora.py, comfy/utils.py)")
    parser.add_argument("--a1111", type=Path, required=True, help="stable-diffusion-webui folder")
    parser.add_argument("--configs", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "configs")
    parser.add_argument("--spelling", choices=("sgm", "diffusers"), default="sgm", help="UNet names of the kohya file")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "loaders.json")
    return parser.parse_args()


def run_stages(args: argparse.Namespace, work: Path) -> tuple[dict, dict]:
    """Every loader on the full SDXL adapter (and diffusers/peft at reduced width); returns (rows, adapter)."""
    from diffusers import UNet2DConditionModel

    unet_module, lora = load_sd_scripts(args.sd_scripts)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads((args.configs / "sdxl_unet.json").read_text()))
        sgm = unet_module.SdxlUNet2DConditionModel()
        te1, te2 = clip_models(args.configs)
    models = dict(zip(COMPONENTS, (unet, te1, te2)))
    adapter = make_adapter({c: {file_name(c, n): s for n, s in adaptable(m, c).items()} for c, m in models.items()})
    total = sum(len(m) for m in adapter.values())
    tables = {"UNET_MAP_ATTENTIONS", "TRANSFORMER_BLOCKS", "UNET_MAP_RESNET", "UNET_MAP_BASIC", "unet_to_diffusers"}
    inverse = sgm_to_diffusers(run_definitions(args.comfyui / "comfy" / "utils.py", tables, {})["unet_to_diffusers"])
    te2_config = json.loads((args.configs / "sdxl_text_encoder_2.json").read_text())
    path, _ = write_kohya(adapter, UNetLayout.of_model(unet), work / "lora_kohya.safetensors", args.spelling)
    stages = {
        "comfyui": lambda: comfyui(args.comfyui, sgm, te1, te2, path, Scorer(adapter, total)),
        "a1111": lambda: a1111(args.a1111, sgm, te1, te2_config, path, Scorer(adapter, total), inverse),
        "sd_scripts_merge": lambda: sd_scripts_merge(
            args.sd_scripts, lora, unet_module, args.configs, path, Scorer(adapter, total), inverse
        ),
        "sd_scripts_resume": lambda: sd_scripts_resume(
            lora, unet_module, args.configs, path, Scorer(adapter, total), inverse
        ),
    }
    if args.spelling == "sgm":
        stages = {"diffusers, peft": lambda: pip_loaders(args.configs, args.spelling, work)} | stages
    rows = {}
    for name, stage in stages.items():
        start = time.perf_counter()
        if name == "diffusers, peft":
            rows.update(stage())
        else:
            rows[name] = stage() | {"file": f"lora2 kohya file ({args.spelling} UNet names)", "model": FULL_MODEL}
        gc.collect()
        logger.warning("%s: %.0f s", name, time.perf_counter() - start)
    return rows, adapter


FULL_MODEL = "full SDXL (sdxl_unet.json, sdxl_text_encoder*.json) on the meta device"


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory() as tmp:
        rows, adapter = run_stages(args, Path(tmp))
    ranks = collections.Counter(m.rank for mods in adapter.values() for m in mods.values())
    result = {
        "loaders": rows,
        "adapter": {
            "modules": sum(len(m) for m in adapter.values()),
            "by_component": {c: len(m) for c, m in adapter.items()},
            "ranks": [min(ranks), max(ranks)],
            "kohya_unet_spelling": args.spelling,
        },
        "sources": {
            "sd-scripts": sources(args.sd_scripts),
            "ComfyUI": sources(args.comfyui),
            "stable-diffusion-webui": sources(args.a1111),
        },
        "command": "PYTHONPATH=src python benchmarks/loaders.py " + " ".join(sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in rows.items():
        print(f"{name:22s} mapped {row['mapped']:5d} / {row['total']}  max_rel_err {row['max_rel_err']}")


if __name__ == "__main__":
    main()
