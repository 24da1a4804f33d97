"""The diffusion training objective: noised inputs, the target, and the per-sample loss (min-SNR optional)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr


def noised_inputs(
    latents: torch.Tensor, noise_scheduler, noise_offset: float, generator: torch.Generator, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, timesteps, target) of one batch: ε ~ N(0, I) (plus the offset noise of Guttenberg 2023 when
    ``noise_offset`` > 0), t ~ U{0, T−1}; the target is ε, or v = α_t ε − σ_t x₀ for v-prediction."""
    noise = torch.randn(latents.shape, generator=generator)  # (B, C, h, w)
    if noise_offset:
        noise += noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=generator)
    noise = noise.to(device)
    num_timesteps = noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator).to(device)  # (B,)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)  # (B, C, h, w)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return noisy, timesteps, noise_scheduler.get_velocity(latents, noise, timesteps)
    return noisy, timesteps, noise


def diffusion_loss(
    prediction: torch.Tensor,
    target: torch.Tensor,
    timesteps: torch.Tensor,
    noise_scheduler,
    snr_gamma: float | None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample MSE (B,), optionally with min-SNR-γ weighting (Hang et al. 2023: w = min(SNR, γ)/SNR, or /(SNR+1)
    for v-prediction). ``mask`` (B, 1, h, w) weighs each latent position before the mean (kohya's masked loss: not
    renormalised by the mask's area)."""
    error = F.mse_loss(prediction.float(), target.float(), reduction="none")  # (B, C, h, w)
    if mask is not None:
        error = error * mask
    mse = error.mean(dim=tuple(range(1, target.dim())))  # (B,)
    if snr_gamma is None:
        return mse  # (B,)
    snr = compute_snr(noise_scheduler, timesteps)  # (B,)
    weight = torch.clamp(snr, max=snr_gamma)
    if noise_scheduler.config.prediction_type == "v_prediction":
        return mse * weight / (snr + 1)
    return mse * weight / snr
