"""The linear interpolant path between data and noise, and how its time t is drawn.

Convention (NiT's, and the one every function here uses): t = 1 is pure noise, t = 0 is data.

    x_t = (1 - t) x + t eps,        v = dx_t/dt = eps - x

The model predicts v. One t per image; tokens take their image's t through `PackedBatch.image_ids`.
"""

from __future__ import annotations

import torch

T_SAMPLING = ("logit-normal", "uniform")


def per_token(values: torch.Tensor, image_ids: torch.Tensor) -> torch.Tensor:
    """[B] per-image values → [T, 1], each token holding its image's value (broadcasts over channels)."""
    return values[image_ids].unsqueeze(-1)


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """x_t = (1 - t) x + t noise, for t broadcastable to x (a [T, 1] `per_token` column or a float)."""
    return (1 - t) * x + t * noise


def velocity_target(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The regression target v = noise - x (constant in t for the linear path)."""
    return noise - x


def score_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
    """∇ log p_t(x_t) from the velocity, for the linear path.

    With E[x | x_t] and E[noise | x_t] tied by x_t = (1-t) E[x] + t E[noise] and v = E[noise] - E[x],
    E[noise | x_t] = x_t + (1-t) v, and the Gaussian-noise score is -E[noise | x_t] / t. Undefined at
    t = 0, which is why the SDE sampler ends with a deterministic step.
    """
    return -((1 - t) * v + x_t) / t


def sample_t(num_images: int, generator: torch.Generator, kind: str = "logit-normal", mean: float = 0.0,
             std: float = 1.0) -> torch.Tensor:
    """One training time per image, [B] float32 on the generator's device.

    "logit-normal" is NiT's: sigma = exp(N(mean, std)), t = sigma / (1 + sigma), which is
    sigmoid(N(mean, std)); with mean 0 the median t is 0.5 and mass is pulled away from both ends.
    "uniform" is U[0, 1). `mean` and `std` apply to "logit-normal" only.
    """
    if kind == "logit-normal":
        if std <= 0:
            raise ValueError(f"logit-normal t needs std > 0, got {std}")
        normal = torch.randn(num_images, generator=generator, device=generator.device)
        return torch.sigmoid(normal * std + mean)
    if kind == "uniform":
        return torch.rand(num_images, generator=generator, device=generator.device)
    raise ValueError(f"unknown t sampling {kind!r}; choose one of {', '.join(T_SAMPLING)}")


def shift_t(t: torch.Tensor, shift: float | None) -> torch.Tensor:
    """Timestep shift t' = s t / (1 + (s - 1) t), in the t = 1-noise convention (SD3's form).

    It keeps 0 → 0 and 1 → 1 and is monotone; s > 1 moves every t towards noise, so a uniform grid
    spends more steps at high noise, which large images need because their signal survives more noise.
    s = 1 (or None) is the identity.

    LightningDiT writes the same map in its own convention (t = 0 noise) with s = 0.3; in ours that is
    s = 1 / 0.3 ≈ 3.33: their u' = 0.3 u / (1 - 0.7 u) with u = 1 - t equals 1 - shift_t(t, 1 / 0.3).
    """
    if shift is None or shift == 1:
        return t
    if shift <= 0:
        raise ValueError(f"timestep shift must be > 0, got {shift}")
    return t / (t + (1 - t) / shift)  # the same map, written so that 0 and 1 come out exact
