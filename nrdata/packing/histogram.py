"""Length histograms (numba kernel, cached compilation).

A length is the number of tokens an item occupies in a pack: ``latent_h * latent_w // patch**2``,
computed by the caller. Every packer works on the histogram ``hist[l] = number of items of length
l`` so that its cost depends on ``max_tokens`` and the number of distinct pack shapes, not on the
number of items.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _scan(lengths, max_tokens):
    """One pass: histogram of lengths <= max_tokens; min, max, count and first row > max_tokens."""
    hist = np.zeros(max_tokens + 1, dtype=np.int64)
    n_long = 0
    first_long = -1
    lo = np.int64(0)
    hi = np.int64(0)
    if lengths.shape[0] > 0:
        lo = lengths[0]
        hi = lengths[0]
    for i in range(lengths.shape[0]):
        v = lengths[i]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
        if v > max_tokens:
            if first_long < 0:
                first_long = i
            n_long += 1
        elif v >= 0:
            hist[v] += 1
    return hist, lo, hi, n_long, first_long


@njit(cache=True, nogil=True)
def _long_rows(lengths, max_tokens, n_long):
    out = np.empty(n_long, dtype=np.int64)
    k = 0
    for i in range(lengths.shape[0]):
        if lengths[i] > max_tokens:
            out[k] = i
            k += 1
    return out


def as_lengths(lengths) -> np.ndarray:
    """``lengths`` as a contiguous 1-D int64 array (no copy when it already is one)."""
    arr = np.asarray(lengths)
    if arr.ndim != 1:
        raise ValueError(f"lengths must be a 1-D array of token counts, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"lengths must be integers (tokens per item), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr, dtype=np.int64)


def length_histogram(lengths, max_tokens: int | None = None) -> np.ndarray:
    """Histogram of token lengths: ``hist[l]`` = number of items with ``l`` tokens (int64).

    Without ``max_tokens`` the histogram has ``max(lengths) + 1`` bins. With it, it has
    ``max_tokens + 1`` bins and items longer than ``max_tokens`` are not counted.
    Lengths must be >= 1.
    """
    arr = as_lengths(lengths)
    if max_tokens is None:
        max_tokens = int(arr.max()) if arr.size else 0
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    hist, lo, _hi, _n_long, _first = _scan(arr, int(max_tokens))
    if arr.size and lo < 1:
        raise ValueError(
            f"token lengths must be >= 1; found {int(lo)} at row {int(np.argmin(arr))}"
        )
    return hist


def scan_lengths(lengths: np.ndarray, max_tokens: int):
    """Histogram (``max_tokens + 1`` bins) and the rows longer than ``max_tokens``.

    Returns ``(hist, long_rows, longest)`` where ``long_rows`` is an int64 array of row ids and
    ``longest`` the largest length seen (0 for no items). Raises ValueError for lengths < 1.
    """
    hist, lo, hi, n_long, _first = _scan(lengths, int(max_tokens))
    if lengths.size and lo < 1:
        raise ValueError(
            f"token lengths must be >= 1; found {int(lo)} at row {int(np.argmin(lengths))}"
        )
    if n_long:
        long_rows = _long_rows(lengths, int(max_tokens), n_long)
    else:
        long_rows = np.empty(0, dtype=np.int64)
    return hist, long_rows, int(hi)
