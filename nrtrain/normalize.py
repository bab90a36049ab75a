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
    """The manifest's statistics, or a NormalizationNotReadyError that says how to get them.

    They must be the statistics the shards carry (CatalogIntegrityError otherwise): the manifest is a
    hand-editable copy of them, outside the fingerprint."""
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
    catalog.check_normalization()
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


# Stored dtypes as the compiled code knows them; the index is the code.
DTYPE_CODES = {"bfloat16": 0, "float16": 1, "float32": 2, "uint8": 3}
ITEMSIZES = np.array([2, 2, 4, 1], np.int64)
_HALF_SCALE = np.array([2.0 ** max(e - 25, -24) for e in range(32)], np.float32)  # numba has no float16
_TILE = 32  # tokens written together, so that a tile's reads and writes stay in L1


@njit(inline="always")
def _half_to_float(word):
    exponent, mantissa = (word >> 10) & 0x1F, word & 0x3FF
    if exponent == 31:
        value = np.float32(np.inf) if mantissa == 0 else np.float32(np.nan)
    elif exponent == 0:  # zero and subnormals: mantissa * 2**-24
        value = np.float32(mantissa) * _HALF_SCALE[0]
    else:
        value = np.float32(mantissa + 1024) * _HALF_SCALE[exponent]
    return -value if word >> 15 else value


@njit(cache=True, nogil=True)
def decode(stored, code, count, out):
    """The first `count` values of `stored` (raw bytes of dtype `code`) as float32 into `out`."""
    if code == 0:  # a bfloat16 word is the high half of the float32 with the same value
        words, bits = stored.view(np.uint16), out.view(np.uint32)
        for i in range(count):
            bits[i] = np.uint32(words[i]) << np.uint32(16)
    elif code == 1:
        words = stored.view(np.uint16)
        for i in range(count):
            out[i] = _half_to_float(words[i])
    elif code == 2:
        values = stored.view(np.float32)
        for i in range(count):
            out[i] = values[i]
    else:
        for i in range(count):
            out[i] = np.float32(stored[i])


@njit(cache=True, nogil=True)
def sample_moments(moments, count, noise):
    """moments[:count] = mean + exp(logvar / 2) * noise, for mean = moments[:count] and logvar the
    `count` values after it."""
    for i in range(count):
        logvar = min(max(moments[count + i], np.float32(LOGVAR_MIN)), np.float32(LOGVAR_MAX))
        moments[i] = moments[i] + np.exp(np.float32(0.5) * logvar) * noise[i]


@njit(cache=True, nogil=True)
def write_tokens(z, channels, h, w, patch, first_token, mean, inv_std, tokens):
    """Normalise latent `z` (flat [C, h*p, w*p]) and write it patchified into rows first_token ..
    first_token + h*w - 1 of `tokens` (flat [T, C*p*p]): token k = row * w + col, each a (C, p, p)
    block. Normalising multiplies by 1 / std, which is within an ulp of dividing and much faster."""
    p = patch
    dim = channels * p * p
    cols = w * p
    plane = h * p * cols
    for k0 in range(0, h * w, _TILE):
        k1 = min(k0 + _TILE, h * w)
        for c in range(channels):
            m, inv = mean[c], inv_std[c]
            if p == 1:  # DC-AE under NiT: each channel of a tile is one contiguous run
                out = first_token * dim + c
                at = c * plane
                for k in range(k0, k1):
                    tokens[out + k * dim] = (z[at + k] - m) * inv
                continue
            for py in range(p):
                for px in range(p):
                    out = first_token * dim + c * p * p + py * p + px
                    at = c * plane + py * cols + px
                    for k in range(k0, k1):
                        corner = (k // w) * p * cols + (k % w) * p
                        tokens[out + k * dim] = (z[at + corner] - m) * inv
