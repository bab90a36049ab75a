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


def kernel_input(stored: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bytes as the array `write_tokens` reads: bfloat16 stays raw 16-bit words (converted
    inside the kernel), other dtypes become float32."""
    if dtype == "bfloat16":
        return stored.view(np.uint16)
    return stored.view(dtype).astype(np.float32)


_TILE = 32  # tokens done together, so that both the reads and the writes of a tile stay in L1


@njit(inline="always")
def _value(src, i, bf16, bits, as_float):
    if bf16:  # a bfloat16 word is the high half of the float32 with the same value
        bits[0] = np.uint32(src[i]) << np.uint32(16)
        return as_float[0]
    return np.float32(src[i])


@njit(cache=True, nogil=True)
def write_tokens(src, bf16, src_start, channels, moments, noise, noise_start, heights, widths, patch, token_start,
                 mean, inv_std, tokens):
    """Normalise and patchify latents into their rows of `tokens` (flat [T * channels * patch²]), in one pass.

    Latent j is `src[src_start[j]:]` (float32, or raw bfloat16 words when `bf16`) laid out
    [C', h*p, w*p] (C' = 2 * channels for moments, mean first, then z = mean + exp(logvar / 2) *
    noise[noise_start[j]:] laid out [C, h*p, w*p]); it fills rows token_start[j] .. + h*w, token
    k = row * w + col, each token a (C, p, p) block. Normalising multiplies by 1 / std (within an
    ulp of dividing, and several times faster).
    """
    p = patch
    dim = channels * p * p
    bits = np.empty(1, np.uint32)
    as_float = bits.view(np.float32)
    corner = np.empty(_TILE, np.int64)  # offset of each token's top-left latent pixel in its plane
    for j in range(src_start.shape[0]):
        h, w = heights[j], widths[j]
        cols = w * p
        plane = h * p * cols
        s0, t0, n0 = src_start[j], token_start[j], noise_start[j]
        for k0 in range(0, h * w, _TILE):
            k1 = min(k0 + _TILE, h * w)
            for k in range(k0, k1):
                corner[k - k0] = (k // w) * p * cols + (k % w) * p
            for c in range(channels):
                m, inv = mean[c], inv_std[c]
                for py in range(p):
                    for px in range(p):
                        at = s0 + c * plane + py * cols + px
                        out = t0 * dim + c * p * p + py * p + px
                        if p == 1 and not moments:  # DC-AE under NiT: a contiguous run, kept free of branches
                            for k in range(k0, k1):
                                tokens[out + k * dim] = (_value(src, at + k, bf16, bits, as_float) - m) * inv
                            continue
                        for k in range(k0, k1):
                            i = at + corner[k - k0]
                            z = _value(src, i, bf16, bits, as_float)
                            if moments:
                                logvar = _value(src, channels * plane + i, bf16, bits, as_float)
                                logvar = min(max(logvar, np.float32(LOGVAR_MIN)), np.float32(LOGVAR_MAX))
                                z = z + np.exp(np.float32(0.5) * logvar) * noise[n0 - s0 + i]
                            tokens[out + k * dim] = (z - m) * inv
