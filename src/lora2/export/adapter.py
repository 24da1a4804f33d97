"""Format-free representation of a LoRA adapter file: components → modules → (down, up, scale).

Every reader turns a file into an ``Adapter`` and every writer turns an ``Adapter`` into a file, so the tools
(inspect, merge, resize) and ``load_lora`` never look at key names. One module's update is

    ΔW = scale · up @ down          (linear: up d_out×r, down r×d_in)
    ΔW = scale · up[:, :, 0, 0] ⊗ down  (conv: down r×d_in×kh×kw, up d_out×r×1×1)

which is what diffusers/peft (scale = lora_alpha / r) and kohya (scale = alpha / r) compute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora2.export.sgm import UNetLayout

# Component names as diffusers prefixes them; kohya prefixes are in keys.KOHYA_PREFIXES.
Adapter = dict[str, dict[str, "LoraModule"]]
# dtypes of the weights lora2 reads and writes (fp8 and integer tensors are refused with a clear error)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class LoraModule:
    """One low-rank update ΔW = scale · up @ down (conv: a kh×kw ``down`` followed by a 1×1 ``up``)."""

    down: torch.Tensor  # (r, d_in[, kh, kw])
    up: torch.Tensor  # (d_out, r[, 1, 1])
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def is_conv(self) -> bool:
        return self.down.dim() == 4

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def in_features(self) -> int:
        """d_in·kh·kw: the width of the flattened ``down``."""
        return self.down[0].numel()

    def parameter_count(self) -> int:
        return self.down.numel() + self.up.numel()

    def factors(self, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
        """(U, V) with ΔW (flattened to d_out × d_in·kh·kw) = U @ V, the scale folded into U."""
        up = self.up.reshape(self.out_features, self.rank).to(dtype) * self.scale  # (d_out, r)
        down = self.down.reshape(self.rank, -1).to(dtype)  # (r, d_in·kh·kw)
        return up, down

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """ΔW shaped like the base weight: (d_out, d_in) or (d_out, d_in, kh, kw)."""
        up, down = self.factors(dtype)
        return (up @ down).reshape(self.out_features, *self.down.shape[1:])

    def baked(self) -> LoraModule:
        """The same update with scale 1 (the scale multiplied into ``up``)."""
        if self.scale == 1.0:
            return self
        return LoraModule(self.down, (self.up.double() * self.scale).to(self.up.dtype), 1.0)

    @classmethod
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, like: LoraModule, dtype: torch.dtype) -> LoraModule:
        """Rebuild a module of ``like``'s kind (linear/conv) from flat factors U (d_out×r), V (r×d_in·k²)."""
        rank = down.shape[0]
        down_shape = (rank, *like.down.shape[1:])
        up_shape = (like.out_features, rank) + ((1, 1) if like.is_conv else ())
        return cls(down.reshape(down_shape).to(dtype).contiguous(), up.reshape(up_shape).to(dtype).contiguous())


def check_shapes(module: LoraModule, where: str) -> None:
    """Raise ValueError when down/up do not form a LoRA pair of rank >= 1 in a float dtype (no data is read)."""
    down, up = module.down, module.up
    if down.dim() not in (2, 4):
        raise ValueError(f"{where}: down weight must be 2-D (linear) or 4-D (conv), got shape {tuple(down.shape)}")
    if up.dim() != down.dim():
        raise ValueError(f"{where}: up {tuple(up.shape)} and down {tuple(down.shape)} have different dimensions")
    if up.shape[1] != down.shape[0]:
        raise ValueError(f"{where}: rank mismatch, down {tuple(down.shape)} vs up {tuple(up.shape)}")
    if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
        raise ValueError(f"{where}: conv up weight must be 1x1, got shape {tuple(up.shape)}")
    if 0 in down.shape or 0 in up.shape:
        raise ValueError(
            f"{where}: empty weights (rank 0 or a zero dimension): down {tuple(down.shape)}, up {tuple(up.shape)}"
        )
    if down.dtype not in FLOAT_DTYPES or up.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{where}: weights must be fp16, bf16, fp32 or fp64, got {down.dtype} / {up.dtype}")


def check_module(module: LoraModule, where: str) -> None:
    """``check_shapes``, finite weights and a finite scale; ``where`` names file and module."""
    check_shapes(module, where)
    down, up = module.down, module.up
    if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
        raise ValueError(f"{where}: weights contain NaN or Inf")
    if not math.isfinite(module.scale):
        raise ValueError(f"{where}: scale (alpha / rank) {module.scale!r} is not finite")
    # |ΔW_ij| ≤ |scale| · r · max|up| · max|down|: a bound past fp32's range gives Inf/NaN images when applied
    bound = abs(module.scale) * module.rank * float(up.abs().max()) * float(down.abs().max())
    if not bound < torch.finfo(torch.float32).max:
        raise ValueError(f"{where}: weights too large (|ΔW| may reach {bound:.3g}, beyond float32)")


@dataclass
class AdapterFile:
    """An adapter read from disk.

    format: "diffusers", "kohya", "peft" or "lora2" (native, see ``lora2.export.native``).
    lora2: the parsed ``lora2`` header entry (``None`` for files written by other tools).
    raw: native files only: component → module → (A, B, log_nu), the unbaked LoRA² state.
    magnitudes: DoRA files only: component → module → magnitude vector m (d_out,).
    layout: the UNet's layout (``lora2.export.sgm``) from the lora2 header, or inferred from SGM names of a kohya
        file; decides the spelling of kohya files written from this adapter. None when unknown.
    """

    path: Path
    format: str
    adapter: Adapter
    lora2: dict | None = None
    raw: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] | None = None
    header: dict[str, str] = field(default_factory=dict)
    magnitudes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    layout: UNetLayout | None = None

    def ranks(self) -> dict[str, dict[str, int]]:
        return {comp: {name: m.rank for name, m in modules.items()} for comp, modules in self.adapter.items()}
