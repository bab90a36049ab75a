"""Assigning row ids to packs in O(N), with a seed.

A :class:`~nrdata.packing.strategies.Strategy` says which lengths go together; this module picks
the rows. Rows are bucketed by length with a counting sort, each bucket is shuffled (Fisher-Yates),
the packs are put in a random order, and then each pack takes the next rows of the lengths it
needs. So for a given strategy every consistent assignment is equally likely, the result is a pure
function of ``(lengths, strategy, seed, epoch)``, and a new epoch (or seed) gives a new packing with
exactly the same efficiency. The random stream is splitmix64 seeded from
``numpy.random.SeedSequence([seed, epoch])``, so it does not depend on the numba or numpy version.

Row ids are positions in the caller's ``lengths`` array (for a merged catalog: the merged row
order). Inside a pack, items are ordered from the longest to the shortest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from nrdata.packing.histogram import as_lengths, scan_lengths
from nrdata.packing.strategies import Strategy, histogram_pack

_INV_2_53 = 1.0 / 9007199254740992.0


@njit(cache=True, nogil=True)
def _next_u64(state):
    z = state[0] + np.uint64(0x9E3779B97F4A7C15)
    state[0] = z
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(cache=True, nogil=True)
def _below(state, n):
    """Uniform int in [0, n) (53-bit float method; bias < n / 2**53)."""
    u = np.float64(_next_u64(state) >> np.uint64(11)) * _INV_2_53
    k = np.int64(u * n)
    return k if k < n else n - 1


@njit(cache=True, nogil=True)
def _shuffle(a, lo, hi, state):
    for j in range(hi - 1, lo, -1):
        k = lo + _below(state, j - lo + 1)
        t = a[j]
        a[j] = a[k]
        a[k] = t


@njit(cache=True, nogil=True)
def _assign(lengths, hist, state, counts, comp_off, comp_len, comp_rep, comp_img):
    L = hist.shape[0] - 1
    start = np.empty(L + 2, dtype=np.int64)
    s = 0
    for l in range(L + 1):
        start[l] = s
        s += hist[l]
    start[L + 1] = s
    m = s

    # counting sort of row ids by length (rows longer than L are skipped), then shuffle buckets
    order = np.empty(m, dtype=np.int64)
    pos = start[: L + 1].copy()
    for i in range(lengths.shape[0]):
        v = lengths[i]
        if v <= L:
            if pos[v] >= start[v + 1]:
                return False, start, order, start, start, start
            order[pos[v]] = i
            pos[v] += 1
    for l in range(1, L + 1):
        if pos[l] != start[l + 1]:
            return False, start, order, start, start, start
        if start[l + 1] - start[l] > 1:
            _shuffle(order, start[l], start[l + 1], state)

    # random pack order
    n_packs = 0
    for g in range(counts.shape[0]):
        n_packs += counts[g]
    pack_group = np.empty(n_packs, dtype=np.int64)
    p = 0
    for g in range(counts.shape[0]):
        for _ in range(counts[g]):
            pack_group[p] = g
            p += 1
    _shuffle(pack_group, 0, n_packs, state)

    offsets = np.empty(n_packs + 1, dtype=np.int64)
    tokens = np.empty(n_packs, dtype=np.int64)
    images = np.empty(n_packs, dtype=np.int64)
    cost = np.empty(n_packs, dtype=np.int64)
    row_ids = np.empty(m, dtype=np.int64)
    take = start[: L + 1].copy()
    o = 0
    offsets[0] = 0
    for p in range(n_packs):
        g = pack_group[p]
        tok = 0
        c = 0
        for q in range(comp_off[g], comp_off[g + 1]):
            l = comp_len[q]
            rep = comp_rep[q]
            t = take[l]
            for j in range(rep):
                row_ids[o + j] = order[t + j]
            take[l] = t + rep
            o += rep
            tok += l * rep
            c += l * l * rep
        offsets[p + 1] = o
        tokens[p] = tok
        images[p] = comp_img[g]
        cost[p] = c
    return True, offsets, row_ids, tokens, images, cost


def epoch_state(seed: int, epoch: int) -> np.ndarray:
    """The 64-bit random state for ``(seed, epoch)`` (both must be >= 0)."""
    if int(seed) < 0 or int(epoch) < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    ss = np.random.SeedSequence([int(seed), int(epoch)])
    return ss.generate_state(1, dtype=np.uint64)


@dataclass(frozen=True, eq=False)
class Packing:
    """One epoch's packs, in training order.

    Pack ``p`` holds rows ``row_ids[offsets[p]:offsets[p+1]]`` with ``tokens[p]`` tokens,
    ``images[p]`` items and attention cost ``cost[p]`` = sum of squared item lengths.
    ``dropped`` lists rows left out because they are longer than ``max_tokens``.
    """

    offsets: np.ndarray
    row_ids: np.ndarray
    tokens: np.ndarray
    images: np.ndarray
    cost: np.ndarray
    max_tokens: int
    max_images: int | None
    algorithm: str
    seed: int
    epoch: int
    n_rows: int
    dropped: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def n_packs(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_items(self) -> int:
        return int(self.row_ids.shape[0])

    @property
    def total_tokens(self) -> int:
        return int(self.tokens.sum())

    @property
    def efficiency(self) -> float:
        """Real tokens / (packs x max_tokens); 1.0 when there are no packs."""
        return self.total_tokens / (self.n_packs * self.max_tokens) if self.n_packs else 1.0

    @property
    def images_per_pack(self) -> float:
        return self.n_items / self.n_packs if self.n_packs else 0.0

    def pack(self, p: int) -> np.ndarray:
        """Row ids of pack ``p``."""
        return self.row_ids[self.offsets[p] : self.offsets[p + 1]]

    def row_ids_list(self) -> list[np.ndarray]:
        """Row ids of every pack, in order (views into ``row_ids``)."""
        return np.split(self.row_ids, self.offsets[1:-1])


def assign_rows(
    lengths, strategy: Strategy, *, seed: int = 0, epoch: int = 0, dropped=None
) -> Packing:
    """Map ``strategy`` onto the rows of ``lengths`` for ``(seed, epoch)`` in O(N + L).

    Rows longer than ``strategy.max_tokens`` are skipped (the caller records them in ``dropped``);
    the other rows must have exactly the strategy's histogram.
    """
    arr = as_lengths(lengths)
    state = epoch_state(seed, epoch)
    ok, offsets, row_ids, tokens, images, cost = _assign(
        arr,
        strategy.histogram,
        state,
        strategy.counts,
        strategy.offsets,
        strategy.lengths,
        strategy.repeats,
        strategy.composition_images,
    )
    if not ok:
        raise ValueError("lengths do not match the strategy's histogram; pack these lengths again")
    return Packing(
        offsets=offsets,
        row_ids=row_ids,
        tokens=tokens,
        images=images,
        cost=cost,
        max_tokens=strategy.max_tokens,
        max_images=strategy.max_images,
        algorithm=strategy.algorithm,
        seed=int(seed),
        epoch=int(epoch),
        n_rows=int(arr.shape[0]),
        dropped=np.zeros(0, dtype=np.int64) if dropped is None else np.asarray(dropped, np.int64),
    )


def plan(
    lengths,
    max_tokens: int,
    *,
    algorithm: str = "lpfhp",
    max_images: int | None = None,
    on_too_long: str = "error",
) -> tuple[np.ndarray, Strategy, np.ndarray]:
    """Histogram + strategy for ``lengths``: returns ``(lengths_int64, strategy, dropped_rows)``.

    ``on_too_long``: ``"error"`` raises ValueError naming how many items are longer than
    ``max_tokens``, the longest, and the fix; ``"drop"`` leaves them out and returns their row ids.
    """
    if on_too_long not in ("error", "drop"):
        raise ValueError(f"on_too_long must be 'error' or 'drop', got {on_too_long!r}")
    max_tokens = int(max_tokens)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    arr = as_lengths(lengths)
    hist, long_rows, longest = scan_lengths(arr, max_tokens)
    if long_rows.size and on_too_long == "error":
        raise ValueError(
            f"{long_rows.size} of {arr.size} items are longer than max_tokens={max_tokens} "
            f"(longest: {longest} tokens, e.g. row {int(long_rows[0])}). Raise max_tokens to at "
            f"least {longest}, or drop them with on_too_long='drop'."
        )
    strategy = histogram_pack(hist, max_tokens, max_images, algorithm)
    return arr, strategy, long_rows


def pack(
    lengths,
    max_tokens: int,
    *,
    algorithm: str = "lpfhp",
    max_images: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    on_too_long: str = "error",
) -> Packing:
    """Pack rows with token ``lengths`` into packs of at most ``max_tokens`` tokens.

    ``algorithm``: ``lpfhp`` (default), ``spfhp`` or ``bfd``. ``max_images``: most items per pack
    (None = unlimited). ``seed``/``epoch`` pick the random assignment (deterministic).
    ``on_too_long``: ``"error"`` or ``"drop"`` (dropped rows in ``Packing.dropped``).
    """
    arr, strategy, dropped = plan(
        lengths, max_tokens, algorithm=algorithm, max_images=max_images, on_too_long=on_too_long
    )
    return assign_rows(arr, strategy, seed=seed, epoch=epoch, dropped=dropped)


def pack_epochs(
    lengths,
    max_tokens: int,
    epochs,
    *,
    algorithm: str = "lpfhp",
    max_images: int | None = None,
    seed: int = 0,
    on_too_long: str = "error",
) -> list[Packing]:
    """One :class:`Packing` per epoch in ``epochs`` (an int n means ``range(n)``).

    The strategy is computed once (it depends only on the histogram); each epoch draws its own
    row assignment and pack order from ``(seed, epoch)``, so all epochs have the same efficiency.
    """
    if isinstance(epochs, (int, np.integer)):
        epochs = range(int(epochs))
    arr, strategy, dropped = plan(
        lengths, max_tokens, algorithm=algorithm, max_images=max_images, on_too_long=on_too_long
    )
    return [assign_rows(arr, strategy, seed=seed, epoch=e, dropped=dropped) for e in epochs]
