"""Random-row read throughput of the catalog against a Parquet binary column, same data, same run.

Builds a catalog of N DC-AE-sized latents (32x16x16 fp16 = 16 KiB, what a 512x512 image gives
with DC-AE f32c32) through the real CatalogWriter, and a Parquet file holding the same bytes in a
binary column with the best-performing layout measured in shared/reference/deps.md 3e (row groups
of 8192, no compression). Then reads the same random row ids from both, the way a packed loader
does: one pack of scattered rows at a time.

    python bench/catalog_random_read.py            # 100k rows, 10k random reads, 5 repeats

Both files sit in the page cache (warm reads): this measures the format's random-access cost, not
the disk.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from nrdata.catalog import Catalog, CatalogWriter, EncoderInfo, LatentRow, Manifest

SHAPE = (32, 16, 16)


def build(root: Path, rows: int, seed: int) -> tuple[Path, Path]:
    manifest = Manifest(
        encoder=EncoderInfo(name="dc-ae-f32c32", source="bench", revision=None, factor=32, channels=32,
                            quantity="mode", scaling_factor=0.41407),
        dtype="float16",
        policies=({"kind": "center-crop", "unit": 32, "max_area": None, "target": 512, "variant": "512"},),
        flip="none",
    )
    rng = np.random.default_rng(seed)
    block = rng.standard_normal((1024, *SHAPE)).astype(np.float16)  # reused: content does not matter
    catalog = root / "catalog"
    payload = []
    with CatalogWriter(catalog, manifest, shard_rows=8192) as writer:
        for i in range(rows):
            latent = block[i % len(block)]
            writer.add(LatentRow(key=f"img{i:07d}", variant="512", latent=latent, label=i % 1000))
            payload.append(latent.tobytes())
    parquet = root / "latents.parquet"
    table = pa.table({"key": [f"img{i:07d}" for i in range(rows)], "latent": pa.array(payload, pa.binary())})
    pq.write_table(table, parquet, row_group_size=8192, compression="none")
    return catalog, parquet


def read_catalog(cat: Catalog, ids: np.ndarray, batch: bool) -> float:
    """Rows as numpy views (batch=False) or copied into one contiguous batch array."""
    start = time.perf_counter()
    if batch:
        out = np.empty((len(ids), *SHAPE), np.float16)
        for j, i in enumerate(ids):
            out[j] = cat.latent(int(i))
    else:
        rows = [cat.latent(int(i)) for i in ids]
        assert len(rows) == len(ids)
    return time.perf_counter() - start


def read_parquet(dataset: ds.Dataset, ids: np.ndarray, batch: bool) -> float:
    """The same two outcomes from Parquet: `take` the rows, then view or copy their bytes."""
    start = time.perf_counter()
    column = dataset.take(pa.array(ids)).column("latent").combine_chunks()
    _, offsets, data = column.buffers()
    data = np.frombuffer(data, np.uint8)
    if batch:  # the taken rows are already contiguous: one copy makes the batch
        out = np.empty((len(ids), *SHAPE), np.float16)
        out.reshape(-1).view(np.uint8)[:] = data[: out.nbytes]
    else:
        offsets = np.frombuffer(offsets, np.int32)
        rows = [data[offsets[j]: offsets[j + 1]].view(np.float16).reshape(SHAPE) for j in range(len(ids))]
        assert len(rows) == len(ids)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reads", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(dir=args.dir, prefix="nr-bench-"))
    try:
        t0 = time.perf_counter()
        catalog_root, parquet = build(scratch, args.rows, args.seed)
        build_s = time.perf_counter() - t0
        cat = Catalog(catalog_root)
        dataset = ds.dataset(parquet)
        rng = np.random.default_rng(args.seed + 1)
        # warm both: page cache, the catalog's index and shard maps, the dataset's metadata
        for batch in (False, True):
            read_catalog(cat, rng.integers(0, args.rows, args.reads), batch)
            read_parquet(dataset, rng.integers(0, args.rows, args.reads), batch)
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.repeats):
            for batch in (False, True):
                ids = rng.integers(0, args.rows, args.reads)
                times.setdefault(("parquet", batch), []).append(read_parquet(dataset, ids, batch))
                times.setdefault(("catalog", batch), []).append(read_catalog(cat, ids, batch))
        mib = np.prod(SHAPE) * 2 / 2**20
        print(f"catalog random read: {args.rows} rows of {SHAPE} fp16, {args.reads} random rows x {args.repeats} "
              f"repeats (median), warm page cache; built in {build_s:.1f} s")
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, pyarrow {pa.__version__}")
        print(f"{'outcome':<30}{'layout':<32}{'s':>8}{'rows/s':>11}{'MiB/s':>9}{'vs parquet':>12}")
        for batch, outcome in ((False, "rows as numpy arrays"), (True, "rows copied into one batch")):
            base = statistics.median(times[("parquet", batch)])
            for layout, label in (("parquet", "parquet binary (rg 8192, take)"),
                                  ("catalog", "nr catalog (Arrow IPC, mmap)")):
                med = statistics.median(times[(layout, batch)])
                print(f"{outcome:<30}{label:<32}{med:>8.4f}{args.reads / med:>11,.0f}{args.reads * mib / med:>9,.0f}"
                      f"{base / med:>11.1f}x")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
