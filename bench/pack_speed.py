"""Packing speed at ImageNet scale: nr's numba packer against a pure-Python/numpy NiT-style packer.

Generates a synthetic merged ImageNet meta (1,281,167 native-resolution items with a realistic
size mix, plus the same count at 8x8 and 16x16 latents = 3,843,501 items; DC-AE f32 native
policy: latent = floor(w/32) x floor(h/32), area capped at 2048^2 px = 64x64 latents, one token per
latent pixel as in NiT), packs it at L=16384 and prints a table.

The baseline is the same LPFHP algorithm written in plain Python (dict of lists keyed by free
space, offset scan as in Graphcore's/NiT's lpfhp.py) followed by NiT's row assignment (for every
slot, the last remaining row of that length found by a full scan: O(N^2)). The Python strategy step
runs on the full histogram (measured); the O(N^2) assignment is run on 0.5% and 1% subsets and the
full-size figure is extrapolated quadratically, and labelled so.

NiT's tools/pack_dataset.py also takes `--split k`: it cuts the merged meta, in its order, into k
contiguous chunks of floor(N/k) items, packs each chunk on its own and concatenates the packs; the
last N mod k items are never packed. That divides the O(N^2) assignment by k and costs efficiency at
every chunk's tail. The split rows do the same for k = 1, 8, 64 (`--splits`): the Python strategy
runs on every chunk (measured), pack count and efficiency are exact, and the assignment is measured
on the first and last chunk where a chunk is small enough (`--measure-chunk-max`) and otherwise
extrapolated per chunk from the subset fit, labelled so.

Usage:  PYTHONPATH=. .venv/bin/python bench/pack_speed.py [--max-tokens 16384] [--repeats 5] [--splits 1 8 64]
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import sys
import time
from collections import defaultdict

import numpy as np

N_IMAGENET = 1_281_167


# ------------------------------------------------------------------------------------------ data
def imagenet_sizes(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic ImageNet-1k train image sizes (w, h): mostly 500x375 / 375x500 with a long tail."""
    kind = rng.choice(8, size=n, p=[0.40, 0.15, 0.15, 0.09, 0.06, 0.05, 0.098, 0.002])
    w = np.empty(n, dtype=np.float64)
    h = np.empty(n, dtype=np.float64)
    fixed = {0: (500, 375), 1: (500, 333), 3: (375, 500), 4: (333, 500)}
    for k, (fw, fh) in fixed.items():
        m = kind == k
        w[m], h[m] = fw, fh
    m = kind == 2  # landscape, w in [400, 500], aspect 1.2-1.6
    w[m] = rng.uniform(400, 500, m.sum())
    h[m] = w[m] / rng.uniform(1.2, 1.6, m.sum())
    m = kind == 5  # portrait, jittered
    h[m] = rng.uniform(400, 500, m.sum())
    w[m] = h[m] / rng.uniform(1.2, 1.6, m.sum())
    m = kind == 6  # long tail: long side log-uniform 100..2000 px, aspect log-uniform 1/2..2
    side = np.exp(rng.uniform(np.log(100), np.log(2000), m.sum()))
    asp = np.exp(rng.uniform(np.log(0.5), np.log(2.0), m.sum()))
    w[m] = np.where(asp >= 1, side, side * asp)
    h[m] = np.where(asp >= 1, side / asp, side)
    m = kind == 7  # very large photos: long side 2000..5000 px (hit the area cap)
    side = rng.uniform(2000, 5000, m.sum())
    asp = np.exp(rng.uniform(np.log(0.6), np.log(1.7), m.sum()))
    w[m] = np.where(asp >= 1, side, side * asp)
    h[m] = np.where(asp >= 1, side / asp, side)
    return np.maximum(w.astype(np.int64), 1), np.maximum(h.astype(np.int64), 1)


def native_latent(w: np.ndarray, h: np.ndarray, f: int = 32, max_area: int = 2048**2):
    """DC-AE f32 native policy (NiT's rule): floor to multiples of 32 (min 32), area cap 2048^2."""
    small = w * h < max_area
    lw = np.where(small, np.maximum(1, w // f), 0)
    lh = np.where(small, np.maximum(1, h // f), 0)
    big = ~small
    nw = np.sqrt(w[big] / h[big]) * 2048
    nh = nw * h[big] / w[big]
    lw[big] = np.maximum(1, (nw // f).astype(np.int64))
    lh[big] = np.maximum(1, (nh // f).astype(np.int64))
    return lh, lw


def merged_lengths(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w, h = imagenet_sizes(N_IMAGENET, rng)
    lh, lw = native_latent(w, h)
    native = (lh * lw).astype(np.int64)
    lengths = np.concatenate(
        [native, np.full(N_IMAGENET, 8 * 8, np.int64), np.full(N_IMAGENET, 16 * 16, np.int64)]
    )
    return lengths, native


# ----------------------------------------------------------------------------- python baseline
def python_lpfhp(hist: np.ndarray, L: int):
    """Plain-Python LPFHP over a histogram: [(count, [lengths...]), ...]. Same algorithm as the
    numba kernel (best fit by increasing offset, LIFO among equal free space, distribute)."""
    open_by_space: dict[int, list] = defaultdict(list)
    final = []
    for length in range(min(L, len(hist) - 1), 0, -1):
        n = int(hist[length])
        while n > 0:
            r = length
            while r <= L and not open_by_space.get(r):
                r += 1
            if r <= L:
                count, comp = open_by_space[r].pop()
                rep = min(r // length, n)
                cnt = min(count, n // rep)
                if count > cnt:
                    open_by_space[r].append((count - cnt, comp))
                n -= cnt * rep
                new, space = comp + [length] * rep, r - rep * length
            else:
                rep = min(L // length, n)
                cnt = n // rep
                n -= cnt * rep
                new, space = [length] * rep, L - rep * length
            if space == 0:
                final.append((cnt, new))
            else:
                open_by_space[space].append((cnt, new))
    for groups in open_by_space.values():
        final.extend(groups)
    return final


def nit_assign(lengths: np.ndarray, strategy) -> list[list[int]]:
    """NiT's assignment: for every slot, the last remaining row of that length (full scan)."""
    seqs = lengths.copy()
    packs = []
    for count, comp in strategy:
        for _ in range(count):
            rows = []
            for x in comp:
                i = int(np.flatnonzero(seqs == x)[-1])
                seqs[i] = -1
                rows.append(i)
            packs.append(rows)
    return packs


# ------------------------------------------------------------------------------------- memory
def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def child_peak(npy: str, L: int, seed: int) -> int:
    """In a fresh process (no heap left over from data generation): load the lengths, reset the
    peak-RSS counter, pack once, print the RSS before and the peak after."""
    import nrdata.packing as P

    P.pack(np.array([3, 5, 7, 9], np.int64), 16)  # load the compiled kernels
    lengths = np.load(npy)
    before = _status("VmRSS")
    if not reset_peak():
        print("-1 -1")
        return 0
    packing = P.pack(lengths, L, seed=seed)
    print(before, _status("VmHWM"), packing.n_packs)
    return 0


def measure_peak(lengths: np.ndarray, L: int, seed: int) -> tuple[int, int] | None:
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        npy = os.path.join(tmp, "lengths.npy")
        np.save(npy, lengths)
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", npy, "--max-tokens", str(L),
             "--seed", str(seed)],
            capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        ).stdout.split()
    before, peak = int(out[0]), int(out[1])
    return None if before < 0 else (before, peak)


# ---------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--world-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--splits", type=int, nargs="+", default=[1, 8, 64],
                    help="NiT's --split values for the baseline rows")
    ap.add_argument("--measure-chunk-max", type=int, default=80_000,
                    help="measure the O(N^2) assignment on chunks up to this many items; extrapolate above")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    L = args.max_tokens
    if args.child:
        return child_peak(args.child, L, args.seed)

    t = time.perf_counter()
    import nrdata.packing as P

    t_import = time.perf_counter() - t

    t = time.perf_counter()
    lengths, native = merged_lengths(args.seed)
    t_gen = time.perf_counter() - t

    # first call: compile, or load numba's on-disk cache
    t = time.perf_counter()
    for alg in P.ALGORITHMS:
        P.pack(np.array([3, 5, 7, 9], np.int64), 16, algorithm=alg)
    P.assign_ranks(P.pack(np.array([3, 5, 7, 9], np.int64), 16), 2)
    t_warm = time.perf_counter() - t

    runs = []
    for e in range(args.repeats):
        t0 = time.perf_counter()
        arr, strategy, dropped = P.plan(lengths, L)
        t1 = time.perf_counter()
        packing = P.assign_rows(arr, strategy, seed=args.seed, epoch=e, dropped=dropped)
        t2 = time.perf_counter()
        runs.append((t2 - t0, t1 - t0, t2 - t1))
        del packing
    mem = measure_peak(lengths, L, args.seed)
    packing = P.pack(lengths, L, seed=args.seed, epoch=0)
    runs.sort()
    wall, t_strat, t_assign = runs[len(runs) // 2]

    # every row exactly once, no pack over L
    assert np.array_equal(np.bincount(packing.row_ids, minlength=lengths.size), np.ones(lengths.size))
    assert packing.tokens.max() <= L

    others = {}
    for alg in ("spfhp", "bfd"):
        t0 = time.perf_counter()
        q = P.pack(lengths, L, algorithm=alg, seed=args.seed)
        others[alg] = (time.perf_counter() - t0, q)
    t0 = time.perf_counter()
    arr, s_single, _ = P.plan(lengths, L, algorithm="spfhp")
    s_single = P.spfhp(P.length_histogram(arr, L), L, single_item_new_packs=True)
    q = P.assign_rows(arr, s_single, seed=args.seed)
    others["spfhp-singles"] = (time.perf_counter() - t0, q)

    t0 = time.perf_counter()
    ranks = P.assign_ranks(packing, args.world_size)
    t_ranks = time.perf_counter() - t0
    naive = P.assign_ranks(packing, args.world_size, method="round_robin")

    print("nr pack benchmark: synthetic ImageNet-1k merged meta (native + 256px + 512px)")
    print(f"command: PYTHONPATH=. {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"machine: {os.cpu_count()} CPUs; numpy {np.__version__}; numba {__import__('numba').__version__}; "
          f"load average (1, 5, 15 min) {' '.join(f'{x:.2f}' for x in os.getloadavg())} (above the CPU count: "
          "other work competed for the cores)")
    print(
        f"items: {lengths.size:,} (native {native.size:,}: mean {native.mean():.1f}, "
        f"median {int(np.median(native))}, max {native.max()} tokens; + {N_IMAGENET:,} x 64 "
        f"+ {N_IMAGENET:,} x 256); tokens {int(lengths.sum()):,}; L = {L:,}"
    )
    print(f"setup: import {t_import:.2f} s, generate {t_gen:.2f} s, first calls (compile or cache load) {t_warm:.2f} s")
    print()
    lb = math.ceil(int(lengths.sum()) / L)
    rows = [
        ("nr lpfhp (numba), median of %d" % args.repeats, wall, packing),
        ("nr spfhp (numba)", others["spfhp"][0], others["spfhp"][1]),
        ("nr bfd per item (numba)", others["bfd"][0], others["bfd"][1]),
        ("nr spfhp, Graphcore new-pack rule", others["spfhp-singles"][0], others["spfhp-singles"][1]),
    ]
    print(f"{'packer':<34} {'wall':>9} {'packs':>8} {'efficiency':>11} {'img/pack':>9}")
    for name, w, q in rows:
        print(f"{name:<34} {w:>8.3f}s {q.n_packs:>8,} {100 * q.efficiency:>10.4f}% {q.images_per_pack:>9.2f}")
    print(f"(lower bound ceil(tokens/L) = {lb:,} packs)")
    print()
    print(f"lpfhp wall = histogram+strategy {t_strat * 1e3:.1f} ms + row assignment {t_assign * 1e3:.1f} ms")
    out_bytes = sum(a.nbytes for a in (packing.offsets, packing.row_ids, packing.tokens, packing.images, packing.cost))
    if mem is not None:
        before, peak = mem
        print(
            f"peak memory (fresh process, lengths loaded): peak RSS {mib(peak)}, {mib(before)} before packing "
            f"-> +{mib(peak - before)} for packing (lengths array {mib(lengths.nbytes)}, result arrays {mib(out_bytes)})"
        )
    print(
        f"ranks: world_size {args.world_size}, {ranks.n_steps:,} steps, {ranks.remainder.size} packs left over, "
        f"{t_ranks * 1e3:.1f} ms; cost imbalance (sum max/sum mean) sorted {ranks.cost_imbalance:.5f} "
        f"vs round-robin {naive.cost_imbalance:.4f}; worst step {ranks.max_step_cost_imbalance:.4f} "
        f"vs {naive.max_step_cost_imbalance:.4f}"
    )

    if args.skip_baseline:
        return 0
    print()
    print("baseline: pure Python LPFHP + NiT-style O(N^2) argwhere assignment (numpy), same process")
    hist = P.length_histogram(lengths, L)
    t0 = time.perf_counter()
    py_full = python_lpfhp(hist, L)
    t_py_strat = time.perf_counter() - t0
    py_packs = sum(c for c, _ in py_full)
    print(
        f"  python LPFHP strategy, full histogram (measured): {t_py_strat:.2f} s, {py_packs:,} packs "
        f"({'same' if py_packs == packing.n_packs else 'DIFFERENT'} pack count as nr)"
    )
    rng = np.random.default_rng(args.seed + 1)
    fits = []
    for frac in (0.005, 0.01):
        sub = lengths[np.sort(rng.choice(lengths.size, int(round(frac * lengths.size)), replace=False))]
        t0 = time.perf_counter()
        strat = python_lpfhp(P.length_histogram(sub, L), L)
        t_s = time.perf_counter() - t0
        t_a = math.inf
        for _ in range(2):  # best of 2: this VM's timings are noisy
            t0 = time.perf_counter()
            packs = nit_assign(sub, strat)
            t_a = min(t_a, time.perf_counter() - t0)
        t_nr = math.inf
        for e in range(3):
            t0 = time.perf_counter()
            mine = P.pack(sub, L, seed=args.seed, epoch=e)
            t_nr = min(t_nr, time.perf_counter() - t0)
        assert len(packs) == mine.n_packs
        fits.append((sub.size, t_a))
        print(
            f"  {100 * frac:.1f}% subset ({sub.size:,} items), measured: python strategy {t_s:.2f} s + "
            f"NiT-style assignment {t_a:.2f} s = {t_s + t_a:.2f} s; nr {t_nr * 1e3:.1f} ms "
            f"(ratio {(t_s + t_a) / t_nr:,.0f}x); {len(packs):,} packs both"
        )
    (n1, a1), (n2, a2) = fits
    # t(N) = a N + b N^2 through the two measured points: per-pick overhead + full scan per pick
    b = (a2 / n2 - a1 / n1) / (n2 - n1)
    a = a1 / n1 - b * n1
    N = lengths.size
    fit_assign = a * N + b * N * N if b > 0 else a2 * N / n2
    quad_assign = a2 * (N / n2) ** 2
    print(
        f"  EXTRAPOLATED full assignment: {fit_assign:,.0f} s = {fit_assign / 3600:.2f} h "
        f"(fit a*N + b*N^2 to the two subsets); pure N^2 from 1%: {quad_assign / 3600:.2f} h"
    )
    total = t_py_strat + fit_assign
    print(
        f"  EXTRAPOLATED baseline total (measured full strategy + extrapolated assignment): "
        f"{total / 3600:.2f} h vs nr {wall:.3f} s -> ratio {total / wall:,.0f}x (extrapolated)"
    )
    print()
    split_rows(lengths, L, args.splits, lambda n: a * n + b * n * n if b > 0 else a2 * n / n2,
               args.measure_chunk_max, wall, packing)
    print(f"load average (1, 5, 15 min) after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


def split_rows(lengths, L, splits, predict_assign, measure_max, nr_wall, nr_packing) -> None:
    """NiT's `--split k` baseline: k contiguous chunks of floor(N/k) items packed one by one, the
    last N mod k items dropped. Strategy timed on every chunk, assignment measured or extrapolated."""
    import nrdata.packing as P

    print("baseline with NiT's --split k (contiguous chunks of floor(N/k) items in meta order, packed "
          "separately, last N mod k items dropped); nr packs all N items at once")
    print(f"  {'k':>3} {'chunk':>9} {'dropped':>7} {'packs':>8} {'efficiency':>11} {'strategy s':>10} "
          f"{'assign s':>10}  {'assignment':<36} {'total':>9} {'vs nr':>10}  {'nr eff/base eff':>15}")
    N = lengths.size
    for k in splits:
        n = N // k
        chunks = [lengths[i * n:(i + 1) * n] for i in range(k)]
        t_strat, packs, tokens = 0.0, 0, 0
        for chunk in chunks:
            t0 = time.perf_counter()
            strat = python_lpfhp(P.length_histogram(chunk, L), L)
            t_strat += time.perf_counter() - t0
            packs += sum(c for c, _ in strat)
            tokens += int(chunk.sum())
        eff = tokens / (packs * L)
        if n <= measure_max:
            picks = sorted({0, k - 1})
            times = []
            for i in picks:
                strat = python_lpfhp(P.length_histogram(chunks[i], L), L)
                t0 = time.perf_counter()
                nit_assign(chunks[i], strat)
                times.append(time.perf_counter() - t0)
            t_assign = float(np.mean(times)) * k
            how = (f"chunk {' and '.join(map(str, picks))} measured, mean x{k}"
                   f" (fit predicts {predict_assign(n) * k:,.0f} s)")
            label = f"{len(picks)} of {k} chunks measured"
        else:
            t_assign = predict_assign(n) * k
            how = "EXTRAPOLATED per chunk from the fit, x%d" % k
            label = "extrap."
        total = t_strat + t_assign
        print(f"  {k:>3} {n:>9,} {N - k * n:>7} {packs:>8,} {100 * eff:>10.4f}% {t_strat:>10.2f} "
              f"{t_assign:>10,.0f}  {how:<36} {_hours(total):>9} {total / nr_wall:>9,.0f}x  "
              f"{nr_packing.efficiency / eff:>14.5f}x  ({label})")
    print(f"  nr: all {N:,} items, {nr_packing.n_packs:,} packs, {100 * nr_packing.efficiency:.4f}%, "
          f"{nr_wall:.3f} s")


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:,.0f} s"


if __name__ == "__main__":
    raise SystemExit(main())
