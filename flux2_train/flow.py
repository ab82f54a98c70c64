"""Rectified-flow training target of FLUX.2: noise levels, noisy inputs, velocity target, loss weights."""

from __future__ import annotations

import math

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

# FLUX.2's empirical shift: mu grows linearly with the packed image token count
# (diffusers' `compute_empirical_mu` for long schedules). At 1024x1024 (4096
# tokens) mu is about 1.15, i.e. a shift of about 3.2; at 512x512 about 1.7.
_MU_SLOPE, _MU_INTERCEPT = 0.00016927, 0.45666666
_SIGMA_MIN = 1e-3  # the smallest sigma the FLUX.2 scheduler visits


def flux2_mu(image_tokens: int) -> float:
    return _MU_SLOPE * image_tokens + _MU_INTERCEPT


def shift_sigmas(u: torch.Tensor, shift: str, image_tokens: int) -> torch.Tensor:
    """Apply 'auto' (resolution-dependent), 'none', or a fixed shift factor to sigmas in (0, 1)."""
    if shift == "none":
        return u
    factor = math.exp(flux2_mu(image_tokens)) if shift == "auto" else float(shift)
    return factor * u / (1 + (factor - 1) * u)


def sample_sigmas(
    batch_size: int,
    *,
    sampling: str,
    shift: str,
    image_tokens: int,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Noise levels for one batch, drawn on the CPU so the sequence is the same on every device."""
    u = compute_density_for_timestep_sampling(
        weighting_scheme=sampling,
        batch_size=batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        generator=generator,
    )
    return shift_sigmas(u, shift, image_tokens).clamp(_SIGMA_MIN, 1.0)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) * x_0 + sigma * noise."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the model predicts: d x_t / d sigma = noise - x_0."""
    return noise - latents


def flow_loss(pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, weighting: str = "none") -> torch.Tensor:
    """Mean squared velocity error in float32, optionally weighted per sample by sigma."""
    w = compute_loss_weighting_for_sd3(weighting, sigmas.float()).view(-1, *([1] * (pred.ndim - 1)))
    err = (pred.float() - target.float()) ** 2
    return (w.to(err.device) * err).reshape(pred.shape[0], -1).mean(dim=1).mean()
