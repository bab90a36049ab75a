"""Random access to a catalog's latents by row id, straight out of memory-mapped shards.

A row read is two array lookups and a slice of the mapped file: no decode, no copy. The arrays
returned are read-only views into the map (copy them before writing into them).

Row identity. A row's id is its position in the index read in file-name order, and the `row_id`
column says the same: the index parts hold ids 0..N-1, each once, in order. Every reader (pack,
loader, export, the inspect commands) goes through `Catalog.index_parts`, which checks this from the
parts' footers (no rows read) together with the shard files the parts point at, and refuses a
catalog where a part was copied, deleted or truncated, or a shard is missing or has another size
than was committed, with a `CatalogIntegrityError` that names the file. Damage inside a shard that
keeps its size is found by the checksums: the index's CRC-32 of each row (latent, then twin,
chained) and the shard's CRC-32 of each half (`ShardView.row_intact`, `Catalog.latent(verify=True)`,
the loader, `nr catalog validate`). The manifest's normalisation is a copy of the statistics the
index parts carry; `normalization_problem` says when it is not.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nrdata.catalog import layout
from nrdata.catalog.manifest import MANIFEST_NAME, Manifest, read_manifest
from nrdata.catalog.stats import ChannelStats


class CatalogIntegrityError(ValueError):
    """The catalog's files disagree with each other or with what was committed: an index part
    copied, deleted or truncated, a shard missing or damaged, statistics edited. The message names
    the file and what to do."""


class CorruptLatentError(CatalogIntegrityError):
    """A latent's bytes do not match the checksum recorded when it was written."""


def _validate_hint(root: Path) -> str:
    return f"`nr catalog validate {root}` lists every problem"


def _catalog_root(path: Path) -> Path:
    """The catalog folder of a file in one of its sub-folders (index/, shards/)."""
    return path.parent.parent


@dataclass(frozen=True)
class IndexPart:
    """What one index part's footer says, read without its rows."""

    path: Path
    meta: dict[str, Any]  # the nr.part metadata: shard, shard_bytes, shard_blake2b, rows, stats
    rows: int
    first_row: int  # smallest and largest row id it holds (-1 when it holds none)
    last_row: int

    @property
    def shard(self) -> str:
        return self.meta["shard"]

    @property
    def is_copy(self) -> bool:
        """A writer names a part after its shard: a part describing another's shard is a copy."""
        return Path(self.shard).stem != self.path.stem


_PART_KEYS = {"shard", "shard_bytes", "shard_blake2b", "rows", "stats"}


def read_part(part: Path) -> IndexPart:
    """The footer of one index part; CatalogIntegrityError when it cannot be read."""
    root = _catalog_root(part)
    try:
        footer = pq.read_metadata(part)
        raw = (footer.metadata or {}).get(layout.PART_META_KEY)
        meta = None if raw is None else json.loads(raw)
        column = footer.schema.names.index("row_id") if "row_id" in footer.schema.names else None
    except FileNotFoundError:
        raise CatalogIntegrityError(f"index part {part} disappeared while the catalog was read; "
                                    f"{_validate_hint(root)}") from None
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise CatalogIntegrityError(
            f"index part {part} is unreadable ({exc}): it was truncated or overwritten; restore it from a backup "
            f"or re-encode the catalog; {_validate_hint(root)}") from None
    if meta is None or column is None or not _PART_KEYS <= meta.keys():
        raise CatalogIntegrityError(f"{part} is not an index part written by nr (no row_id column or no nr "
                                    f"metadata); move it out of {part.parent}, then `nr catalog validate {root}`")
    first, last = _row_id_range(part, footer, column)
    return IndexPart(part, meta, footer.num_rows, first, last)


def _row_id_range(part: Path, footer, column: int) -> tuple[int, int]:
    """(min, max) of the row_id column from the footer's statistics, else from the column itself."""
    lows, highs = [], []
    for g in range(footer.num_row_groups):
        group = footer.row_group(g)
        if group.num_rows == 0:
            continue
        stats = group.column(column).statistics
        if stats is None or not stats.has_min_max:
            ids = pq.read_table(part, columns=["row_id"])["row_id"].to_numpy()
            return (int(ids.min()), int(ids.max())) if ids.size else (-1, -1)
        lows.append(int(stats.min))
        highs.append(int(stats.max))
    return (min(lows), max(highs)) if lows else (-1, -1)


def read_parts(root: Path) -> list[IndexPart]:
    return [read_part(p) for p in layout.listing(Path(root) / layout.INDEX_DIR, layout.PART_SUFFIX)]


def index_problems(root: Path, parts: list[IndexPart], *, ranges: bool = True) -> list[str]:
    """Why `parts` (in file-name order) do not hold row ids 0..N-1 once each, or do not point at the
    shard files committed with them; [] when they do. Each problem is one line naming the files.
    `ranges=False` checks the shards only (when some parts could not be read, their ids are unknown)."""
    root = Path(root)
    problems: list[str] = []
    indexed = {p.path.stem for p in parts}
    orphans = [s.name for s in layout.listing(root / layout.SHARD_DIR, layout.SHARD_SUFFIX) if s.stem not in indexed]
    expected, earlier = 0, []
    for part in parts:
        name = f"index/{part.path.name}"
        if part.rows and ranges:
            first, last = part.first_row, part.last_row
            if first < expected:  # some of these ids are already held by an earlier part
                other = next((p for p in earlier if p.first_row <= last and first <= p.last_row), earlier[-1])
                copy = next((p for p in (part, other) if p.is_copy), None)
                fix = (f"index/{copy.path.name} is a copy (it describes shard {copy.shard}): remove the copy"
                       if copy else "restore the index from a backup or re-encode the catalog")
                problems.append(
                    f"index parts index/{other.path.name} and {name} both hold row ids {max(first, other.first_row)}.."
                    f"{min(last, other.last_row)}; {fix}, then `nr catalog validate {root}`")
            elif first > expected:
                lost = f" (shards without an index part: {_some(orphans)})" if orphans else ""
                problems.append(
                    f"row ids {expected}..{first - 1} are in no index part ({name} starts at {first}): an index part "
                    f"was deleted{lost}; restore it from a backup or re-encode the catalog, then "
                    f"`nr catalog validate {root}`")
            elif last - first + 1 != part.rows:
                problems.append(f"{name} holds {part.rows} rows but row ids {first}..{last}: it was rewritten by "
                                f"another tool; restore it from a backup or re-encode the catalog")
            expected = max(expected, last + 1)
            earlier.append(part)
        shard = root / layout.SHARD_DIR / part.shard
        try:
            size = shard.stat().st_size
        except FileNotFoundError:
            problems.append(f"shard {shard} is missing ({part.rows} rows lost: {name} points at it); restore it "
                            f"from a backup or re-encode the catalog; {_validate_hint(root)}")
            continue
        if size != part.meta["shard_bytes"]:
            problems.append(f"shard {shard} is {size:,} bytes but {part.meta['shard_bytes']:,} were committed: it "
                            f"was truncated or overwritten; restore it from a backup or re-encode the catalog; "
                            f"{_validate_hint(root)}")
    return problems


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def merged_stats(parts: list[IndexPart], channels: int) -> ChannelStats:
    stats = ChannelStats.empty(channels)
    for part in parts:
        stats = stats.merge(ChannelStats.from_dict(part.meta["stats"]))
    return stats


def merged_channel_stats(root: Path, channels: int) -> ChannelStats:
    """Per-channel statistics of every committed latent, from the shards' own summaries."""
    return merged_stats(read_parts(root), channels)


# The manifest's statistics are a copy of the merged shard statistics, written when a writer closes
# the catalog; a difference beyond float round-off means the manifest was edited or parts came and
# went since.
_STATS_RTOL = 1e-6


def normalization_problem(root: Path, manifest: Manifest, stats: ChannelStats, orphans: list[str] = ()) -> str | None:
    """Why the manifest's normalisation is not the statistics of the committed shards; None when it is
    (or when the manifest records none yet: the callers that need statistics say so)."""
    norm = manifest.normalization
    if not norm.ready:
        return None
    where = Path(root) / MANIFEST_NAME
    if norm.count != stats.count:
        lost = f" (shards without an index part: {_some(list(orphans))})" if orphans else ""
        return (f"{where}: the normalisation statistics cover {norm.count:,} latent values per channel but the index "
                f"parts hold {stats.count:,}: parts were added or removed after the last encode finished{lost}; "
                "re-run the `nr encode` command that made the catalog (it completes the catalog and rewrites the "
                f"statistics) or restore the missing parts, then `nr catalog validate {root}`")
    for name, recorded, actual in (("mean", norm.mean, stats.mean), ("std", norm.std, stats.std)):
        recorded = np.asarray(recorded, np.float64)
        if recorded.shape != actual.shape:
            return (f"{where}: normalization.{name} has {recorded.size} channels, the shards {actual.size}: the "
                    "manifest was edited; restore it from a backup or re-run the `nr encode` command that made the "
                    "catalog (it rewrites the statistics)")
        off = np.flatnonzero(np.abs(recorded - actual) > _STATS_RTOL * np.maximum(np.abs(actual), 1e-12))
        if off.size:
            c = int(off[0])
            return (f"{where}: normalization.{name}[{c}] is {recorded[c]:.6g} but the shards' own statistics give "
                    f"{actual[c]:.6g} ({off.size} channel(s) differ): the manifest was edited by hand; restore it from a "
                    "backup or re-run the `nr encode` command that made the catalog (it rewrites the statistics)")
    return None


def rows_by_shard(index: pa.Table) -> tuple[list[str], np.ndarray, list[np.ndarray]]:
    """The shard files an index's rows live in (sorted names), each row's position in that list, and
    for each shard its rows in index order: the grouping that lets a reader open every shard once."""
    names, shard_of = np.unique(index["shard"].to_numpy(zero_copy_only=False), return_inverse=True)
    by_shard = np.argsort(shard_of, kind="stable")
    bounds = np.searchsorted(shard_of[by_shard], np.arange(len(names) + 1))
    return names.tolist(), shard_of, [by_shard[bounds[s]: bounds[s + 1]] for s in range(len(names))]


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
        root = _catalog_root(path)
        try:
            self._map = pa.memory_map(str(path))
            reader = pa.ipc.open_file(self._map)
            count = reader.num_record_batches
            batch = reader.get_batch(0) if count == 1 else None
        except FileNotFoundError:
            raise CatalogIntegrityError(f"shard {path} is missing; restore it from a backup or re-encode the "
                                        f"catalog; {_validate_hint(root)}") from None
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise CatalogIntegrityError(f"shard {path} is unreadable ({exc}): it was truncated or overwritten; "
                                        f"restore it from a backup or re-encode the catalog; "
                                        f"{_validate_hint(root)}") from None
        if batch is None:
            raise CatalogIntegrityError(f"shard {path}: expected one record batch, found {count}; "
                                        f"{_validate_hint(root)}")
        self.num_rows = batch.num_rows
        self.keys = batch.column("key")
        self.variants = batch.column("variant")
        self.latent = _binary_view(batch.column("latent"))
        flip = batch.column("latent_flip")
        self.flip = _binary_view(flip) if flip.null_count < len(flip) else None
        # each half's own CRC-32, per shard row: (latent, twin or None); None for shards written
        # before the columns existed, which only have the index's chained checksum
        self.half_crcs: tuple[np.ndarray, np.ndarray | None] | None = None
        if "latent_crc32" in batch.schema.names:
            twin = batch.column("latent_flip_crc32")
            self.half_crcs = (batch.column("latent_crc32").to_numpy(),
                              twin.to_numpy() if self.flip is not None and twin.null_count == 0 else None)
        # (offsets, data) and CRC-32 per shard row of the stored REPA images; None when there are none
        self.repa: tuple[np.ndarray, np.ndarray] | None = None
        self.repa_crcs: np.ndarray | None = None
        if "repa_image" in batch.schema.names and batch.column("repa_image").null_count == 0 and batch.num_rows:
            self.repa = _binary_view(batch.column("repa_image"))
            self.repa_crcs = batch.column("repa_image_crc32").to_numpy()

    def row_bytes(self, row: int, flip: bool = False) -> np.ndarray:
        view = self.flip if flip else self.latent
        if view is None:
            raise KeyError(f"{self.path.name}: no flipped latents stored")
        offsets, data = view
        return data[offsets[row]: offsets[row + 1]]

    def row_intact(self, row: int, twin: bool, recorded: int) -> bool:
        """True when row `row`'s bytes (latent, then its twin when `twin`) have the CRC-32 its index row
        recorded, and each half the CRC the shard keeps for it."""
        latent = zlib.crc32(self.row_bytes(row))
        second = zlib.crc32(self.row_bytes(row, True)) if twin else None
        chained = latent if second is None else zlib.crc32(self.row_bytes(row, True), latent)
        if chained != recorded:
            return False
        if self.half_crcs is None:
            return True
        mine, theirs = self.half_crcs
        return latent == mine[row] and (second is None or (theirs is not None and second == theirs[row]))


class Catalog:
    """A catalog opened for reading. Cheap to open; the index loads on first use, and is checked then
    (see the module docstring: a broken index raises CatalogIntegrityError)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.manifest: Manifest = read_manifest(self.root)
        self._shards: dict[int, ShardView] = {}

    # -- the index -------------------------------------------------------------------------

    @cached_property
    def parts(self) -> list[IndexPart]:
        """The index parts' footers, in file-name order, checked against each other and the shards."""
        parts = read_parts(self.root)
        problems = index_problems(self.root, parts)
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise CatalogIntegrityError(problems[0] + more)
        return parts

    @cached_property
    def index_parts(self) -> list[Path]:
        return [p.path for p in self.parts]

    @cached_property
    def index(self) -> pa.Table:
        """The whole index as one Arrow table, rows in row-id order."""
        if not self.index_parts:
            return layout.INDEX_SCHEMA.empty_table()
        tables = []
        for part in self.index_parts:
            try:
                tables.append(pq.read_table(part, schema=layout.INDEX_SCHEMA))
            except (OSError, ValueError, pa.ArrowException) as exc:  # a footer intact over damaged pages
                raise CatalogIntegrityError(f"index part {part} is unreadable ({exc}); restore it from a backup or "
                                            f"re-encode the catalog; {_validate_hint(self.root)}") from None
        index = pa.concat_tables(tables)
        # the footers' ranges were checked; this catches ids out of order inside a part
        if not np.array_equal(index["row_id"].to_numpy(), np.arange(index.num_rows)):
            starts = np.cumsum([0] + [t.num_rows for t in tables])
            bad = next(i for i, t in enumerate(tables)
                       if not np.array_equal(t["row_id"].to_numpy(), np.arange(starts[i], starts[i + 1])))
            raise CatalogIntegrityError(
                f"index part {self.index_parts[bad]}: row ids are not {starts[bad]}..{starts[bad + 1] - 1} in order; "
                f"it was rewritten by another tool: restore it from a backup or re-encode the catalog")
        return index

    def scan(self):
        """The index as a polars LazyFrame (the same thing a user gets with scan_parquet)."""
        import polars as pl

        if not self.index_parts:
            return pl.from_arrow(layout.INDEX_SCHEMA.empty_table()).lazy()
        return pl.scan_parquet([str(p) for p in self.index_parts])

    def __len__(self) -> int:
        return self.index.num_rows

    @cached_property
    def orphan_shards(self) -> list[str]:
        """Shard files no index part describes: left by a writer killed between the two renames of a
        commit (removed by the next writer), or by an index part deleted since."""
        indexed = {p.path.stem for p in self.parts}
        return [s.name for s in layout.listing(self.root / layout.SHARD_DIR, layout.SHARD_SUFFIX)
                if s.stem not in indexed]

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
            self.verify_row(row_id)
        raw = shard.row_bytes(shard_row, flip)
        shape = (int(loc["latent_c"][row_id]), int(loc["latent_h"][row_id]), int(loc["latent_w"][row_id]))
        return raw.view(self.numpy_dtype).reshape(shape)

    def verify_row(self, row_id: int) -> None:
        """Recompute a row's checksums with zlib; CorruptLatentError on a mismatch."""
        loc = self._locator
        shard = self._shard(int(loc["shard"][row_id]))
        twin = shard.flip is not None and bool(loc["flip"][row_id])
        if not shard.row_intact(int(loc["shard_row"][row_id]), twin, int(loc["crc32"][row_id])):
            raise CorruptLatentError(self.corrupt_row_message(row_id))

    def corrupt_row_message(self, row_id: int) -> str:
        row = self.index.slice(row_id, 1).to_pylist()[0]
        return (f"shard {self.root / layout.SHARD_DIR / row['shard']} row {row['shard_row']} (catalog row {row_id}, "
                f"key {row['key']}, variant {row['variant']}): the latent bytes do not match the checksum recorded when they "
                f"were written; run `nr catalog validate {self.root}` to list every damaged row, then restore the "
                "shard from a backup or re-encode the catalog")

    def repa_image(self, row_id: int, *, flip: bool = False) -> np.ndarray:
        """The stored REPA image of one row, uint8 [h*k, w*k, 3] (a read-only view of the shard file;
        mirrored left-right with `flip`, the view of its flipped twin). KeyError when none is stored."""
        k = self.manifest.repa_pixels
        if not k:
            raise KeyError(f"catalog {self.root} stores no REPA images (its manifest's repa_pixels is 0)")
        loc = self._locator
        if not 0 <= row_id < len(loc["shard"]):
            raise IndexError(f"row id {row_id} is outside the catalog's {len(loc['shard'])} rows")
        shard = self._shard(int(loc["shard"][row_id]))
        if shard.repa is None:
            raise CatalogIntegrityError(f"shard {shard.path} holds no REPA images though the manifest says they "
                                        f"are stored; {_validate_hint(self.root)}")
        offsets, data = shard.repa
        row = int(loc["shard_row"][row_id])
        image = data[offsets[row]: offsets[row + 1]].reshape(int(loc["latent_h"][row_id]) * k,
                                                             int(loc["latent_w"][row_id]) * k, 3)
        return image[:, ::-1] if flip else image

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
        return merged_stats(self.parts, self.manifest.encoder.channels)

    def check_normalization(self) -> None:
        """CatalogIntegrityError when the manifest's normalisation is not the shards' own statistics."""
        problem = normalization_problem(self.root, self.manifest, self.channel_stats(), self.orphan_shards)
        if problem:
            raise CatalogIntegrityError(problem)

    def content_fingerprint(self) -> str:
        """Changes whenever a row is added or any shard's bytes change: packs record it so that a
        loader refuses packs built for other contents."""
        digest = hashlib.sha256(self.manifest.fingerprint.encode())
        for part in self.parts:
            digest.update(f"{part.path.name}:{part.meta['rows']}:{part.meta['shard_blake2b']}".encode())
        return digest.hexdigest()[:16]
