"""Full consistency check of a catalog: manifest against index against shards against checksums, and
the manifest's normalisation against the shards' own statistics."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nrdata.catalog import layout
from nrdata.catalog.atomic import is_temp
from nrdata.catalog.manifest import ManifestError, read_manifest
from nrdata.catalog.reader import (
    CatalogIntegrityError,
    IndexPart,
    ShardView,
    index_problems,
    merged_stats,
    normalization_problem,
    read_part,
)

_MAX_LISTED = 20  # problems of one kind listed by name before they are only counted


@dataclass
class ValidationReport:
    root: Path
    problems: list[str] = field(default_factory=list)  # the catalog is not trustworthy
    warnings: list[str] = field(default_factory=list)  # harmless leftovers, cleaned by the next writer
    rows: int = 0
    shards: int = 0
    errors: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def _sha_file(path: Path) -> tuple[str, int]:
    digest, size = hashlib.blake2b(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 22):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def validate_catalog(root: str | Path, *, checksums: bool = True,
                     progress: Callable[[int, int], None] | None = None) -> ValidationReport:
    """Check everything that can be checked; never raises for a broken catalog.

    `checksums=False` skips hashing shard bytes (structure only, much faster on big catalogs).
    `progress(done, total)` is called once per shard.
    """
    report = ValidationReport(Path(root))
    root = report.root
    try:
        manifest = read_manifest(root)
    except ManifestError as exc:
        report.problems.append(str(exc))
        return report

    parts = layout.listing(root / layout.INDEX_DIR, layout.PART_SUFFIX)
    shard_files = {p.name for p in layout.listing(root / layout.SHARD_DIR, layout.SHARD_SUFFIX)}
    described: set[str] = set()
    seen: dict[tuple[str, str], int] = {}
    duplicates: list[str] = []
    footers: list[IndexPart] = []
    unreadable = 0

    for done, part in enumerate(parts):
        if progress:
            progress(done, len(parts))
        try:
            footer = read_part(part)
            table = pq.read_table(part)
        except CatalogIntegrityError as exc:
            report.problems.append(str(exc))
            unreadable += 1
            continue
        except Exception as exc:  # noqa: BLE001 - any unreadable part is a problem to report
            report.problems.append(f"index/{part.name}: unreadable ({type(exc).__name__}: {exc})")
            unreadable += 1
            continue
        missing = [f.name for f in layout.INDEX_SCHEMA if f.name not in table.column_names]
        if missing:
            report.problems.append(f"index/{part.name}: missing columns {missing}")
            continue
        footers.append(footer)
        report.rows += table.num_rows
        row_ids = table["row_id"].to_numpy()
        # how the parts' ranges fit together is index_problems' to say; inside a part, ids run in order
        if not np.array_equal(row_ids, np.arange(footer.first_row, footer.first_row + table.num_rows)):
            report.problems.append(f"index/{part.name}: row ids are not {footer.first_row}.."
                                   f"{footer.first_row + table.num_rows - 1} in order")
        for key, variant, rid in zip(table["key"].to_pylist(), table["variant"].to_pylist(), row_ids.tolist()):
            if (key, variant) in seen:
                duplicates.append(f"{key} (variant {variant}) at rows {seen[(key, variant)]} and {rid}")
            else:
                seen[(key, variant)] = rid
        bad_variants = set(table["variant"].to_pylist()) - set(manifest.variants)
        if bad_variants:
            report.problems.append(f"index/{part.name}: variants {sorted(bad_variants)} not in the manifest")
        _check_rows(report, root, manifest, part.name, footer.meta, table, shard_files, described, checksums)

    # row ids 0..N-1 once each across the parts (unless a part could not be read: its ids are not
    # known), every shard present with its committed size
    structure = index_problems(root, footers, ranges=not unreadable)
    report.problems.extend(structure)
    if not unreadable and not structure:  # the statistics of a broken index say nothing more
        orphans = sorted(shard_files - described)
        problem = normalization_problem(root, manifest, merged_stats(footers, manifest.encoder.channels), orphans)
        if problem:
            report.problems.append(problem)
        elif not manifest.normalization.ready and report.rows:
            report.warnings.append("the manifest has no normalisation statistics yet: the encode that wrote it did "
                                   "not finish; re-run it (it skips the committed rows and writes them)")
    if duplicates:
        report.problems.append(f"{len(duplicates)} duplicated (key, variant): " + "; ".join(duplicates[:_MAX_LISTED]))
    orphans = sorted(shard_files - described)
    if orphans:
        report.warnings.append(f"{len(orphans)} shard(s) without an index part (left by an interrupted write, "
                               f"removed by the next writer; or their index part was deleted): "
                               f"{', '.join(orphans[:_MAX_LISTED])}")
    for sub in (layout.INDEX_DIR, layout.SHARD_DIR, layout.ERROR_DIR):
        temps = [p.name for p in (root / sub).glob("*") if is_temp(p)] if (root / sub).is_dir() else []
        if temps:
            report.warnings.append(f"{sub}/: {len(temps)} temporary file(s) from an interrupted write")
    for part in layout.listing(root / layout.ERROR_DIR, layout.PART_SUFFIX):
        try:
            report.errors += pq.read_metadata(part).num_rows
        except Exception as exc:  # noqa: BLE001
            report.problems.append(f"errors/{part.name}: unreadable ({type(exc).__name__}: {exc})")
    if progress:
        progress(len(parts), len(parts))
    return report


def _check_rows(report: ValidationReport, root: Path, manifest, part_name: str, meta: dict, table: pa.Table,
                shard_files: set[str], described: set[str], checksums: bool) -> None:
    shard_name = meta.get("shard")
    described.add(shard_name)
    where = f"index/{part_name}"
    names = set(table["shard"].to_pylist())
    if names - {shard_name}:
        report.problems.append(f"{where}: rows point at shards {sorted(names - {shard_name})}, "
                               f"but the part describes {shard_name}")
    if shard_name not in shard_files:  # reported by index_problems, with the rows lost
        return
    path = root / layout.SHARD_DIR / shard_name
    report.shards += 1
    if path.stat().st_size != meta["shard_bytes"]:  # truncated or overwritten: reported by index_problems
        return
    if checksums:
        digest, size = _sha_file(path)
        report.bytes_checked += size
        if digest != meta["shard_blake2b"]:
            report.problems.append(f"shards/{shard_name}: content differs from what was committed "
                                   f"(BLAKE2b checksum mismatch; the rows that differ follow)")
    try:
        shard = ShardView(path)
    except Exception as exc:  # noqa: BLE001
        report.problems.append(f"shards/{shard_name}: unreadable ({type(exc).__name__}: {exc})")
        return
    if shard.num_rows != meta["rows"]:
        report.problems.append(f"shards/{shard_name}: holds {shard.num_rows} rows, its index part says {meta['rows']}")

    bad: list[str] = []
    shard_keys = shard.keys.to_pylist()
    itemsize = manifest.itemsize
    columns = [table[c].to_pylist() for c in ("row_id", "key", "shard_row", "latent_c", "latent_h", "latent_w",
                                               "nbytes", "flip", "crc32")]
    for row_id, key, shard_row, c, h, w, nbytes, flip, crc in zip(*columns):
        if not 0 <= shard_row < shard.num_rows:
            bad.append(f"row {row_id} ({key}) points at shard row {shard_row} of {shard.num_rows}")
            continue
        if shard_keys[shard_row] != key:
            bad.append(f"row {row_id} ({key}) points at {shard_name} row {shard_row}, which holds {shard_keys[shard_row]}")
            continue
        if c != manifest.encoder.stored_channels:
            bad.append(f"row {row_id} ({key}) has {c} channels, the manifest says {manifest.encoder.stored_channels}")
        raw = shard.row_bytes(shard_row)
        if not (nbytes == raw.size == c * h * w * itemsize):
            bad.append(f"row {row_id} ({key}): {raw.size} bytes stored, {nbytes} recorded, shape needs {c * h * w * itemsize}")
            continue
        if flip and shard.flip is None:
            bad.append(f"row {row_id} ({key}) claims a flipped twin that the shard does not hold")
            continue
        if checksums and not shard.row_intact(shard_row, flip, crc):
            bad.append(f"row {row_id} ({key}): checksum mismatch (corrupt bytes)")
    if bad:
        shown = "; ".join(bad[:_MAX_LISTED])
        more = f" (+{len(bad) - _MAX_LISTED} more)" if len(bad) > _MAX_LISTED else ""
        report.problems.append(f"shards/{shard_name}: {len(bad)} bad row(s): {shown}{more}")
