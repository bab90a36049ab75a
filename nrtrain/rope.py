"""2D rotary position embedding for packed images, as NiT applies it, and its extrapolation modes.

Layout (NiT, FiT): each head's channels split in two halves, the first rotated by the token's
coordinate on axis 0, the second by its coordinate on axis 1. Within a half the channels form
interleaved pairs (0,1), (2,3), ..., pair j turning at frequency theta^(-2j/(head_dim/2)).
Rotation runs in fp32 and the result is cast back to the input dtype.

Angles are computed for every pack from the tokens' positions, so any image size works (NiT caches
positions 0..1023 only).

Grids (which coordinates a token gets):
  rowcol  (row, col) of the token: the natural choice for models trained here.
  nit     NiT's released mapping, needed to load NiT checkpoints. NiT builds its grid with
          meshgrid(arange(h), arange(w), indexing="xy"), which gives token k = row*w + col the
          coordinates (k % h, k // h); for square images that is (col, row), for others it is the
          position in a w×h raster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_GRIDS = ("rowcol", "nit")
EXTRAPOLATION_MODES = ("none", "linear", "dynntk", "yarn")

# YaRN's band edges in rotations over the training length (FiT and YaRN use beta_fast=32, beta_slow=1)
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


@dataclass(frozen=True)
class RopeExtrapolation:
    """How RoPE stretches for images larger than the training size (sampling only).

    The scale of an image is s = max(1, size / train_size): images no larger than the training
    size on an axis are left exactly as trained. Modes:
      none    plain RoPE: positions past the training size get angles the model never saw.
      linear  position interpolation: every frequency divided by s, squeezing positions into the trained range.
      dynntk  NTK-aware: base theta raised to theta * s^(d/(d-2)), high frequencies kept and low ones stretched.
      yarn    YaRN: high-frequency pairs extrapolate, low-frequency pairs interpolate (ramp between), and
              cos/sin are multiplied by 0.1 ln(s) + 1 (so attention logits by its square).
    decouple: each axis uses its own scale (s_0 = h / train_h, s_1 = w / train_w); without it both axes
              use the larger of the two, FiT's default.
    """

    mode: str = "none"
    train_size: tuple[int, int] | None = None  # (h, w) in tokens: the largest size trained on each axis
    decouple: bool = False

    def __post_init__(self):
        if self.mode not in EXTRAPOLATION_MODES:
            raise ValueError(f"unknown RoPE extrapolation mode {self.mode!r}; choose one of {EXTRAPOLATION_MODES}")
        if self.mode != "none":
            if self.train_size is None or len(self.train_size) != 2 or min(self.train_size) < 1:
                raise ValueError(f"RoPE extrapolation {self.mode!r} needs train_size=(h, w) in tokens, "
                                 f"got {self.train_size!r}")


def rope_coordinates(positions: torch.Tensor, sizes: torch.Tensor, image_ids: torch.Tensor, grid: str) -> torch.Tensor:
    """[T, 2] coordinates each token is rotated by, from its (row, col) and its image's (h, w)."""
    if grid == "rowcol":
        return positions
    if grid == "nit":
        token_sizes = sizes[image_ids]
        k = positions[:, 0] * token_sizes[:, 1] + positions[:, 1]
        h = token_sizes[:, 0]
        return torch.stack([k % h, k // h], dim=1)
    raise ValueError(f"unknown RoPE grid {grid!r}; choose one of {ROPE_GRIDS}")


def base_inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[head_dim/4] inverse frequencies of one axis: theta^(-2j/(head_dim/2))."""
    axis_dim = head_dim // 2
    return 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float32, device=device) / axis_dim)


def rope_cos_sin(coords: torch.Tensor, sizes: torch.Tensor, image_ids: torch.Tensor, head_dim: int, *,
                 theta: float = 10000.0,
                 extrapolation: RopeExtrapolation | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each [T, head_dim] fp32, for tokens at `coords` [T, 2] of images of `sizes` [B, 2]."""
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4 (two axes of channel pairs), got {head_dim}")
    extrapolation = extrapolation or RopeExtrapolation()
    inverse = base_inverse_frequencies(head_dim, theta, coords.device)
    if extrapolation.mode == "none":
        angles = coords.to(torch.float32)[:, :, None] * inverse  # [T, 2, head_dim/4]
        magnitude = None
    else:
        scale = image_scales(sizes, extrapolation)  # [B, 2]
        per_image = stretched_inverse_frequencies(inverse, scale, head_dim, theta, extrapolation)  # [B, 2, head_dim/4]
        angles = coords.to(torch.float32)[:, :, None] * per_image[image_ids]
        magnitude = yarn_magnitude(scale)[image_ids, None] if extrapolation.mode == "yarn" else None
    angles = angles.repeat_interleave(2, dim=-1).flatten(1)  # interleaved pairs share an angle
    cos, sin = angles.cos(), angles.sin()
    if magnitude is not None:
        cos, sin = cos * magnitude, sin * magnitude
    return cos, sin


def image_scales(sizes: torch.Tensor, extrapolation: RopeExtrapolation) -> torch.Tensor:
    """[B, 2] per-axis stretch factor s >= 1 of each image."""
    train = torch.tensor(extrapolation.train_size, dtype=torch.float32, device=sizes.device)
    scale = (sizes.to(torch.float32) / train).clamp_min(1.0)
    if not extrapolation.decouple:
        scale = scale.amax(dim=1, keepdim=True).expand(-1, 2)
    return scale


def stretched_inverse_frequencies(inverse: torch.Tensor, scale: torch.Tensor, head_dim: int, theta: float,
                                  extrapolation: RopeExtrapolation) -> torch.Tensor:
    """[B, 2, head_dim/4] inverse frequencies of each image and axis under the extrapolation mode."""
    axis_dim = head_dim // 2
    s = scale[:, :, None]
    if extrapolation.mode == "linear":
        return inverse / s
    if extrapolation.mode == "dynntk":
        exponents = torch.arange(0, axis_dim, 2, dtype=torch.float32, device=inverse.device) / axis_dim
        log_base = math.log(theta) + torch.log(s) * (axis_dim / (axis_dim - 2))
        return torch.exp(-log_base * exponents)
    if extrapolation.mode == "yarn":
        keep = torch.stack([yarn_extrapolation_weights(axis_dim, theta, length, inverse.device)
                            for length in extrapolation.train_size])  # [2, head_dim/4]
        return (inverse / s) * (1 - keep) + inverse * keep
    raise ValueError(f"no frequency stretch for mode {extrapolation.mode!r}")


def yarn_extrapolation_weights(axis_dim: int, theta: float, train_length: int, device=None) -> torch.Tensor:
    """[axis_dim/2] weight of the unscaled frequency per pair: 1 for pairs that turn many times over the
    training length (kept), 0 for pairs that turn about once or less (interpolated), a ramp between."""
    def pair_index(rotations: float) -> float:
        return axis_dim * math.log(train_length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(pair_index(YARN_BETA_FAST)), 0)
    high = min(math.ceil(pair_index(YARN_BETA_SLOW)), axis_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(axis_dim // 2, dtype=torch.float32, device=device) - low) / (high - low)).clamp(0, 1)
    return 1 - ramp


def yarn_magnitude(scale: torch.Tensor) -> torch.Tensor:
    """[B] YaRN's cos/sin multiplier 0.1 ln(s) + 1 from each image's larger scale."""
    s = scale.amax(dim=1)
    return torch.where(s <= 1, torch.ones_like(s), 0.1 * torch.log(s) + 1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) → (-x1, x0, -x3, x2, ...): a quarter turn of each interleaved pair."""
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, head_dim] by per-token angles (cos, sin [T, head_dim]) in fp32; returns x's dtype."""
    xf = x.float()
    cos, sin = cos[:, None, :], sin[:, None, :]
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
