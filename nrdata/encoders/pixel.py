"""The weight-free, lossless pixel encoder: space-to-depth of the uint8 image.

A factor-f pixel "latent" of an H×W image is [3·f², H/f, W/f], channel order (c, dy, dx), so a
pixel-space transformer with patch size p sees the same tokens as one with patch f·p on the image.
Nothing is lost: decode gives back the exact pixels.
"""

from __future__ import annotations

import numpy as np

from nrdata.catalog.manifest import EncoderInfo


class PixelEncoder:
    dtype = "uint8"
    weights_id = ""  # nothing to hash: the name and factor in `info` say all it does

    def __init__(self, factor: int = 1) -> None:
        if factor < 1:
            raise ValueError(f"pixel encoder factor must be >= 1, got {factor}")
        self.factor = factor
        self.info = EncoderInfo(name="pixel", source="", revision=None, factor=factor, channels=3 * factor * factor,
                                quantity="mode", scaling_factor=None)

    def encode(self, images: np.ndarray) -> np.ndarray:
        n, h, w, c = images.shape
        f = self.factor
        if images.dtype != np.uint8 or c != 3 or h % f or w % f:
            raise ValueError(f"pixel encoder needs uint8 [N, H, W, 3] with H, W multiples of {f}, got "
                             f"{images.dtype} {images.shape}")
        blocks = images.reshape(n, h // f, f, w // f, f, c)
        return np.ascontiguousarray(blocks.transpose(0, 5, 2, 4, 1, 3).reshape(n, c * f * f, h // f, w // f))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        n, channels, hl, wl = latents.shape
        f = self.factor
        blocks = latents.reshape(n, 3, f, f, hl, wl)
        return np.ascontiguousarray(blocks.transpose(0, 4, 2, 5, 3, 1).reshape(n, hl * f, wl * f, 3))
