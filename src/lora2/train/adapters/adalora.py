"""AdaLoRA (Zhang et al. 2023, peft ``AdaLoraConfig``) as a baseline of ``lora2 train``.

ΔW = P Λ Q · α / r in SVD form (peft: ``lora_B`` = P, ``lora_E`` = diag Λ, ``lora_A`` = Q). After every optimizer
step ``update_and_allocate`` scores each triplet (P_i, λ_i, Q_i) and, on a cubic budget schedule from ``init_r`` to
``target_r`` per layer on average, sets the λ_i of the least important triplets to zero (the rank mask,
``peft_config.rank_pattern``). Its orthogonal regularization

    R(P, Q) = mean over the adapted matrices of ‖QQᵀ − I‖_F and ‖PᵀP − I‖_F

is added to the loss with weight ``orth_reg_weight`` (peft adds it only to a transformers-style ``outputs.loss``).
Settings: ``AdaLoraConfig(init_r=init_rank, target_r=target_rank, lora_alpha=lora_alpha or init_rank (α/r = 1),
total_step=max_train_steps, tinit=round(adalora_tinit · max_train_steps), tfinal=round(adalora_tfinal ·
max_train_steps), deltaT=adalora_delta_t, orth_reg_weight, target_modules, exclude_modules, lora_dropout)``.
Files: the peft folder holds the kept triplets; the diffusers and kohya files hold the exactly equivalent plain LoRA of
each layer's final rank. Runs cannot resume: AdaLoRA's importance statistics are not checkpointed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import AdaLoraConfig
from peft.tuners.adalora import AdaLoraLayer, AdaLoraModel

from lora2.export.adapter import LoraModule
from lora2.export.formats import write_adapter
from lora2.export.metadata import build_header
from lora2.export.names import to_file_name
from lora2.export.sgm import UNetLayout
from lora2.train.adapters.peft import ADAPTER_NAME, PEFT_PREFIX, PeftBackend, peft_layers
from lora2.train.atomic import temporary_name

# ranknum + 1e-5 is AdaLoRA's divisor (peft SVDLinear.forward)
_ADALORA_EPS = 1e-5


def adalora_schedule(config) -> tuple[int, int]:
    """(tinit, tfinal) in steps: the fractions ``adalora_tinit`` / ``adalora_tfinal`` of ``max_train_steps``."""
    steps = config.max_train_steps
    return round(config.adalora_tinit * steps), round(config.adalora_tfinal * steps)


class AdaLoRABackend(PeftBackend):
    name = "adalora"
    label = "AdaLoRA"
    resumable = False
    tuner_class = AdaLoraModel
    card_description = "peft's AdaLoRA (the `peft/` folder loads with `PeftModel.from_pretrained`)."

    @classmethod
    def check_config(cls, config) -> None:
        lora = config.lora
        if lora.rank_pattern:
            raise ValueError(f"rank_pattern is not supported with adapter_type 'adalora', got {lora.rank_pattern}")
        if config.ema_decay:
            raise ValueError(
                f"ema_decay {config.ema_decay} is not supported with adapter_type 'adalora' (its budget allocation "
                "zeroes singular values that an average would bring back)"
            )
        if lora.target_rank != int(lora.target_rank) or not 1 <= lora.target_rank <= lora.init_rank:
            raise ValueError(
                f"adapter_type 'adalora' needs an integer target_rank in [1, init_rank={lora.init_rank}] "
                f"(the mean final rank), got {lora.target_rank!r}"
            )
        tinit, tfinal = adalora_schedule(config)
        if tinit >= config.max_train_steps - tfinal:
            raise ValueError(
                f"AdaLoRA schedule leaves no pruning phase: tinit {tinit} >= max_train_steps "
                f"{config.max_train_steps} - tfinal {tfinal}; lower adalora_tinit / adalora_tfinal"
            )
        super().check_config(config)

    @classmethod
    def peft_config(cls, config) -> AdaLoraConfig:
        tinit, tfinal = adalora_schedule(config)
        return AdaLoraConfig(
            init_r=config.lora.init_rank,
            target_r=int(config.lora.target_rank),
            lora_alpha=cls.alpha(config),
            total_step=config.max_train_steps,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=config.adalora_delta_t,
            orth_reg_weight=config.orth_reg_weight,
            **cls.common_settings(config),
        )

    def regularization(self) -> torch.Tensor:
        """orth_reg_weight · R(P, Q), as ``peft.tuners.adalora.AdaLoraModel.forward`` computes R."""
        if self.config.orth_reg_weight == 0:
            return torch.zeros((), device=self.device)
        terms = []
        for _, layer in peft_layers(self.unet):
            q, p = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]  # (r, d_in·k²), (d_out, r)
            for gram in (q @ q.T, p.T @ p):  # (r, r) each
                eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        return self.config.orth_reg_weight * torch.stack(terms).mean()

    def after_step(self, optimizer: torch.optim.Optimizer, step: int) -> None:
        self.tuner.update_and_allocate(step)  # scores use the gradients: before zero_grad

    def rank_mask(self, name: str, layer: AdaLoraLayer) -> torch.Tensor:
        """The kept triplets of a layer, (r,) bool (all kept before the first budget allocation)."""
        pattern = self.unet.peft_config[ADAPTER_NAME].rank_pattern or {}
        # peft keys it "<module>.lora_E.default", and without the adapter name once the state dict has been saved
        mask = pattern.get(f"{name}.lora_E.{ADAPTER_NAME}", pattern.get(f"{name}.lora_E"))
        r = layer.r[ADAPTER_NAME]
        return torch.ones(r, dtype=torch.bool) if mask is None else torch.as_tensor(mask, dtype=torch.bool).view(-1)

    def layer_ranks(self) -> dict[str, int]:
        """The triplets its budget allocation kept."""
        return {name: int(self.rank_mask(name, layer).sum()) for name, layer in peft_layers(self.unet)}

    def parameter_count(self) -> int:
        """Σ r_kept·(d_in·k² + d_out + 1)."""
        total = 0
        for name, layer in peft_layers(self.unet):
            q, p = layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
            total += int(self.rank_mask(name, layer).sum()) * (q[0].numel() + p.shape[0] + 1)
        return total

    @torch.no_grad()
    def plain_lora_modules(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """AdaLoRA as plain LoRA pairs (down, up) of each layer's final rank, computing exactly the same ΔW:
        down = (Q ⊙ λ)[kept] (k, d_in[, kh, kw]), up = P[:, kept] · α / (r + 1e-5) (d_out, k[, 1, 1]).
        Layers whose triplets were all pruned have no update and are left out."""
        pairs = {}
        for name, layer in peft_layers(self.unet):
            keep = self.rank_mask(name, layer).to(layer.lora_A[ADAPTER_NAME].device)
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
    def peft_state_dict(self) -> tuple[dict[str, torch.Tensor], dict | None]:
        """The kept triplets only (P[:, kept], λ[kept], Q[kept]) and the rank pattern ``{"<module>.lora_E": [kept,
        ...]}`` that ``PeftModel.from_pretrained`` resizes the layers with."""
        state, pattern = {}, {}
        for name, layer in peft_layers(self.unet):
            keep = self.rank_mask(name, layer)
            kept = keep.to(layer.lora_A[ADAPTER_NAME].device)
            state[f"{PEFT_PREFIX}{name}.lora_A"] = layer.lora_A[ADAPTER_NAME][kept]  # (k, d_in·k²)
            state[f"{PEFT_PREFIX}{name}.lora_E"] = layer.lora_E[ADAPTER_NAME][kept]  # (k, 1)
            state[f"{PEFT_PREFIX}{name}.lora_B"] = layer.lora_B[ADAPTER_NAME][:, kept]  # (d_out, k)
            pattern[f"{name}.lora_E"] = keep.tolist()
        return {key: value.float().cpu().contiguous() for key, value in state.items()}, pattern

    def write_file(self, fmt: str, path: Path, metadata: dict) -> bool:
        if fmt not in ("diffusers", "kohya"):
            return False
        pairs = self.plain_lora_modules()
        modules = {to_file_name(self.unet, "unet", n): LoraModule(down, up) for n, (down, up) in pairs.items()}
        infos = {name: {"rank": module.rank} for name, module in modules.items()}
        layout = UNetLayout.of_model(self.unet)  # kohya files name the UNet as kohya's trainer for it does
        described = {"modules": infos, **({"layout": layout.to_dict()} if layout is not None else {})}
        header = build_header(fmt, {"unet": described}, metadata)  # no LoRA2Config: plain LoRA
        tmp = temporary_name(path)
        write_adapter({"unet": modules}, tmp, fmt, header, torch.float32, layout)
        os.replace(tmp, path)
        return True
