"""Random access to a catalog's latents by row id, straight out of memory-mapped shards.

A row read is two array lookups and a slice of the mapped file: no decode, no copy. The arrays
returned are read-only views into the map (copy them before writing into them).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nrdata.catalog import layout
from nrdata.catalog.manifest import Manifest, read_manifest
from nrdata.catalog.stats import ChannelStats


class CorruptLatentError(RuntimeError):
    """A latent's bytes do not match the checksum recorded when it was written."""


def part_metadata(part: Path) -> dict[str, Any]:
    meta = pq.read_schema(part).metadata or {}
    raw = meta.get(layout.PART_META_KEY)
    if raw is None:
        raise ValueError(f"{part}: index part has no nr metadata")
    return json.loads(raw)


def merged_channel_stats(root: Path, channels: int) -> ChannelStats:
    """Per-channel statistics of every committed latent, from the shards' own summaries."""
    stats = ChannelStats.empty(channels)
    for part in layout.listing(Path(root) / layout.INDEX_DIR, layout.PART_SUFFIX):
        stats = stats.merge(ChannelStats.from_dict(part_metadata(part)["stats"]))
    return stats


def _binary_view(column: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, data) of a large_binary column as numpy views of its Arrow buffers."""
    _, offsets, data = column.buffers()
    offsets = np.frombuffer(offsets, dtype=np.int64)[column.offset: column.offset + len(column) + 1]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
    return offsets, data


class ShardView:
    """One memory-mapped shard file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map = pa.memory_map(str(path))
        reader = pa.ipc.open_file(self._map)
        if reader.num_record_batches != 1:
            raise ValueError(f"{path}: expected one record batch, found {reader.num_record_batches}")
        batch = reader.get_batch(0)
        self.num_rows = batch.num_rows
        self.keys = batch.column("key")
        self.variants = batch.column("variant")
        self.latent = _binary_view(batch.column("latent"))
        flip = batch.column("latent_flip")
        self.flip = _binary_view(flip) if flip.null_count < len(flip) else None

    def row_bytes(self, row: int, flip: bool = False) -> np.ndarray:
        view = self.flip if flip else self.latent
        if view is None:
            raise KeyError(f"{self.path.name}: no flipped latents stored")
        offsets, data = view
        return data[offsets[row]: offsets[row + 1]]


class Catalog:
    """A catalog opened for reading. Cheap to open; the index loads on first use."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.manifest: Manifest = read_manifest(self.root)
        self._shards: dict[int, ShardView] = {}

    # -- the index -------------------------------------------------------------------------

    @cached_property
    def index_parts(self) -> list[Path]:
        return layout.listing(self.root / layout.INDEX_DIR, layout.PART_SUFFIX)

    @cached_property
    def index(self) -> pa.Table:
        """The whole index as one Arrow table, rows in row-id order."""
        if not self.index_parts:
            return layout.INDEX_SCHEMA.empty_table()
        return pa.concat_tables(pq.read_table(p, schema=layout.INDEX_SCHEMA) for p in self.index_parts)

    def scan(self):
        """The index as a polars LazyFrame (the same thing a user gets with scan_parquet)."""
        import polars as pl

        return pl.scan_parquet(str(self.root / layout.INDEX_DIR / f"*{layout.PART_SUFFIX}"))

    def __len__(self) -> int:
        return self.index.num_rows

    @cached_property
    def _locator(self) -> dict[str, np.ndarray]:
        index = self.index
        names, shard_ids = np.unique(index["shard"].to_numpy(zero_copy_only=False), return_inverse=True)
        return {
            "shard_names": names,
            "shard": shard_ids.astype(np.int32),
            **{c: index[c].to_numpy() for c in ("shard_row", "latent_c", "latent_h", "latent_w", "crc32")},
            "flip": index["flip"].to_numpy(zero_copy_only=False),
        }

    def _shard(self, shard_id: int) -> ShardView:
        view = self._shards.get(shard_id)
        if view is None:
            name = str(self._locator["shard_names"][shard_id])
            view = self._shards[shard_id] = ShardView(self.root / layout.SHARD_DIR / name)
        return view

    # -- latents ---------------------------------------------------------------------------

    @property
    def numpy_dtype(self) -> np.dtype:
        """bfloat16 has no numpy dtype: such latents come back as their raw uint16 words."""
        return np.dtype("uint16") if self.manifest.dtype == "bfloat16" else np.dtype(self.manifest.dtype)

    def latent(self, row_id: int, *, flip: bool = False, verify: bool = False) -> np.ndarray:
        """The latent of one row as a read-only [C, h, w] view into the shard file.

        `verify=True` recomputes the row's checksum first and raises CorruptLatentError on a
        mismatch.
        """
        loc = self._locator
        if not 0 <= row_id < len(loc["shard"]):
            raise IndexError(f"row id {row_id} is outside the catalog's {len(loc['shard'])} rows")
        if flip and not loc["flip"][row_id]:
            raise KeyError(f"row {row_id} has no flipped twin (manifest flip mode: {self.manifest.flip})")
        shard = self._shard(int(loc["shard"][row_id]))
        shard_row = int(loc["shard_row"][row_id])
        if verify:
            self._verify(row_id, shard, shard_row)
        raw = shard.row_bytes(shard_row, flip)
        shape = (int(loc["latent_c"][row_id]), int(loc["latent_h"][row_id]), int(loc["latent_w"][row_id]))
        return raw.view(self.numpy_dtype).reshape(shape)

    def _verify(self, row_id: int, shard: ShardView, shard_row: int) -> None:
        crc = zlib.crc32(shard.row_bytes(shard_row))
        if shard.flip is not None and self._locator["flip"][row_id]:
            crc = zlib.crc32(shard.row_bytes(shard_row, True), crc)
        if crc != int(self._locator["crc32"][row_id]):
            raise CorruptLatentError(
                f"row {row_id} ({shard.path.name} row {shard_row}): checksum mismatch; "
                f"run `nr catalog validate {self.root}` and re-encode the affected keys"
            )

    def latent_torch(self, row_id: int, *, flip: bool = False, verify: bool = False):
        """The latent as a torch tensor sharing memory with the shard file (read-only)."""
        import torch

        array = self.latent(row_id, flip=flip, verify=verify)
        with warnings.catch_warnings():  # the map is read-only; callers copy into their own buffers
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
        return tensor.view(torch.bfloat16) if self.manifest.dtype == "bfloat16" else tensor

    # -- the rest ----------------------------------------------------------------------------

    def errors(self, *, include_resolved: bool = False) -> pa.Table:
        """Error rows; by default without the keys a later run committed after all."""
        parts = layout.listing(self.root / layout.ERROR_DIR, layout.PART_SUFFIX)
        if not parts:
            return layout.ERROR_SCHEMA.empty_table()
        table = pa.concat_tables(pq.read_table(p, schema=layout.ERROR_SCHEMA) for p in parts)
        if include_resolved or self.index.num_rows == 0:
            return table
        committed = set(zip(self.index["key"].to_pylist(), self.index["variant"].to_pylist()))
        committed_keys = {k for k, _ in committed}
        keep = [
            (k not in committed_keys) if v is None else ((k, v) not in committed)
            for k, v in zip(table["key"].to_pylist(), table["variant"].to_pylist())
        ]
        return table.filter(pa.array(keep, pa.bool_()))

    def channel_stats(self) -> ChannelStats:
        return merged_channel_stats(self.root, self.manifest.encoder.channels)

    def content_fingerprint(self) -> str:
        """Changes whenever a row is added or any shard's bytes change: packs record it so that a
        loader refuses packs built for other contents."""
        digest = hashlib.sha256(self.manifest.fingerprint.encode())
        for part in self.index_parts:
            meta = part_metadata(part)
            digest.update(f"{part.name}:{meta['rows']}:{meta['shard_blake2b']}".encode())
        return digest.hexdigest()[:16]
