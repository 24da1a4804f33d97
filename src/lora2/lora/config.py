"""Configuration of LoRA² adapters (names follow peft's LoraConfig where the idea is the same)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from lora2.rank.math import SCALINGS, nu_target

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
# λ_e of the trainer's entropy term where it is unset: 1e-4, the value of both third-party reimplementations
# (docs/LORA2_METHOD.md); docs/DESIGN.md "Defaults and their evidence" says why the weight prior stays off
LORA2_ENTROPY_WEIGHT = 1e-4
_LEGACY_KEYS = ("entropy_weight",)


@dataclass
class LoRA2Config:
    """How to adapt a model with LoRA² (or, with ``adaptive=False``, with fixed-rank LoRA).

    target_modules: module names matched like peft: a list matches a module whose name equals an entry or ends
        with ``"." + entry``; a single string is a regular expression that must match the whole name.
    init_rank: rank D at initialisation (the fixed rank when ``adaptive=False``).
    max_rank: largest rank any component may grow to.
    quantile: q of the effective rank D = ⌈−ln(1−q)/ν⌉.
    adaptive: learn ν (LoRA²); False gives plain LoRA of rank ``init_rank`` through the same layer (Λ = I).
    lambda_scaling: normalisation of Λ: "first" (λ_1 = 1, default), "sum" (AWNN), "none" (the paper's f).
    lora_alpha: LoRA scale s = lora_alpha / init_rank; None means s = 1.
    chunk_size: storage grows and shrinks in multiples of this many rank positions.
    target_rank: r_target of the rank regularization (ν_target = −ln(1−q)/r_target).
    rank_reg_weight: λ_r, weight of Σ_ℓ |ν_ℓ − ν_target|.
    weight_reg_weight: λ_w, weight of the Gaussian prior Σθ²/2 on the active LoRA weights; 0 (off) by default,
        see docs/DESIGN.md "Defaults and their evidence".
    rank_pattern: per-module initial (or fixed) rank, keyed like peft: a regex matched against the end of the
        module name.
    lora_dropout: dropout on the adapter input.
    exclude_modules: names (same matching as a target list) never adapted.
    """

    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    init_rank: int = 8
    max_rank: int = 512
    quantile: float = 0.9
    adaptive: bool = True
    lambda_scaling: str = "first"
    lora_alpha: float | None = None
    chunk_size: int = 8
    target_rank: float = 64.0
    rank_reg_weight: float = 1e-4
    weight_reg_weight: float = 0.0
    rank_pattern: dict[str, int] = field(default_factory=dict)
    lora_dropout: float = 0.0
    exclude_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, tuple):
            self.target_modules = list(self.target_modules)
        if not self.target_modules:
            raise ValueError("target_modules must name at least one module, got an empty value")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile q must lie in (0, 1), got {self.quantile!r}")
        if self.max_rank < 1:
            raise ValueError(f"max_rank must be >= 1, got {self.max_rank!r}")
        for name, rank in {"init_rank": self.init_rank, **self.rank_pattern}.items():
            if not 1 <= rank <= self.max_rank:
                raise ValueError(f"rank for {name!r} must lie in [1, max_rank={self.max_rank}], got {rank!r}")
        if self.lambda_scaling not in SCALINGS:
            raise ValueError(f"lambda_scaling must be one of {SCALINGS}, got {self.lambda_scaling!r}")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size!r}")
        if not self.target_rank > 0:
            raise ValueError(f"target_rank must be > 0, got {self.target_rank!r}")
        for key in ("rank_reg_weight", "weight_reg_weight"):
            if not getattr(self, key) >= 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")

    @property
    def nu_target(self) -> float:
        """ν_target of the rank regularization."""
        return nu_target(self.target_rank, self.quantile)

    @property
    def scaling(self) -> float:
        """LoRA scale s."""
        return 1.0 if self.lora_alpha is None else self.lora_alpha / self.init_rank

    def rank_for(self, module_name: str) -> int:
        """Initial rank of one module: the first ``rank_pattern`` entry that matches, else ``init_rank``."""
        for pattern, rank in self.rank_pattern.items():
            if re.search(rf"(^|\.){pattern}$", module_name):
                return rank
        return self.init_rank

    def is_target(self, module_name: str) -> bool:
        """Whether a module name is adapted (peft's matching rules)."""
        if _matches(self.exclude_modules, module_name):
            return False
        return _matches(self.target_modules, module_name)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LoRA2Config:
        """Build from a mapping of field names (as ``to_dict`` writes it, e.g. in a file's lora2 header)."""
        # entropy_weight (λ_e) is a term of the trainer's loss (TrainConfig); headers written before it moved hold it
        data = {key: value for key, value in data.items() if key not in _LEGACY_KEYS}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown LoRA2Config keys: {unknown}")
        return cls(**data)


def _matches(targets: list[str] | str, module_name: str) -> bool:
    if not targets:
        return False
    if isinstance(targets, str):
        return re.fullmatch(targets, module_name) is not None
    return any(module_name == t or module_name.endswith("." + t) for t in targets)
