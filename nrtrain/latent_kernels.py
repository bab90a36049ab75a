"""From stored bytes to the normalised tokens a model trains on (numba, called by the loader).

A catalog stores latents in its own dtype (bfloat16 as raw 16-bit words) and quantity: the mode of
the posterior, a sample, or its moments (mean then log-variance). Training draws a latent from the
moments, z = mean + exp(logvar / 2) * eps, normalises it with the run's statistics
(`nrtrain.normalization`) and writes it patchified into the pack's token rows.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# diffusers' DiagonalGaussianDistribution clamps the log-variance the same way: a corrupt or
# extreme value must not turn one latent into inf.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0

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
