"""From stored bytes to the normalised tokens a model trains on.

A catalog stores latents in its own dtype (bfloat16 as raw 16-bit words) and quantity: the mode of
the posterior, a sample, or its moments (mean then log-variance). Training draws a latent from the
moments, z = mean + exp(logvar / 2) * eps, and normalises every latent with the per-channel
statistics of the manifest, `z_norm = (z - mean) / std`; for moments these are statistics of the
mean.

When a run reads several catalogs (NiT's merge of native, 256 and 512 variants), one model has to
see one latent space, and the sampler has to map it back with one set of numbers: the statistics
of all catalogs are pooled, weighted by how many latent pixels each was taken over.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numba import njit

from nrdata.catalog import Catalog, Normalization
from nrdata.catalog.stats import ChannelStats

# diffusers' DiagonalGaussianDistribution clamps the log-variance the same way: a corrupt or
# extreme value must not turn one latent into inf.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


class NormalizationNotReadyError(ValueError):
    """A catalog's manifest has no per-channel statistics to normalise with."""


def catalog_normalization(catalog: Catalog) -> Normalization:
    """The manifest's statistics, or a NormalizationNotReadyError that says how to get them."""
    manifest = catalog.manifest
    norm = manifest.normalization
    channels = manifest.encoder.channels
    if not norm.ready or norm.count <= 0:
        raise NormalizationNotReadyError(
            f"{catalog.root}: the manifest has no normalisation statistics (mean/std per channel), so its latents "
            "cannot be normalised. The encode that wrote it did not finish; re-run the same `nr encode` command on "
            "this output: it skips the committed rows and writes the statistics when it closes the catalog"
        )
    if len(norm.mean) != channels:
        raise NormalizationNotReadyError(
            f"{catalog.root}: the manifest's normalisation has {len(norm.mean)} channels but the encoder has "
            f"{channels}; the manifest was edited or written by another tool: re-encode the catalog"
        )
    if min(norm.std) <= 0:
        raise NormalizationNotReadyError(
            f"{catalog.root}: channel {int(np.argmin(norm.std))} has std {min(norm.std)}; a constant channel "
            "cannot be normalised (is the catalog a handful of identical latents?)"
        )
    return norm


def pooled_normalization(catalogs: Sequence[Catalog]) -> Normalization:
    """One set of statistics for the latents of every catalog (count-weighted, exact)."""
    if not catalogs:
        raise ValueError("no catalogs given")
    channels = {c.manifest.encoder.channels for c in catalogs}
    if len(channels) != 1:
        raise ValueError(f"the catalogs hold latents of {sorted(channels)} channels; one model reads one kind")
    norms = [catalog_normalization(c) for c in catalogs]
    if len(norms) == 1:
        return norms[0]
    pooled = ChannelStats.empty(channels.pop())
    for norm in norms:
        std = np.asarray(norm.std, np.float64)
        pooled = pooled.merge(ChannelStats(norm.count, np.asarray(norm.mean, np.float64), std**2 * norm.count))
    return Normalization(mean=tuple(pooled.mean.tolist()), std=tuple(pooled.std.tolist()), count=pooled.count)


def stored_to_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored latent bytes (any shape, as uint8) as float32 values; bfloat16 words become floats."""
    if dtype == "bfloat16":
        return np.left_shift(stored.view(np.uint16), 16, dtype=np.uint32).view(np.float32)
    return stored.view(dtype).astype(np.float32, copy=False)


@njit(cache=True, nogil=True)
def write_tokens(src, src_start, channels, moments, noise, noise_start, heights, widths, patch, token_start,
                 mean, std, tokens):
    """Normalise and patchify latents into their rows of `tokens` (flat [T * channels * patch²]), in one pass.

    Latent j is `src[src_start[j]:]` laid out [C', h*p, w*p] (C' = 2 * channels for moments, mean
    first, then z = mean + exp(logvar / 2) * noise[noise_start[j]:] laid out [C, h*p, w*p]); it
    fills rows token_start[j] .. + h*w, token k = row * w + col, each token a (C, p, p) block.
    Normalising multiplies by 1 / std (within an ulp of dividing, and several times faster).
    """
    p = patch
    dim = channels * p * p
    for j in range(src_start.shape[0]):
        h, w = heights[j], widths[j]
        cols = w * p
        plane = h * p * cols
        s0, t0, n0 = src_start[j], token_start[j], noise_start[j]
        for c in range(channels):
            m, inv = mean[c], np.float32(1.0) / std[c]
            for py in range(p):
                for px in range(p):
                    # one (c, py, px) entry of every token: a p-strided grid of channel c
                    for ty in range(h):
                        at = c * plane + (ty * p + py) * cols + px
                        out = (t0 + ty * w) * dim + c * p * p + py * p + px
                        if moments:
                            for tx in range(w):
                                k = at + tx * p
                                logvar = min(max(src[s0 + channels * plane + k], np.float32(LOGVAR_MIN)),
                                             np.float32(LOGVAR_MAX))
                                z = src[s0 + k] + np.exp(np.float32(0.5) * logvar) * noise[n0 + k]
                                tokens[out + tx * dim] = (z - m) * inv
                        else:
                            for tx in range(w):
                                tokens[out + tx * dim] = (src[s0 + at + tx * p] - m) * inv
