"""Histogram packers: LPFHP, SPFHP (Krell et al. 2021, "Efficient Sequence Packing without
Cross-contamination", as in Graphcore's packedBERT and NiT's ``nit/data/pack/lpfhp.py``) and a
best-fit-decreasing baseline.

All three take a length histogram (``hist[l]`` = number of items of ``l`` tokens) and return a
:class:`Strategy`: a list of pack *compositions* (which lengths, how many of each) with the number
of packs that use each one. No row ids are involved; :func:`nrdata.packing.assign_rows` maps a
strategy onto rows in O(N).

Algorithms (lengths are visited from longest to shortest; an *open* pack has free space left and
fewer than ``max_images`` items; packs of equal composition are handled as one group with a count):

- **LPFHP** (longest-pack-first): for ``n`` items of length ``l``, take the open group whose free
  space ``r`` is the smallest with ``r >= l`` (best fit, least waste); put
  ``k = min(r // l, max_images - items, n)`` copies into as many of its packs as the items allow
  (``min(count, n // k)``), the rest of the group stays open. When nothing fits, open
  ``n // k`` new packs of ``k = min(L // l, max_images, n)`` copies each. Among groups with the same
  free space the most recently created is taken. Without an image limit this is exactly
  best-fit-decreasing done a group at a time.
- **SPFHP** (shortest-pack-first): the open groups are visited from the *most* free space down to
  ``l``; each pack in the group receives one item (a pack whose free space drops to ``r - l >= l``
  is met again further down the scan). Items left over open new packs filled like LPFHP's
  (``min(L // l, max_images)`` copies each), which makes SPFHP exactly worst-fit decreasing done a
  group at a time. Graphcore's ``spfhp.py`` (and NiT's copy) opens one *single-item* pack per
  leftover item instead; on image-latent histograms, where a few lengths hold hundreds of
  thousands of items, that gives packs of 1-3 items (about 3 % efficiency on ImageNet at
  L=16384), so it is kept only behind ``spfhp(..., single_item_new_packs=True)``.
- **BFD** (best-fit decreasing, baseline): item by item, into the open pack with the least free
  space that still fits (new pack when none). Cost O(N·L/64); kept to check LPFHP against.

Cost of LPFHP/SPFHP: O(G · (64 + L/64)) where G is the number of pack groups created, independent
of the number of items.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from numba import njit

from nrdata.packing import _stacks as st

MODE_LPFHP = 0
MODE_SPFHP = 1
MODE_BFD = 2
MODE_SPFHP_SINGLES = 3  # SPFHP exactly as Graphcore's spfhp.py: leftover items open 1-item packs

ALGORITHMS = ("lpfhp", "spfhp", "bfd")


@njit(cache=True, nogil=True)
def _histogram_pack(hist, max_tokens, max_images, mode):
    """Run one packer over ``hist`` (bins 0..max_tokens). Returns the group and node arrays.

    Pack compositions are stored as a forest of nodes: node ``v`` says "the composition of
    ``parent[v]`` plus ``rep[v]`` items of ``length[v]``", so that packs that share a prefix share
    its nodes. A group is (count, node): ``count`` packs with that composition.
    """
    L = max_tokens
    head, blk = st.new_stacks(L + 1)

    cap_g = 1024
    g_count = np.zeros(cap_g, dtype=np.int64)
    g_node = np.zeros(cap_g, dtype=np.int64)
    g_next = np.full(cap_g, -1, dtype=np.int64)
    ng = 0

    cap_n = 1024
    n_parent = np.zeros(cap_n, dtype=np.int64)
    n_len = np.zeros(cap_n, dtype=np.int64)
    n_rep = np.zeros(cap_n, dtype=np.int64)
    n_items = np.zeros(cap_n, dtype=np.int64)
    nn = 0

    top = min(L, hist.shape[0] - 1)
    for l in range(top, 0, -1):
        n = hist[l]
        k = L  # SPFHP scan position
        while n > 0:
            if ng + 2 >= cap_g:
                cap_g *= 2
                g_count = st.grow(g_count, cap_g)
                g_node = st.grow(g_node, cap_g)
                g_next = st.grow(g_next, cap_g)
            if nn + 2 >= cap_n:
                cap_n *= 2
                n_parent = st.grow(n_parent, cap_n)
                n_len = st.grow(n_len, cap_n)
                n_rep = st.grow(n_rep, cap_n)
                n_items = st.grow(n_items, cap_n)

            if mode == MODE_SPFHP or mode == MODE_SPFHP_SINGLES:
                r = st.find_le(head, blk, k, l)
            else:
                r = st.find_ge(head, blk, l)

            if mode == MODE_BFD:
                # One item; bins are never shared, so the leaf node is extended in place.
                if r >= 0:
                    g = st.pop(head, g_next, blk, r)
                    v = g_node[g]
                    if n_len[v] == l:
                        n_rep[v] += 1
                        n_items[v] += 1
                    else:
                        n_parent[nn] = v
                        n_len[nn] = l
                        n_rep[nn] = 1
                        n_items[nn] = n_items[v] + 1
                        g_node[g] = nn
                        v = nn
                        nn += 1
                    space = r - l
                else:
                    g = ng
                    ng += 1
                    g_count[g] = 1
                    n_parent[nn] = -1
                    n_len[nn] = l
                    n_rep[nn] = 1
                    n_items[nn] = 1
                    g_node[g] = nn
                    v = nn
                    nn += 1
                    space = L - l
                n -= 1
                if space > 0 and n_items[v] < max_images:
                    st.push(head, g_next, blk, space, g)
                continue

            if r >= 0:
                g = st.pop(head, g_next, blk, r)
                parent = g_node[g]
                if mode == MODE_LPFHP:
                    rep = min(r // l, max_images - n_items[parent], n)
                    cnt = min(g_count[g], n // rep)
                else:
                    rep = 1
                    cnt = min(g_count[g], n)
                    k = r
                if g_count[g] > cnt:
                    g_count[g] -= cnt
                    st.push(head, g_next, blk, r, g)
                else:
                    g_count[g] = 0
                n -= cnt * rep
                free = r
            else:
                parent = -1
                free = L
                if mode == MODE_SPFHP_SINGLES:
                    rep = 1
                    cnt = n
                else:
                    rep = min(L // l, max_images, n)
                    cnt = n // rep
                n -= cnt * rep

            # node for "parent + rep x l" (merged into the parent's run when it has length l)
            if parent >= 0 and n_len[parent] == l:
                n_parent[nn] = n_parent[parent]
                n_rep[nn] = n_rep[parent] + rep
            else:
                n_parent[nn] = parent
                n_rep[nn] = rep
            n_len[nn] = l
            n_items[nn] = rep + (n_items[parent] if parent >= 0 else 0)
            v = nn
            nn += 1

            g = ng
            ng += 1
            g_count[g] = cnt
            g_node[g] = v
            space = free - rep * l
            if space > 0 and n_items[v] < max_images:
                st.push(head, g_next, blk, space, g)

    return g_count[:ng], g_node[:ng], n_parent[:nn], n_len[:nn], n_rep[:nn]


@njit(cache=True, nogil=True)
def _compositions(g_count, g_node, n_parent, n_len, n_rep):
    """Flatten the live groups into run-length compositions (CSR), runs from longest length."""
    ng = g_count.shape[0]
    live = 0
    runs = 0
    for g in range(ng):
        if g_count[g] > 0:
            live += 1
            v = g_node[g]
            while v >= 0:
                runs += 1
                v = n_parent[v]
    counts = np.empty(live, dtype=np.int64)
    offsets = np.empty(live + 1, dtype=np.int64)
    lengths = np.empty(runs, dtype=np.int64)
    repeats = np.empty(runs, dtype=np.int64)
    j = 0
    o = 0
    offsets[0] = 0
    for g in range(ng):
        if g_count[g] > 0:
            depth = 0
            v = g_node[g]
            while v >= 0:
                depth += 1
                v = n_parent[v]
            # the chain runs leaf -> root; store root first (longest length first)
            v = g_node[g]
            q = o + depth - 1
            while v >= 0:
                lengths[q] = n_len[v]
                repeats[q] = n_rep[v]
                q -= 1
                v = n_parent[v]
            o += depth
            counts[j] = g_count[g]
            j += 1
            offsets[j] = o
    return counts, offsets, lengths, repeats


@dataclass(frozen=True, eq=False)
class Strategy:
    """Pack compositions and how many packs use each.

    Composition ``g`` is the runs ``lengths[offsets[g]:offsets[g+1]]`` (token length) repeated
    ``repeats[...]`` times (number of items of that length); ``counts[g]`` packs use it. Runs go
    from the longest length to the shortest.
    """

    algorithm: str
    max_tokens: int
    max_images: int | None
    counts: np.ndarray
    offsets: np.ndarray
    lengths: np.ndarray
    repeats: np.ndarray
    histogram: np.ndarray = field(repr=False)

    @property
    def n_compositions(self) -> int:
        return int(self.counts.shape[0])

    @property
    def n_packs(self) -> int:
        return int(self.counts.sum())

    @property
    def composition_images(self) -> np.ndarray:
        """Items per pack for each composition (int64)."""
        if self.n_compositions == 0:
            return np.zeros(0, dtype=np.int64)
        return np.add.reduceat(self.repeats, self.offsets[:-1])

    @property
    def composition_tokens(self) -> np.ndarray:
        """Tokens per pack for each composition (int64)."""
        if self.n_compositions == 0:
            return np.zeros(0, dtype=np.int64)
        return np.add.reduceat(self.repeats * self.lengths, self.offsets[:-1])

    @property
    def n_items(self) -> int:
        return int((self.composition_images * self.counts).sum())

    @property
    def tokens(self) -> int:
        return int((self.composition_tokens * self.counts).sum())

    @property
    def efficiency(self) -> float:
        """Real tokens / (packs x max_tokens); 1.0 for an empty strategy."""
        p = self.n_packs
        return self.tokens / (p * self.max_tokens) if p else 1.0

    def composition(self, g: int) -> np.ndarray:
        """Item lengths of composition ``g``, longest first."""
        s = slice(self.offsets[g], self.offsets[g + 1])
        return np.repeat(self.lengths[s], self.repeats[s])


def _check_histogram(histogram, max_tokens: int, max_images: int | None) -> np.ndarray:
    hist = np.asarray(histogram)
    if hist.ndim != 1:
        raise ValueError(f"histogram must be 1-D (hist[l] = items of length l), got {hist.shape}")
    if hist.size and not np.issubdtype(hist.dtype, np.integer):
        raise TypeError(f"histogram must hold integer counts, got dtype {hist.dtype}")
    max_tokens = int(max_tokens)
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if max_images is not None and int(max_images) < 1:
        raise ValueError(f"max_images must be >= 1 or None (unlimited), got {max_images}")
    hist = np.ascontiguousarray(hist, dtype=np.int64)
    if hist.size and hist.min() < 0:
        raise ValueError("histogram counts must be >= 0")
    if hist.size and hist[0] != 0:
        raise ValueError(f"histogram has {int(hist[0])} items of length 0; lengths must be >= 1")
    if hist.size > max_tokens + 1:
        over = hist[max_tokens + 1 :]
        if over.any():
            longest = max_tokens + 1 + int(np.flatnonzero(over)[-1])
            raise ValueError(
                f"{int(over.sum())} items are longer than max_tokens={max_tokens} "
                f"(longest: {longest} tokens); raise max_tokens to at least {longest} or drop them "
                f"(pack(..., on_too_long='drop'))"
            )
        hist = hist[: max_tokens + 1]
    out = np.zeros(max_tokens + 1, dtype=np.int64)
    out[: hist.size] = hist
    return out


def histogram_pack(
    histogram,
    max_tokens: int,
    max_images: int | None = None,
    algorithm: str = "lpfhp",
    *,
    single_item_new_packs: bool = False,
) -> Strategy:
    """Pack a length histogram with ``algorithm`` (``lpfhp``, ``spfhp`` or ``bfd``).

    ``max_images=None`` means no limit on items per pack. Raises ValueError when the histogram
    has items longer than ``max_tokens``. ``single_item_new_packs`` (SPFHP only) reproduces
    Graphcore's new-pack rule; see the module docstring.
    """
    algorithm = algorithm.lower()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown packing algorithm {algorithm!r}; choose one of {ALGORITHMS}")
    if single_item_new_packs and algorithm != "spfhp":
        raise ValueError("single_item_new_packs applies to spfhp only")
    hist = _check_histogram(histogram, max_tokens, max_images)
    L = int(max_tokens)
    limit = L if max_images is None else min(int(max_images), L)
    mode = {"lpfhp": MODE_LPFHP, "spfhp": MODE_SPFHP, "bfd": MODE_BFD}[algorithm]
    if single_item_new_packs:
        mode = MODE_SPFHP_SINGLES
    raw = _histogram_pack(hist, L, limit, mode)
    counts, offsets, lengths, repeats = _compositions(*raw)
    strategy = Strategy(
        algorithm="spfhp-singles" if single_item_new_packs else algorithm,
        max_tokens=L,
        max_images=None if max_images is None else int(max_images),
        counts=counts,
        offsets=offsets,
        lengths=lengths,
        repeats=repeats,
        histogram=hist,
    )
    _verify(strategy)
    return strategy


def _verify(s: Strategy) -> None:
    """Cheap O(runs + L) check that the strategy places every histogram item exactly once."""
    if s.n_compositions == 0:
        if s.histogram.any():
            raise AssertionError("packer produced no packs for a non-empty histogram")
        return
    per_run_packs = np.repeat(s.counts, np.diff(s.offsets))
    placed = np.zeros(s.histogram.size, dtype=np.int64)
    np.add.at(placed, s.lengths, per_run_packs * s.repeats)
    if not np.array_equal(placed, s.histogram):
        raise AssertionError(f"{s.algorithm}: strategy does not match the histogram (bug)")
    if (s.composition_tokens > s.max_tokens).any():
        raise AssertionError(f"{s.algorithm}: a pack exceeds max_tokens (internal error)")
    if s.max_images is not None and (s.composition_images > s.max_images).any():
        raise AssertionError(f"{s.algorithm}: a pack exceeds max_images (internal error)")


def lpfhp(histogram, max_tokens: int, max_images: int | None = None) -> Strategy:
    """Longest-pack-first histogram packing (Krell et al. 2021). See the module docstring."""
    return histogram_pack(histogram, max_tokens, max_images, "lpfhp")


def spfhp(
    histogram,
    max_tokens: int,
    max_images: int | None = None,
    *,
    single_item_new_packs: bool = False,
) -> Strategy:
    """Shortest-pack-first histogram packing (Krell et al. 2021). See the module docstring."""
    return histogram_pack(
        histogram, max_tokens, max_images, "spfhp", single_item_new_packs=single_item_new_packs
    )


def bfd(histogram, max_tokens: int, max_images: int | None = None) -> Strategy:
    """Best-fit decreasing, one item at a time (baseline). See the module docstring."""
    return histogram_pack(histogram, max_tokens, max_images, "bfd")
