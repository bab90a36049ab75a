"""Spreading one epoch's packs over data-parallel ranks so that every step is balanced.

Ranks synchronise every step, so a step lasts as long as its slowest rank. With ``W`` ranks the
epoch has ``S = P // W`` steps of ``W`` packs each (one per rank).

``method="sorted"`` (default): the packs are sorted by attention cost (sum of squared item lengths;
ties by tokens) and cut into consecutive groups of ``W``, one group per step; then the steps are
shuffled and, inside each step, the packs are dealt to ranks in random order (seeded), so no rank
and no part of the epoch is systematically heavy. Because the groups are disjoint runs of the
sorted costs, ``sum_s (max_s - min_s) <= C_max - C_min``, hence the epoch-level cost imbalance

    sum_s max_s / sum_s mean_s  <=  1 + (C_max - C_min) / sum_s mean_s

i.e. the whole epoch loses at most one pack's worth of attention time to waiting. Tokens per pack
are almost all close to ``max_tokens`` after packing, so tokens balance without extra work (the
token imbalance is reported too).

``method="round_robin"``: packs in their given order, ``W`` at a time (the naive baseline).

Remainder: ``P mod W`` packs do not fill a step. They are chosen at random (seeded), left out of
``steps`` and returned in ``remainder``; the caller drops them for this epoch (the next epoch
repacks every row anyway) or trains them with fewer ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_RANKS_STREAM = 0x72616E6B  # "rank": keeps this stream apart from the row-assignment stream

METHODS = ("sorted", "round_robin")


@dataclass(frozen=True, eq=False)
class RankAssignment:
    """``steps[s, r]``: the pack (index into the epoch's packs) rank ``r`` trains at step ``s``."""

    world_size: int
    method: str
    steps: np.ndarray  # (S, W) int64
    remainder: np.ndarray  # pack indices not placed in any step
    step_cost_imbalance: np.ndarray  # (S,) max / mean cost per step
    step_token_imbalance: np.ndarray  # (S,) max / mean tokens per step
    cost_imbalance: float  # sum of per-step max cost / sum of per-step mean cost
    token_imbalance: float

    @property
    def n_steps(self) -> int:
        return int(self.steps.shape[0])

    @property
    def per_rank(self) -> np.ndarray:
        """(W, S): the pack sequence of each rank."""
        return self.steps.T

    def rank_packs(self, rank: int) -> np.ndarray:
        return self.steps[:, rank]

    @property
    def max_step_cost_imbalance(self) -> float:
        return float(self.step_cost_imbalance.max()) if self.n_steps else float("nan")

    @property
    def mean_step_cost_imbalance(self) -> float:
        return float(self.step_cost_imbalance.mean()) if self.n_steps else float("nan")

    def pack_step_rank(self, n_packs: int) -> tuple[np.ndarray, np.ndarray]:
        """Per pack: its step and rank (-1, -1 for remainder packs)."""
        step = np.full(n_packs, -1, dtype=np.int64)
        rank = np.full(n_packs, -1, dtype=np.int32)
        S, W = self.steps.shape
        step[self.steps.ravel()] = np.repeat(np.arange(S, dtype=np.int64), W)
        rank[self.steps.ravel()] = np.tile(np.arange(W, dtype=np.int32), S)
        return step, rank


def _ratio(x: np.ndarray) -> tuple[np.ndarray, float]:
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.float64), float("nan")
    mx = x.max(axis=1).astype(np.float64)
    mean = x.mean(axis=1, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        per = np.where(mean > 0, mx / np.where(mean > 0, mean, 1.0), 1.0)
    total = float(mx.sum() / mean.sum()) if mean.sum() > 0 else 1.0
    return per, total


def balance_ranks(
    cost,
    tokens,
    world_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    method: str = "sorted",
) -> RankAssignment:
    """Group packs (given by per-pack ``cost`` and ``tokens``) into steps of ``world_size``.

    See the module docstring for the method and the remainder rule. Deterministic for
    ``(seed, epoch)``.
    """
    cost = np.asarray(cost, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    if cost.shape != tokens.shape or cost.ndim != 1:
        raise ValueError(
            f"cost and tokens must be 1-D and equal in length: {cost.shape}, {tokens.shape}"
        )
    W = int(world_size)
    if W < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if method not in METHODS:
        raise ValueError(f"unknown rank method {method!r}; choose one of {METHODS}")
    if int(seed) < 0 or int(epoch) < 0:
        raise ValueError("seed and epoch must be >= 0")
    P = cost.shape[0]
    S = P // W
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), _RANKS_STREAM]))
    n_rem = P - S * W
    if n_rem:
        remainder = np.sort(rng.choice(P, size=n_rem, replace=False)).astype(np.int64)
        keep = np.ones(P, dtype=bool)
        keep[remainder] = False
        kept = np.flatnonzero(keep)
    else:
        remainder = np.zeros(0, dtype=np.int64)
        kept = np.arange(P, dtype=np.int64)

    if method == "sorted":
        order = kept[np.lexsort((tokens[kept], cost[kept]))[::-1]]
        steps = order.reshape(S, W)
        steps = steps[rng.permutation(S)]
        if S:
            steps = np.take_along_axis(steps, rng.random((S, W)).argsort(axis=1), axis=1)
    else:
        steps = kept.reshape(S, W)
    steps = np.ascontiguousarray(steps, dtype=np.int64)

    step_cost, cost_imb = _ratio(cost[steps])
    step_tok, tok_imb = _ratio(tokens[steps])
    return RankAssignment(
        world_size=W,
        method=method,
        steps=steps,
        remainder=remainder,
        step_cost_imbalance=step_cost,
        step_token_imbalance=step_tok,
        cost_imbalance=cost_imb,
        token_imbalance=tok_imb,
    )


def assign_ranks(
    packing, world_size: int, *, seed: int | None = None, method: str = "sorted"
) -> RankAssignment:
    """:func:`balance_ranks` for a :class:`~nrdata.packing.Packing` (seed defaults to its seed)."""
    return balance_ranks(
        packing.cost,
        packing.tokens,
        world_size,
        seed=packing.seed if seed is None else seed,
        epoch=packing.epoch,
        method=method,
    )
