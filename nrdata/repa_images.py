"""The REPA encoder's input view of an image: one resize, used where the view is stored and where it is made per step.

A REPA target of a latent of h x w cells is the frozen encoder's features of its source pixels
resized to k pixels per latent cell (k = the encoder's patch size / the model's patch size, so the
encoder yields one feature per token). `nr encode --repa-pixels k` stores that view as uint8 beside
each latent (`repa_view`), so training reads it from the memory-mapped shards instead of decoding
the source JPEG at every step; `nrtrain.repa` resizes with the same `resize_pixels` when it is given
other pixels. torch is imported only when an image is resized.
"""

from __future__ import annotations

import numpy as np


def resize_pixels(pixels, size_hw: tuple[int, int]):
    """float [n, 3, H, W] in [0, 1] (a torch tensor) resized to size_hw: bicubic, antialiased, clamped to [0, 1].

    Returned as is when it already has that size."""
    import torch.nn.functional as F

    if tuple(pixels.shape[2:]) == tuple(size_hw):
        return pixels
    # bicubic overshoots near edges; the encoder was trained on images inside [0, 1]
    return F.interpolate(pixels, size=tuple(size_hw), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)


def repa_views(pixels: np.ndarray, latent_hw: tuple[int, int], k: int) -> np.ndarray:
    """uint8 [n, h*k, w*k, 3] of same-shape uint8 images [n, H, W, 3] whose latents are h x w: the
    stored REPA views, rounded to the nearest uint8 (within 0.5/255 of the float view)."""
    import torch

    size = (latent_hw[0] * k, latent_hw[1] * k)
    if pixels.shape[1:3] == size:
        return np.ascontiguousarray(pixels)
    floats = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255
    resized = resize_pixels(floats, size)
    return resized.mul_(255).round_().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()
