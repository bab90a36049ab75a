"""The one way latents enter a catalog: atomic shard commits, idempotent by (key, variant).

A commit writes the shard file, then its index part, each under a temporary name that is fsynced
and renamed. Until the index part is renamed the rows do not exist for any reader. A writer killed
at any moment therefore leaves whole shards or nothing: the next writer deletes what was left
half-way (temporary files, a shard whose index part never came) and skips every key already
committed, so a re-run completes the catalog with each key exactly once.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import fcntl
import hashlib
import json
import os
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nrdata.catalog import layout
from nrdata.catalog.atomic import is_temp, publish, temp_path_for
from nrdata.catalog.manifest import (
    Manifest,
    ManifestError,
    MANIFEST_NAME,
    Normalization,
    read_manifest,
    write_manifest,
)
from nrdata.catalog.stats import ChannelStats

DEFAULT_SHARD_ROWS = 2048
DEFAULT_SHARD_BYTES = 256 << 20
DEFAULT_COMMIT_SECONDS = 120.0


class CatalogLockedError(RuntimeError):
    """Another process is writing the same catalog."""


@dataclass
class LatentRow:
    """One latent to store, with what the index says about it.

    `latent` is [C, h, w] in the manifest's dtype (bfloat16 as a torch tensor or a uint16 view);
    `latent_flip`, when the manifest stores flips, is the latent of the mirrored image; `repa_image`,
    when the manifest's repa_pixels k > 0, is uint8 [h*k, w*k, 3] (see `repa_view`).
    """

    key: str
    variant: str
    latent: Any
    latent_flip: Any = None
    label: int = -1
    class_name: str | None = None
    source: str | None = None
    orig_w: int | None = None
    orig_h: int | None = None
    image_w: int | None = None
    image_h: int | None = None
    repa_image: Any = None


@dataclass
class WriteSummary:
    committed: int = 0  # rows committed by this writer
    skipped: int = 0  # rows whose (key, variant) was already in the catalog
    errors: int = 0  # error rows recorded by this writer
    shards: int = 0


def stored_array(latent: Any, dtype: str) -> np.ndarray:
    """A latent as the numpy array a catalog of `dtype` stores (bfloat16 as its raw uint16 words)."""
    if hasattr(latent, "detach"):  # a torch tensor; imported lazily so nrdata works without torch
        import torch

        tensor = latent.detach().cpu().contiguous()
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.view(torch.int16)
        latent = tensor.numpy()
    array = np.ascontiguousarray(latent)
    if dtype == "bfloat16":
        # raw bf16 words only: a float16 array has the right size but means other numbers
        if array.dtype not in (np.dtype("uint16"), np.dtype("int16")):
            raise TypeError(f"latent dtype {array.dtype} does not match the catalog dtype bfloat16 "
                            "(pass a torch.bfloat16 tensor or its uint16 view)")
        return array.view(np.uint16)
    if array.dtype != np.dtype(dtype):
        raise TypeError(f"latent dtype {array.dtype} does not match the catalog dtype {dtype}")
    return array


def _finite(array: np.ndarray, dtype: str) -> bool:
    if dtype == "uint8":
        return True
    if dtype == "bfloat16":  # exponent bits all ones means inf or nan
        return not np.any((array.view(np.uint16) & 0x7F80) == 0x7F80)
    return bool(np.isfinite(array).all())


def _stats_view(array: np.ndarray, manifest: Manifest) -> np.ndarray:
    if manifest.dtype == "bfloat16":
        array = (array.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if manifest.encoder.quantity == "moments":  # statistics of the mean, not of the log-variance
        array = array[: manifest.encoder.channels]
    return array


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _with_provenance(grown: Manifest, existing: Manifest, run: Manifest) -> Manifest:
    """`grown` with a note of a run that added variants or read its weights or images from elsewhere
    than the manifest records (the catalog keeps its first encoder source; the weights are the same)."""
    entry = {"variants_added": [v for v in grown.variants if v not in existing.variants],
             "encoder_source": run.encoder.source, "encoder_revision": run.encoder.revision,
             "source_root": run.source_root}
    history = list(existing.notes.get("grown", []))
    places = {(existing.encoder.source, existing.encoder.revision, existing.source_root)}
    places.update((h.get("encoder_source"), h.get("encoder_revision"), h.get("source_root")) for h in history)
    if not entry["variants_added"] and (run.encoder.source, run.encoder.revision, run.source_root) in places:
        return grown
    history.append({**entry, "time": _now(), "code_version": run.code_version})
    return dataclasses.replace(grown, notes={**grown.notes, "grown": history})


class CatalogWriter:
    """Append latents to a catalog, creating it if needed.

    Use as a context manager; `close()` commits what is buffered and writes the final statistics
    into the manifest. An existing catalog grows: `manifest` may add variants, and may read the
    same weights from elsewhere; one whose latents would differ (encoder weights, dtype, flip mode,
    an existing variant's policy) is refused, so one catalog never mixes latents made differently.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        manifest: Manifest,
        *,
        shard_rows: int = DEFAULT_SHARD_ROWS,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        commit_seconds: float = DEFAULT_COMMIT_SECONDS,
    ) -> None:
        self.root = Path(root)
        self.shard_rows = shard_rows
        self.shard_bytes = shard_bytes
        self.commit_seconds = commit_seconds
        self.summary = WriteSummary()
        self._id = uuid.uuid4().hex[:8]
        for sub in (layout.INDEX_DIR, layout.SHARD_DIR, layout.ERROR_DIR):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._lock_fh = self._take_lock()
        try:
            self._refuse_broken_index()
            self.manifest = self._open_manifest(manifest)
            self._clean_leftovers()
            self._committed, self._next_row, self._next_seq = self._read_committed()
            self._recorded_errors = self._read_error_keys()
        except BaseException:
            self._lock_fh.close()
            raise
        self._rows: list[LatentRow] = []
        self._arrays: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._pending: set[tuple[str, str]] = set()
        self._buffered_bytes = 0
        self._errors: list[dict[str, Any]] = []
        self._last_commit = time.monotonic()
        self._closed = False

    # -- opening ---------------------------------------------------------------------------

    def _take_lock(self):
        fh = open(self.root / layout.LOCK_NAME, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise CatalogLockedError(
                f"{self.root} is being written by another process ({holder}); wait for it or use another output"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
        return fh

    def _open_manifest(self, manifest: Manifest) -> Manifest:
        """The manifest this writer appends under: `manifest` for a new catalog, else the existing
        one grown by what `manifest` adds (ManifestError when its latents would differ)."""
        self._on_disk = None
        if not (self.root / MANIFEST_NAME).exists():
            write_manifest(self.root, manifest)
            return manifest
        existing = read_manifest(self.root)
        try:
            grown = existing.extended_with(manifest)
        except ManifestError as exc:
            raise ManifestError(f"{self.root}: {exc}") from None
        grown = _with_provenance(grown, existing, manifest)
        if grown.variants != existing.variants:
            # rows of a new variant must never exist before the manifest that describes them
            write_manifest(self.root, grown)
        elif grown.to_dict() != existing.to_dict():
            # a recorded weights hash or provenance only: written with the first rows this writer
            # commits, so that a run that adds nothing leaves the catalog (and packs built on it) as is
            self._on_disk = existing
        return grown

    def _write_deferred_manifest(self) -> None:
        if self._on_disk is not None:
            write_manifest(self.root, self.manifest)
            self._on_disk = None

    def _refuse_broken_index(self) -> None:
        """A writer numbers new rows after the last one and deletes shards no index part names. On an
        index with a part copied, deleted or truncated (or a shard gone) that would reuse row ids and
        delete the shard of a lost part, so such a catalog is refused as it is (CatalogIntegrityError
        naming the files); a shard left by a writer killed mid-commit is no such damage."""
        from nrdata.catalog.reader import CatalogIntegrityError, index_problems, read_parts

        problems = index_problems(self.root, read_parts(self.root))
        if problems:
            raise CatalogIntegrityError(f"{self.root} cannot be appended to: {problems[0]}")

    def _clean_leftovers(self) -> None:
        """Remove what a killed writer left: temporary files and shards nobody indexed."""
        indexed = {p.stem for p in layout.listing(self.root / layout.INDEX_DIR, layout.PART_SUFFIX)}
        for sub in (layout.INDEX_DIR, layout.SHARD_DIR, layout.ERROR_DIR):
            for path in (self.root / sub).iterdir():
                if is_temp(path):
                    path.unlink()
        for shard in layout.listing(self.root / layout.SHARD_DIR, layout.SHARD_SUFFIX):
            if shard.stem not in indexed:
                shard.unlink()

    def _read_committed(self) -> tuple[set[tuple[str, str]], int, int]:
        parts = layout.listing(self.root / layout.INDEX_DIR, layout.PART_SUFFIX)
        committed: set[tuple[str, str]] = set()
        rows = 0
        for part in parts:
            table = pq.read_table(part, columns=["key", "variant"])
            committed.update(zip(table["key"].to_pylist(), table["variant"].to_pylist()))
            rows += table.num_rows
        seqs = [layout.part_seq(p.name) for sub in (layout.INDEX_DIR, layout.ERROR_DIR)
                for p in layout.listing(self.root / sub, layout.PART_SUFFIX)]
        return committed, rows, max(seqs, default=0) + 1

    def _read_error_keys(self) -> set[tuple[str, str | None, str]]:
        recorded = set()
        for part in layout.listing(self.root / layout.ERROR_DIR, layout.PART_SUFFIX):
            table = pq.read_table(part, columns=["key", "variant", "stage"])
            recorded.update(zip(*(table[c].to_pylist() for c in ("key", "variant", "stage"))))
        return recorded

    # -- adding ----------------------------------------------------------------------------

    def has(self, key: str, variant: str) -> bool:
        """True when (key, variant) is committed or waiting in the current shard."""
        return (key, variant) in self._committed or (key, variant) in self._pending

    def add(self, row: LatentRow) -> bool:
        """Buffer one latent; returns False when it was skipped (already stored) or refused
        (non-finite values, recorded in the errors table)."""
        if self._closed:
            raise RuntimeError("writer is closed")
        if row.variant not in self.manifest.variants:
            raise ValueError(f"{row.key}: variant {row.variant!r} is not in the manifest {self.manifest.variants}")
        if self.has(row.key, row.variant):
            self.summary.skipped += 1
            return False
        latent = stored_array(row.latent, self.manifest.dtype)
        flip = None if row.latent_flip is None else stored_array(row.latent_flip, self.manifest.dtype)
        self._check_shape(row, latent, flip)
        for name, array in (("latent", latent), ("flipped latent", flip)):
            if array is not None and not _finite(array, self.manifest.dtype):
                self.add_error(row.key, "encode", f"non-finite values in the {name}", variant=row.variant,
                               source=row.source)
                return False
        self._rows.append(row)
        self._arrays.append((latent, flip))
        self._pending.add((row.key, row.variant))
        self._buffered_bytes += latent.nbytes * (1 if flip is None else 2)
        if (len(self._rows) >= self.shard_rows or self._buffered_bytes >= self.shard_bytes
                or time.monotonic() - self._last_commit >= self.commit_seconds):
            self.commit()
        return True

    def _check_shape(self, row: LatentRow, latent: np.ndarray, flip: np.ndarray | None) -> None:
        channels = self.manifest.encoder.stored_channels
        if latent.ndim != 3 or latent.shape[0] != channels:
            raise ValueError(f"{row.key}: latent shape {latent.shape} is not [{channels}, h, w]")
        wants_flip = self.manifest.flip == "store"
        if wants_flip and flip is None:
            raise ValueError(f"{row.key}: the manifest stores flips but no flipped latent was given")
        if not wants_flip and flip is not None:
            raise ValueError(f"{row.key}: a flipped latent was given but the manifest's flip mode is 'none'")
        if flip is not None and flip.shape != latent.shape:
            raise ValueError(f"{row.key}: flipped latent shape {flip.shape} differs from {latent.shape}")
        k = self.manifest.repa_pixels
        if not k and row.repa_image is not None:
            raise ValueError(f"{row.key}: a REPA image was given but the manifest stores none (repa_pixels 0)")
        if k:
            expected = (latent.shape[1] * k, latent.shape[2] * k, 3)
            image = row.repa_image
            if image is None or image.dtype != np.uint8 or image.shape != expected:
                got = "none" if image is None else f"{image.dtype} {tuple(image.shape)}"
                raise ValueError(f"{row.key}: the manifest stores REPA images of {k} px per latent cell, uint8 "
                                 f"{expected}; got {got}")

    def add_error(self, key: str, stage: str, message: str, *, variant: str | None = None,
                  source: str | None = None) -> bool:
        """Record a failed row once; the same (key, variant, stage) seen again is not duplicated."""
        ident = (key, variant, stage)
        if ident in self._recorded_errors:
            return False
        self._recorded_errors.add(ident)
        self._errors.append({"key": key, "variant": variant, "stage": stage, "message": message,
                             "source": source, "time": _now()})
        self.summary.errors += 1
        return True

    # -- committing ------------------------------------------------------------------------

    def commit(self) -> None:
        """Publish the buffered rows as one shard, and the buffered error rows."""
        if not self._rows and not self._errors:
            return
        seq = self._next_seq
        self._next_seq += 1
        if self._rows:
            self._commit_shard(seq)
        if self._errors:
            table = pa.Table.from_pylist(self._errors, schema=layout.ERROR_SCHEMA)
            self._write_parquet(self.root / layout.ERROR_DIR / layout.part_name(seq, self._id, layout.PART_SUFFIX),
                                table)
            self._errors = []
        self._last_commit = time.monotonic()

    def _commit_shard(self, seq: int) -> None:
        shard_name = layout.part_name(seq, self._id, layout.SHARD_SUFFIX)
        shard_path = self.root / layout.SHARD_DIR / shard_name
        rows, arrays = self._rows, self._arrays

        latents = [a.tobytes() for a, _ in arrays]
        flips = [None if f is None else f.tobytes() for _, f in arrays]
        latent_crcs = [zlib.crc32(l) for l in latents]
        flip_crcs = [None if f is None else zlib.crc32(f) for f in flips]
        repa = [None if r.repa_image is None else np.ascontiguousarray(r.repa_image).tobytes() for r in rows]
        batch = pa.record_batch(
            [pa.array([r.key for r in rows], pa.string()), pa.array([r.variant for r in rows], pa.string()),
             pa.array(latents, pa.large_binary()), pa.array(flips, pa.large_binary()),
             pa.array(latent_crcs, pa.uint32()), pa.array(flip_crcs, pa.uint32()),
             pa.array(repa, pa.large_binary()), pa.array([None if b is None else zlib.crc32(b) for b in repa],
                                                         pa.uint32())],
            schema=layout.SHARD_SCHEMA,
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, layout.SHARD_SCHEMA) as ipc:
            ipc.write_batch(batch)
        blob = sink.getvalue()
        tmp = temp_path_for(shard_path)
        with open(tmp, "wb") as fh:
            fh.write(blob)
        publish(tmp, shard_path)

        stats = ChannelStats.empty(self.manifest.encoder.channels)
        for latent, flip in arrays:
            for array in (latent, flip):
                if array is not None:
                    stats = stats.merge(ChannelStats.of(_stats_view(array, self.manifest)))
        crcs = [zlib.crc32(f, c) if f is not None else c for c, f in zip(latent_crcs, flips)]
        first = self._next_row
        index = pa.table({
            "row_id": pa.array(range(first, first + len(rows)), pa.int64()),
            "key": [r.key for r in rows],
            "variant": [r.variant for r in rows],
            "label": pa.array([r.label for r in rows], pa.int32()),
            "class_name": [r.class_name for r in rows],
            "source": [r.source for r in rows],
            "orig_w": pa.array([r.orig_w for r in rows], pa.int32()),
            "orig_h": pa.array([r.orig_h for r in rows], pa.int32()),
            "image_w": pa.array([r.image_w for r in rows], pa.int32()),
            "image_h": pa.array([r.image_h for r in rows], pa.int32()),
            "latent_c": pa.array([a.shape[0] for a, _ in arrays], pa.int32()),
            "latent_h": pa.array([a.shape[1] for a, _ in arrays], pa.int32()),
            "latent_w": pa.array([a.shape[2] for a, _ in arrays], pa.int32()),
            "flip": [f is not None for _, f in arrays],
            "shard": [shard_name] * len(rows),
            "shard_row": pa.array(range(len(rows)), pa.int32()),
            "nbytes": pa.array([a.nbytes for a, _ in arrays], pa.int64()),
            "crc32": pa.array(crcs, pa.int64()),
        }, schema=layout.INDEX_SCHEMA)
        part_meta = {
            "shard": shard_name, "shard_bytes": blob.size, "shard_blake2b": hashlib.blake2b(blob).hexdigest(),
            "rows": len(rows), "stats": stats.to_dict(), "writer": self._id, "time": _now(),
        }
        index = index.replace_schema_metadata({layout.PART_META_KEY: json.dumps(part_meta).encode()})
        self._write_deferred_manifest()
        # Publishing the index part is the moment the rows come into existence.
        self._write_parquet(self.root / layout.INDEX_DIR / layout.part_name(seq, self._id, layout.PART_SUFFIX),
                            index)

        self._committed.update(self._pending)
        self._next_row += len(rows)
        self.summary.committed += len(rows)
        self.summary.shards += 1
        self._rows, self._arrays, self._pending, self._buffered_bytes = [], [], set(), 0

    def _write_parquet(self, final: Path, table: pa.Table) -> None:
        tmp = temp_path_for(final)
        pq.write_table(table, tmp)
        publish(tmp, final)

    def close(self) -> WriteSummary:
        if self._closed:
            return self.summary
        try:
            self.commit()
            self._write_statistics()
        finally:
            self._closed = True
            self._lock_fh.close()
        return self.summary

    def _write_statistics(self) -> None:
        from nrdata.catalog.reader import merged_channel_stats  # reader imports nothing of the writer

        stats = merged_channel_stats(self.root, self.manifest.encoder.channels)
        if stats.count == 0:
            return
        normalization = Normalization(mean=tuple(stats.mean.tolist()), std=tuple(stats.std.tolist()),
                                      count=stats.count)
        self.manifest = self.manifest.with_normalization(normalization)
        # nothing committed: the statistics go into the manifest as it is on disk (see _open_manifest)
        write_manifest(self.root, (self._on_disk or self.manifest).with_normalization(normalization))

    def __enter__(self) -> CatalogWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close()
