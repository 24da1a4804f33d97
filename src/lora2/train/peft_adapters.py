"""peft DoRA and AdaLoRA adapters for ``lora2 train`` (``adapter_type``): the baselines of the benchmark.

DoRA (Liu et al. 2024, peft ``LoraConfig(use_dora=True)``): W' = m ⊙ (W + s·BA) / ‖W + s·BA‖_c, a rank-r LoRA pair
plus one magnitude m per output feature.

AdaLoRA (Zhang et al. 2023, peft ``AdaLoraConfig``): ΔW = P Λ Q · α / r in SVD form (peft: ``lora_B`` = P,
``lora_E`` = diag Λ, ``lora_A`` = Q). After every optimizer step ``update_and_allocate`` scores each triplet
(P_i, λ_i, Q_i) and, on a cubic budget schedule from ``init_r`` to ``target_r`` per layer on average, sets the λ_i
of the least important triplets to zero (the rank mask, ``peft_config.rank_pattern``). Its orthogonal regularization

    R(P, Q) = mean over the adapted matrices of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F

is added to the loss with weight ``orth_reg_weight`` (peft adds it only to a transformers-style ``outputs.loss``).

The adapters are injected in place (peft's tuner classes), so the UNet keeps its module names and the trainer's
loop, optimizer and checkpoints see plain parameters. Outputs: the peft folder (``adapter_config.json`` +
``adapter_model.safetensors``, for ``PeftModel.from_pretrained``) and a diffusers file for
``pipe.load_lora_weights``: DoRA's pair (scale baked into ``lora_B``) with its magnitude vectors; AdaLoRA converted
exactly to a plain LoRA of each layer's final rank (down = (Q ⊙ λ)[kept], up = P[:, kept] · α / r).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import AdaLoraConfig, LoraConfig, get_peft_model_state_dict
from peft.tuners.adalora import AdaLoraLayer, AdaLoraModel
from peft.tuners.lora import LoraLayer, LoraModel
from torch import nn

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
# ranknum + 1e-5 is AdaLoRA's divisor (peft SVDLinear.forward)
_ADALORA_EPS = 1e-5


def peft_config(config) -> LoraConfig | AdaLoraConfig:
    """The peft config of a TrainConfig whose ``adapter_type`` is "dora" or "adalora" (see its docstring)."""
    alpha = config.lora_alpha if config.lora_alpha is not None else config.init_rank  # None: scale 1
    common = {
        "target_modules": list(config.target_modules),
        "lora_dropout": config.lora_dropout,
        "exclude_modules": list(config.exclude_modules) or None,
    }
    if config.adapter_type == "dora":
        pattern = dict(config.rank_pattern)
        return LoraConfig(
            r=config.init_rank,
            lora_alpha=alpha,
            use_dora=True,
            rank_pattern=pattern,
            alpha_pattern=dict(pattern) if config.lora_alpha is None else {},
            **common,
        )
    if config.adapter_type == "adalora":
        tinit, tfinal = adalora_schedule(config)
        return AdaLoraConfig(
            init_r=config.init_rank,
            target_r=int(config.target_rank),
            lora_alpha=alpha,
            total_step=config.max_train_steps,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=config.adalora_delta_t,
            orth_reg_weight=config.orth_reg_weight,
            **common,
        )
    raise ValueError(f"adapter_type {config.adapter_type!r} is not a peft adapter (dora or adalora)")


def adalora_schedule(config) -> tuple[int, int]:
    """(tinit, tfinal) in steps: the fractions ``adalora_tinit`` / ``adalora_tfinal`` of ``max_train_steps``."""
    steps = config.max_train_steps
    return round(config.adalora_tinit * steps), round(config.adalora_tfinal * steps)


def inject_peft(model: nn.Module, config) -> LoraModel:
    """Inject the DoRA / AdaLoRA adapter into ``model`` in place; returns peft's tuner (``AdaLoraModel`` for
    AdaLoRA, whose ``update_and_allocate`` the loop calls). Adapter parameters are kept in fp32 for training."""
    settings = peft_config(config)
    tuner_cls = AdaLoraModel if isinstance(settings, AdaLoraConfig) else LoraModel
    tuner = tuner_cls(model, settings, ADAPTER_NAME)
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    logger.info("%s adapter on %d modules", config.adapter_type, len(list(peft_layers(model))))
    return tuner


def peft_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(module name as before injection, peft layer) of every adapted module."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def has_peft_adapter(model: nn.Module) -> bool:
    """Whether ``inject_peft`` adapted ``model``: peft's tuner records its config on the model, so this needs no
    walk over the modules (it runs every training step, also for LoRA² models)."""
    return ADAPTER_NAME in (getattr(model, "peft_config", None) or {})


def adapter_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor of the model (``lora_A``/``lora_B``/``lora_E``/magnitudes, AdaLoRA's ``ranknum``),
    keyed by parameter name: what a checkpoint stores (empty for a model without peft adapter)."""
    if not has_peft_adapter(model):
        return {}
    return {name: param for name, param in model.named_parameters() if ".lora_" in name or ".ranknum." in name}


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [param for param in adapter_parameters(model).values() if param.requires_grad]


def rank_mask(model: nn.Module, name: str, layer: LoraLayer) -> torch.Tensor:
    """AdaLoRA: the kept triplets of a layer, (r,) bool (all kept before the first budget allocation)."""
    pattern = model.peft_config[ADAPTER_NAME].rank_pattern or {}
    # peft keys it "<module>.lora_E.default", and without the adapter name once the state dict has been saved
    mask = pattern.get(f"{name}.lora_E.{ADAPTER_NAME}", pattern.get(f"{name}.lora_E"))
    r = layer.r[ADAPTER_NAME]
    return torch.ones(r, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).view(-1)


def peft_ranks(model: nn.Module) -> dict[str, int]:
    """Rank per module: r for DoRA; for AdaLoRA the triplets its budget allocation kept."""
    ranks = {}
    for name, layer in peft_layers(model):
        if isinstance(layer, AdaLoraLayer):
            ranks[name] = int(rank_mask(model, name, layer).sum())
        else:
            ranks[name] = layer.r[ADAPTER_NAME]
    return ranks


def peft_parameter_count(model: nn.Module) -> int:
    """Adapter size: DoRA Σ r·(d_in·k² + d_out) + d_out; AdaLoRA Σ r_kept·(d_in·k² + d_out + 1)."""
    total = 0
    for name, layer in peft_layers(model):
        a, b = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
        a = a if isinstance(a, torch.Tensor) else a.weight  # AdaLoRA: Parameters; DoRA/LoRA: nn.Linear/Conv2d
        b = b if isinstance(b, torch.Tensor) else b.weight
        r = a.shape[0]
        per_rank = a[0].numel() + b.shape[0]  # d_in·k² + d_out
        if isinstance(layer, AdaLoraLayer):
            total += int(rank_mask(model, name, layer).sum()) * (per_rank + 1)
        else:
            total += r * per_rank + sum(m.weight.numel() for m in layer.lora_magnitude_vector.values())
    return total


def orthogonal_regularization(model: nn.Module) -> torch.Tensor:
    """AdaLoRA's R(P, Q): mean of ‖QQᵀ − I‖_F (``lora_A``) and ‖PᵀP − I‖_F (``lora_B``) over the adapted layers,
    as ``peft.tuners.adalora.AdaLoraModel.forward`` computes it."""
    terms = []
    for _, layer in peft_layers(model):
        q, p = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]  # (r, d_in·k²), (d_out, r)
        for gram in (q @ q.T, p.T @ p):  # (r, r) each
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            terms.append(torch.linalg.matrix_norm(gram - eye))
    return torch.stack(terms).mean()


@torch.no_grad()
def plain_lora_modules(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """AdaLoRA as plain LoRA pairs (down, up) of each layer's final rank, computing exactly the same ΔW:
    down = (Q ⊙ λ)[kept] (k, d_in[, kh, kw]), up = P[:, kept] · α / (r + 1e-5) (d_out, k[, 1, 1]).
    Layers whose triplets were all pruned have no update and are left out."""
    pairs = {}
    for name, layer in peft_layers(model):
        keep = rank_mask(model, name, layer).to(layer.lora_A[ADAPTER_NAME].device)
        if not keep.any():
            continue
        q, lam, p = (getattr(layer, key)[ADAPTER_NAME].float() for key in ("lora_A", "lora_E", "lora_B"))
        scale = layer.scaling[ADAPTER_NAME] / (float(layer.ranknum[ADAPTER_NAME]) + _ADALORA_EPS)
        down = (q * lam)[keep]  # (k, d_in·kh·kw)
        up = p[:, keep] * scale  # (d_out, k)
        weight = layer.get_base_layer().weight
        if weight.dim() == 4:
            down = down.reshape(down.shape[0], *weight.shape[1:])  # (k, d_in, kh, kw)
            up = up[:, :, None, None]  # (d_out, k, 1, 1)
        pairs[name] = (down.cpu().contiguous(), up.cpu().contiguous())
    return pairs


@torch.no_grad()
def dora_diffusers_state_dict(model: nn.Module, prefix: str = "unet") -> dict[str, torch.Tensor]:
    """DoRA as a diffusers file (``pipe.load_lora_weights`` builds a ``use_dora`` LoraConfig from the magnitude
    keys): ``<prefix>.<module>.lora_A.weight``, ``lora_B.weight`` with the scale s baked in (s·BA = (sB)A, so DoRA's
    column norm is unchanged) and ``lora_magnitude_vector``."""
    scales = {name: layer.scaling[ADAPTER_NAME] for name, layer in peft_layers(model)}
    tensors = {}
    for key, value in get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME).items():
        if key.endswith(".lora_B.weight"):
            value = value.float() * scales[key[: -len(".lora_B.weight")]]
        tensors[f"{prefix}.{key}"] = value.float().cpu().contiguous()
    return tensors


@torch.no_grad()
def peft_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The adapter as ``PeftModel.save_pretrained`` writes it: keys ``base_model.model.<module>.<tensor>`` without
    the adapter name; for AdaLoRA the kept triplets only (P[:, kept], λ[kept], Q[kept]) and the rank pattern
    ``{"<module>.lora_E": [kept, ...]}`` that ``PeftModel.from_pretrained`` resizes the layers with (None for DoRA)."""
    prefix = "base_model.model."
    if not isinstance(model.peft_config[ADAPTER_NAME], AdaLoraConfig):
        state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
        return {prefix + key: value.float().cpu().contiguous() for key, value in state.items()}, None
    state, pattern = {}, {}
    for name, layer in peft_layers(model):
        keep = rank_mask(model, name, layer)
        kept = keep.to(layer.lora_A[ADAPTER_NAME].device)
        state[f"{prefix}{name}.lora_A"] = layer.lora_A[ADAPTER_NAME][kept]  # (k, d_in·k²)
        state[f"{prefix}{name}.lora_E"] = layer.lora_E[ADAPTER_NAME][kept]  # (k, 1)
        state[f"{prefix}{name}.lora_B"] = layer.lora_B[ADAPTER_NAME][:, kept]  # (d_out, k)
        pattern[f"{name}.lora_E"] = keep.tolist()
    return {key: value.float().cpu().contiguous() for key, value in state.items()}, pattern


def save_peft_folder(model: nn.Module, folder: Path, base_model: str | None = None) -> Path:
    """peft's own format (``PeftModel.from_pretrained(unet, folder)`` loads it), written atomically:
    ``adapter_config.json`` + ``adapter_model.safetensors`` (``peft_state_dict``)."""
    from lora2.train.checkpoint import atomic_save_file

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    state, pattern = peft_state_dict(model)
    atomic_save_file(state, tmp / "adapter_model.safetensors", {"format": "pt"})
    settings = copy.deepcopy(model.peft_config[ADAPTER_NAME])
    settings.inference_mode = True
    settings.base_model_name_or_path = base_model
    if pattern is not None:
        settings.rank_pattern = pattern
    settings.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder
