"""The interface every encoder implements (DC-AE, SD-VAE, VA-VAE, pixel)."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from nrdata.catalog.manifest import EncoderInfo


class Encoder(Protocol):
    """Turns a batch of same-size RGB images into the latents a catalog stores.

    `encode` takes uint8 [N, H, W, 3] (H and W multiples of `factor`) and returns [N, C', H/f, W/f]
    in `dtype`, where C' is `info.stored_channels`. `decode` inverts it back to uint8 images.
    """

    info: EncoderInfo
    dtype: str  # the catalog dtype its latents are stored in
    weights_id: str  # content hash of its weights and architecture ("" when weight-free): its identity

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def decode(self, latents: np.ndarray) -> np.ndarray: ...
