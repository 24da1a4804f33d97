"""Pure rank math of LoRA² (no modules, no state)."""

from lora2.rank.math import (
    discretized_exponential,
    effective_rank,
    effective_rank_tensor,
    importance,
    nu_for_rank,
    nu_target,
)

__all__ = [
    "discretized_exponential",
    "effective_rank",
    "effective_rank_tensor",
    "importance",
    "nu_for_rank",
    "nu_target",
]
