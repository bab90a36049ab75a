"""Open-pack bookkeeping shared by the numba packers.

Open pack groups are kept in one LIFO stack per amount of free space ``r`` (``head[r]`` is the top
group, ``nxt[g]`` the group below ``g``; -1 ends a stack). ``blk[b]`` counts the non-empty stacks in
the block of 64 consecutive keys ``b*64 .. b*64+63`` so that "the smallest non-empty key >= x" and
"the largest non-empty key <= x" cost O(64 + L/64) instead of O(L).
"""

from __future__ import annotations

import numpy as np
from numba import njit

BLOCK_SHIFT = 6


@njit(cache=True, nogil=True)
def new_stacks(n_keys):
    head = np.full(n_keys, -1, dtype=np.int64)
    blk = np.zeros((n_keys >> BLOCK_SHIFT) + 1, dtype=np.int64)
    return head, blk


@njit(cache=True, nogil=True)
def push(head, nxt, blk, r, g):
    if head[r] < 0:
        blk[r >> BLOCK_SHIFT] += 1
    nxt[g] = head[r]
    head[r] = g


@njit(cache=True, nogil=True)
def pop(head, nxt, blk, r):
    g = head[r]
    head[r] = nxt[g]
    if head[r] < 0:
        blk[r >> BLOCK_SHIFT] -= 1
    return g


@njit(cache=True, nogil=True)
def find_ge(head, blk, lo):
    """Smallest key >= lo whose stack is non-empty, or -1."""
    n = head.shape[0]
    if lo >= n:
        return -1
    b = lo >> BLOCK_SHIFT
    end = min((b + 1) << BLOCK_SHIFT, n)
    for r in range(lo, end):
        if head[r] >= 0:
            return r
    for bb in range(b + 1, blk.shape[0]):
        if blk[bb] > 0:
            e = min((bb + 1) << BLOCK_SHIFT, n)
            for r in range(bb << BLOCK_SHIFT, e):
                if head[r] >= 0:
                    return r
    return -1


@njit(cache=True, nogil=True)
def find_le(head, blk, hi, lo):
    """Largest key in [lo, hi] whose stack is non-empty, or -1."""
    if hi >= head.shape[0]:
        hi = head.shape[0] - 1
    if hi < lo:
        return -1
    b = hi >> BLOCK_SHIFT
    start = max(b << BLOCK_SHIFT, lo)
    for r in range(hi, start - 1, -1):
        if head[r] >= 0:
            return r
    for bb in range(b - 1, (lo >> BLOCK_SHIFT) - 1, -1):
        if blk[bb] > 0:
            s = max(bb << BLOCK_SHIFT, lo)
            for r in range(((bb + 1) << BLOCK_SHIFT) - 1, s - 1, -1):
                if head[r] >= 0:
                    return r
    return -1


@njit(cache=True, nogil=True)
def grow(a, cap):
    out = np.empty(cap, dtype=a.dtype)
    out[: a.shape[0]] = a
    return out
