"""The LoRA² layer: ΔW = s · B Λ A with a rank D learned through ν (LoRA², AWNN).

Storage (``lora_A``: capacity × d_in, ``lora_B``: d_out × capacity) is a multiple of ``chunk_size`` rank
positions just above the current rank D, so parameters, gradients and optimizer state follow D rather than
``max_rank``. Only the first D positions take part in the forward pass.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lora2.lora.config import LoRA2Config
from lora2.rank.math import effective_rank, importance, nu_for_rank


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def scaled_importance(log_nu: torch.Tensor, rank: int, config: LoRA2Config) -> torch.Tensor:
    """s·λ_1..λ_D: the diagonal of s·Λ (LoRA² Λ under ``config.lambda_scaling``; ones for fixed-rank LoRA). (D,)"""
    if not config.adaptive:
        return torch.full((rank,), config.scaling, device=log_nu.device, dtype=log_nu.dtype)
    return importance(log_nu.exp(), rank, config.lambda_scaling) * config.scaling  # (D,)


def bake_up(lora_b: torch.Tensor, scaled_lambda: torch.Tensor) -> torch.Tensor:
    """up = s · B Λ over the active positions: the plain-LoRA ``up`` of ΔW = up @ A (scale 1).

    ``lora_b``: (d_out, D[, 1, 1]); ``scaled_lambda``: (D,). The inverse is ``unbake_up``.
    """
    return lora_b * scaled_lambda.view((1, -1) + (1,) * (lora_b.dim() - 2))  # (d_out, D[, 1, 1])


def unbake_up(up: torch.Tensor, scaled_lambda: torch.Tensor) -> torch.Tensor:
    """B = up / (s·Λ): the LoRA² ``B`` whose ``bake_up`` is ``up`` (exact up to one rounding)."""
    return up / scaled_lambda.view((1, -1) + (1,) * (up.dim() - 2))  # (d_out, D[, 1, 1])


class LoRA2Layer(nn.Module):
    """Wraps a frozen ``nn.Linear`` or ``nn.Conv2d`` and adds the adaptive-rank update ΔW = s · B Λ A."""

    def __init__(self, base_layer: nn.Module, config: LoRA2Config, rank: int, name: str = "") -> None:
        super().__init__()
        if isinstance(base_layer, nn.Conv2d) and base_layer.groups != 1:
            raise ValueError(f"module {name!r}: grouped Conv2d (groups={base_layer.groups}) is not supported")
        if not isinstance(base_layer, (nn.Linear, nn.Conv2d)):
            raise ValueError(f"module {name!r}: only nn.Linear and nn.Conv2d can be adapted, got {type(base_layer)}")
        if isinstance(base_layer, nn.Conv2d) and base_layer.padding_mode != "zeros":
            raise ValueError(f"module {name!r}: Conv2d padding_mode={base_layer.padding_mode!r} is not supported")
        self.base_layer = base_layer
        self.config = config
        self.name = name
        self.adaptive = config.adaptive
        self.scaling = config.scaling
        self.merged = False
        self.disable_adapters = False
        self.dropout = nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
        self.r = rank
        # spare storage kept beyond D on (re-)allocation, as a fraction of D: capacity only costs memory and FLOPs
        # (positions beyond D are masked), and a CUDA-graph fast path re-captures on every re-allocation
        self.headroom = 0.0
        capacity = self._capacity_for(rank)
        weight = base_layer.weight
        self.lora_A = nn.Parameter(self._new_a_rows(capacity, weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self._b_shape(capacity), device=weight.device))
        # ν in log space: Adam moves log ν by about lr per step, so ranks travel multiplicatively (docs/DESIGN.md)
        log_nu = math.log(nu_for_rank(rank, config.quantile))
        self.log_nu = nn.Parameter(torch.tensor(log_nu, device=weight.device), requires_grad=self.adaptive)
        # s·λ over the whole storage, set for all layers at once by the model-level pre-forward hook that
        # inject() installs (cache_importance); valid while ν is unchanged (its version) and D is too. Otherwise the
        # layer computes its own. Kept after the forward so that gradient checkpointing recomputes with the same
        # tensors. Only this class writes it.
        self.storage_lambda: torch.Tensor | None = None
        self.storage_lambda_version = -1
        self._layouts: dict = {}

    # ------------------------------------------------------------------ shapes and initialisation
    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_channels if self.is_conv else self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels if self.is_conv else self.base_layer.out_features

    @property
    def capacity(self) -> int:
        return self.lora_A.shape[0]

    def _a_shape(self, rows: int) -> tuple[int, ...]:
        if self.is_conv:
            return (rows, self.in_features, *self.base_layer.kernel_size)
        return (rows, self.in_features)

    def _b_shape(self, cols: int) -> tuple[int, ...]:
        return (self.out_features, cols, 1, 1) if self.is_conv else (self.out_features, cols)

    def _capacity_for(self, rank: int) -> int:
        # fixed-rank LoRA never grows: it holds exactly its rank, like peft
        if not self.adaptive:
            return rank
        return min(_round_up(math.ceil(rank * (1.0 + self.headroom)), self.config.chunk_size), self.config.max_rank)

    def _new_a_rows(self, rows: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        # peft's default: kaiming_uniform(a=√5) on lora_A, i.e. U(−1/√fan_in, 1/√fan_in)
        fan_in = math.prod(self._a_shape(1)[1:])
        bound = 1.0 / math.sqrt(fan_in)
        rows = torch.empty(self._a_shape(rows)).uniform_(-bound, bound, generator=generator)
        return rows.to(device)

    def _growth_generator(self, start: int, stop: int) -> torch.Generator:
        """RNG for rows that appear when D grows: a function of (module, positions) only, so every DDP process
        and every resumed run draws the same rows without sharing RNG state."""
        seed = zlib.crc32(f"{self.name}:{start}:{stop}".encode())
        return torch.Generator().manual_seed(seed)

    # ------------------------------------------------------------------ rank
    @property
    def nu(self) -> torch.Tensor:
        return self.log_nu.exp()

    def importance(self) -> torch.Tensor:
        """λ_1..λ_D, the diagonal of Λ (ones for fixed-rank LoRA, the ν → 0 limit of "first" scaling)."""
        if not self.adaptive:
            return torch.ones(self.r, device=self.lora_A.device)
        return importance(self.nu, self.r, self.config.lambda_scaling)  # (D,)

    def cache_importance(self, storage_lambda: torch.Tensor) -> None:
        """Keep s·λ over the whole storage computed for all layers at once (valid until ν or D changes)."""
        self.storage_lambda = storage_lambda
        self.storage_lambda_version = self.log_nu._version

    def forget_importance(self) -> None:
        """Drop the cached s·λ (ν moved: fused optimizers update it without bumping its version)."""
        self.storage_lambda = None

    def target_rank_from_nu(self) -> int:
        """The effective rank D that ν currently implies (the fixed rank for fixed-rank LoRA)."""
        if not self.adaptive:
            return self.r
        return effective_rank(self.nu.item(), self.config.quantile, self.config.max_rank)

    @torch.no_grad()
    def set_rank(self, rank: int) -> tuple[dict[str, tuple[nn.Parameter, nn.Parameter]], range]:
        """Set D. Returns the parameters replaced by re-allocation (name → (old, new)) and the new positions.

        New positions get fresh A rows and zero B columns so that the function does not jump; positions
        beyond D are dropped from the forward pass (trailing positions, the least important ones).
        Storage grows to the next multiple of ``chunk_size`` and shrinks only when two chunks are spare.
        """
        if not 1 <= rank <= self.config.max_rank:
            raise ValueError(f"module {self.name!r}: rank must lie in [1, {self.config.max_rank}], got {rank}")
        old_rank, self.r = self.r, rank
        self.forget_importance()
        needed = self._capacity_for(rank)
        replaced = {}
        if rank > self.capacity or needed <= self.capacity - 2 * self.config.chunk_size:
            replaced = self._reallocate(needed)
        grown = range(old_rank, rank) if rank > old_rank else range(0)
        if grown:
            generator = self._growth_generator(grown.start, grown.stop)
            self.lora_A[grown.start : grown.stop] = self._new_a_rows(len(grown), self.lora_A.device, generator)
            self.lora_B[:, grown.start : grown.stop] = 0.0
        return replaced, grown

    @torch.no_grad()
    def load_storage(
        self, lora_a: torch.Tensor, lora_b: torch.Tensor, log_nu: torch.Tensor, rank: int
    ) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Take a saved storage as it is (checkpoint resume): A, B at their saved capacity, log ν copied in place
        (optimizers keep tracking that parameter), D set. Returns the replaced parameters (name → (old, new))."""
        if not 1 <= rank <= lora_a.shape[0]:
            raise ValueError(f"module {self.name!r}: rank {rank} does not fit the saved storage {tuple(lora_a.shape)}")
        if lora_a.shape != self._a_shape(lora_a.shape[0]) or lora_b.shape != self._b_shape(lora_a.shape[0]):
            raise ValueError(
                f"module {self.name!r}: saved lora_A {tuple(lora_a.shape)} / lora_B {tuple(lora_b.shape)} do not fit "
                f"{type(self.base_layer).__name__} {tuple(self.base_layer.weight.shape)}"
            )
        old_a, old_b = self.lora_A, self.lora_B
        self.lora_A = nn.Parameter(lora_a.to(old_a.device, old_a.dtype).clone(), requires_grad=old_a.requires_grad)
        self.lora_B = nn.Parameter(lora_b.to(old_b.device, old_b.dtype).clone(), requires_grad=old_b.requires_grad)
        self.log_nu.copy_(log_nu.to(self.log_nu.device))
        self.r = rank
        self.forget_importance()
        return {"lora_A": (old_a, self.lora_A), "lora_B": (old_b, self.lora_B)}

    @torch.no_grad()
    def reserve(self, spare: int) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        """Re-allocate to ``capacity_for(D)`` when fewer than ``spare`` positions beyond D are free (adaptive layers
        below ``max_rank``). D, ΔW and the values of every kept position are unchanged. Returns the replaced
        parameters (name → (old, new)), empty when nothing moved."""
        needed = self._capacity_for(self.r)
        if not self.adaptive or self.capacity - self.r >= spare or needed <= self.capacity:
            return {}
        self.forget_importance()
        return self._reallocate(needed)

    def _reallocate(self, capacity: int) -> dict[str, tuple[nn.Parameter, nn.Parameter]]:
        keep = min(capacity, self.capacity)
        new_a = torch.zeros(self._a_shape(capacity), device=self.lora_A.device)
        new_a[:keep] = self.lora_A[:keep]
        new_b = torch.zeros(self._b_shape(capacity), device=self.lora_B.device)
        new_b[:, :keep] = self.lora_B[:, :keep]
        old_a, old_b = self.lora_A, self.lora_B
        self.lora_A = nn.Parameter(new_a, requires_grad=old_a.requires_grad)
        self.lora_B = nn.Parameter(new_b, requires_grad=old_b.requires_grad)
        return {"lora_A": (old_a, self.lora_A), "lora_B": (old_b, self.lora_B)}

    # ------------------------------------------------------------------ weights
    def scaled_importance(self) -> torch.Tensor:
        """s·λ_1..λ_D (D,)."""
        return scaled_importance(self.log_nu, self.r, self.config)

    def _scaled_a(self) -> torch.Tensor:
        """s · Λ A over the active positions (D rows)."""
        lam = self.scaled_importance()  # (D,)
        return self.lora_A[: self.r] * lam.view((-1,) + (1,) * (self.lora_A.dim() - 1))  # (D, d_in[, kh, kw])

    def active_b(self) -> torch.Tensor:
        return self.lora_B[:, : self.r]  # (d_out, D[, 1, 1])

    def _forward_a(self) -> torch.Tensor:
        """s · Λ A over the whole storage, zero rows beyond D: the forward never slices A or B.

        At batch 1 an SDXL step is bound by kernel launches, not FLOPs: slicing costs zero-filled gradients in
        the backward, and a per-layer Λ costs a dozen launches; the model-level hook computes Λ for all layers
        in a few kernels (``storage_importance``). Fixed-rank storage is exactly r: plain LoRA.
        """
        if not self.adaptive:
            return self.lora_A if self.scaling == 1.0 else self.lora_A * self.scaling
        lam = self.storage_lambda
        if lam is None or self.storage_lambda_version != self.log_nu._version:
            lam = storage_importance([self], self._layouts)[0]
        return self.lora_A * lam.view((-1,) + (1,) * (self.lora_A.dim() - 1))  # (capacity, d_in[, kh, kw])

    def get_delta_weight(self) -> torch.Tensor:
        """ΔW = s · B Λ A, shaped like the base weight (fp32)."""
        a, b = self._scaled_a(), self.active_b()
        if self.is_conv:
            return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)  # (d_out, d_in, kh, kw)
        return b @ a  # (d_out, d_in)

    def export_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up) = (A, s · B Λ) truncated to D: a plain LoRA pair with scale 1 that gives the same ΔW."""
        with torch.no_grad():
            up = bake_up(self.active_b(), self.scaled_importance())  # (d_out, D[, 1, 1])
            return self.lora_A[: self.r].detach().clone(), up.detach().clone()

    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight (in the base weight's dtype)."""
        if self.merged:
            return
        weight = self.base_layer.weight
        weight += self.get_delta_weight().to(weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again."""
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight -= self.get_delta_weight().to(weight.dtype)
        self.merged = False

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged or self.disable_adapters:
            return result
        result_dtype = result.dtype
        a = self._forward_a()  # (capacity, d_in[, kh, kw])
        b = self.lora_B  # (d_out, capacity[, 1, 1])
        x = self.dropout(x)
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(a.dtype)
        if self.is_conv:
            conv = self.base_layer
            hidden = F.conv2d(x, a, None, conv.stride, conv.padding, conv.dilation)  # (N, capacity, H', W')
            update = F.conv2d(hidden, b)  # (N, d_out, H', W')
        else:
            update = F.linear(F.linear(x, a), b)  # (..., d_out)
        return (result + update).to(result_dtype)

    def extra_repr(self) -> str:
        mode = "adaptive" if self.adaptive else "fixed"
        return f"name={self.name!r}, r={self.r}, capacity={self.capacity}, {mode}"


@dataclass
class _Layout:
    """Ragged layout of the storage positions of several layers: one segment per layer."""

    segment: torch.Tensor  # (N,) layer index of each position
    neg_positions: torch.Tensor  # (N,) −(i−1) within the layer
    active: torch.Tensor  # (N,) 1.0 where i ≤ D, else 0.0; updated in place when only ranks change
    scale: torch.Tensor | None  # (N,) s per position, None when every s is 1
    capacities: list[int]
    ranks: tuple[int, ...]


def _active(capacities: Sequence[int], ranks: Sequence[int]) -> torch.Tensor:
    """1.0 on the first D positions of each layer's storage, 0.0 beyond (N,), on the CPU."""
    return torch.cat([(torch.arange(c) < r).float() for c, r in zip(capacities, ranks)])


def _layout(layers: Sequence[LoRA2Layer], cache: dict) -> _Layout:
    # keyed by storage only: a rank change within the storage rewrites ``active`` in place, so a captured CUDA graph
    # (which reads that buffer) stays valid until some storage is re-allocated
    key = tuple((id(layer), layer.capacity) for layer in layers)
    ranks = tuple(layer.r for layer in layers)
    layout = cache.get(key)
    if layout is None:
        cache.clear()
        device = layers[0].lora_A.device
        capacities = [layer.capacity for layer in layers]
        positions = torch.cat([torch.arange(c) for c in capacities])  # (N,)
        segment = torch.cat([torch.full((c,), i) for i, c in enumerate(capacities)])  # (N,)
        scales = torch.tensor([layer.scaling for layer in layers])[segment]  # (N,)
        layout = cache[key] = _Layout(
            segment=segment.to(device),
            neg_positions=(-positions).float().to(device),
            active=_active(capacities, ranks).to(device),
            scale=None if bool((scales == 1.0).all()) else scales.float().to(device),
            capacities=capacities,
            ranks=ranks,
        )
    elif layout.ranks != ranks:
        layout.active.copy_(_active(layout.capacities, ranks))
        layout.ranks = ranks
    return layout


def storage_importance(
    layers: Sequence[LoRA2Layer], cache: dict, nu: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """s · λ_i(ν) over every storage position of each adaptive layer, 0 beyond its D, in one graph for all layers.

    The values on the first D positions are those of ``lora2.rank.importance(ν, D, scaling) · s`` (Λ of LoRA²,
    f(i; ν) = e^{−ν(i−1)}(1 − e^{−ν})), computed with ~10 kernels for any number of layers. All layers must share
    one ``lambda_scaling``. ``cache`` keeps the position layout between calls.
    """
    scaling = layers[0].config.lambda_scaling
    assert all(layer.config.lambda_scaling == scaling and layer.adaptive for layer in layers)
    layout = _layout(layers, cache)
    if nu is None:
        nu = torch.stack([layer.log_nu for layer in layers]).float().exp()  # (L,)
    lam = torch.exp(layout.neg_positions * nu[layout.segment]) * layout.active  # (N,), e^{−ν(i−1)} for i ≤ D
    if scaling == "sum":
        totals = torch.zeros_like(nu).index_add(0, layout.segment, lam)  # (L,) Σ_{j≤D} e^{−ν(j−1)}
        lam = lam / totals[layout.segment]
    elif scaling == "none":
        lam = lam * (-torch.expm1(-nu))[layout.segment]
    if layout.scale is not None:
        lam = lam * layout.scale
    return list(lam.split(layout.capacities))
