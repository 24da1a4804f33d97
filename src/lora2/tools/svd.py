"""Exact SVD of a low-rank update without forming ΔW: ΔW = U diag(S) Vh from QR factors of up and down."""

from __future__ import annotations

import torch

from lora2.export.adapter import LoraModule


def lowrank_svd(module: LoraModule) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of ΔW = scale · up @ down (flattened to d_out × d_in·k²) in float64.

    With up = Q_u R_u and downᵀ = Q_d R_d (reduced QR), ΔW = Q_u (R_u R_dᵀ) Q_dᵀ, so the SVD of the small
    matrix M = R_u R_dᵀ = U_m S V_mᵀ gives ΔW = (Q_u U_m) S (Q_d V_m)ᵀ at the cost of an r × r SVD.

    Returns:
        U (d_out, k), S (k,) descending, Vh (k, d_in·k²), k = min(r, d_out, d_in·k²).
    """
    up, down = module.factors(torch.float64)  # (d_out, r), (r, d_in')
    q_up, r_up = torch.linalg.qr(up)  # (d_out, a), (a, r)
    q_down, r_down = torch.linalg.qr(down.T)  # (d_in', b), (b, r)
    u_m, s, vh_m = torch.linalg.svd(r_up @ r_down.T, full_matrices=False)  # (a, k), (k,), (k, b)
    return q_up @ u_m, s, vh_m @ q_down.T  # (d_out, k), (k,), (k, d_in')


def truncate(module: LoraModule, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> LoraModule:
    """The best rank-``rank`` approximation (Eckart–Young) as a LoRA pair: up = U_k diag(S_k), down = Vh_k."""
    up = u[:, :rank] * s[:rank]  # (d_out, rank)
    return LoraModule.from_factors(up, vh[:rank], module, module.down.dtype)
