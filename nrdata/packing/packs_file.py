"""The packs file: one Parquet row per pack, readable with pyarrow or ``polars.read_parquet``.

Columns:

==========  =================  =====================================================
pack_id     int64              position of the pack in its epoch's training order
epoch       int32              epoch the packing was drawn for
row_ids     list<int64>        rows (positions in the packed length array) in the pack
tokens      int64              sum of the items' token lengths (<= max_tokens)
images      int32              number of items
cost        int64              attention cost, sum of squared item lengths
step        int64 (nullable)   step of the rank assignment; null when not assigned
rank        int32 (nullable)   rank of the rank assignment; null when not assigned
==========  =================  =====================================================

Key-value metadata: ``nr.packing`` (JSON written by :func:`packs_table`: algorithm, max_tokens,
max_images, seed, epochs, efficiency, ...) and ``nr.meta`` (JSON given to :func:`write_packs`;
the catalog fingerprints go there).

`nr pack` writes the packs file with its report, plot and NiT JSON as one set (:func:`pack_outputs`):
under a lock file next to the packs file, so that two runs aimed at one output cannot interleave
their files, and each file under a temporary name renamed into place once all are written, so that
a full disk or a read-only folder leaves the previous outputs as they were and no temporary behind.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from nrdata.packing.assign import Packing

PACKING_KEY = b"nr.packing"
META_KEY = b"nr.meta"
FORMAT = "nr-packs"
FORMAT_VERSION = 1

SCHEMA = pa.schema(
    [
        ("pack_id", pa.int64()),
        ("epoch", pa.int32()),
        ("row_ids", pa.list_(pa.int64())),
        ("tokens", pa.int64()),
        ("images", pa.int32()),
        ("cost", pa.int64()),
        ("step", pa.int64()),
        ("rank", pa.int32()),
    ]
)
REQUIRED = ("pack_id", "epoch", "row_ids", "tokens", "images", "cost")


def packs_table(packings: Packing | Sequence[Packing], ranks=None) -> pa.Table:
    """Table of the packs of one or several epochs (same strategy parameters).

    ``ranks``: optional :class:`~nrdata.packing.ranks.RankAssignment` per packing (same order,
    ``None`` entries allowed) to fill the ``step``/``rank`` columns.
    """
    if isinstance(packings, Packing):
        packings = [packings]
    packings = list(packings)
    if not packings:
        raise ValueError("packs_table needs at least one Packing")
    if ranks is None:
        ranks = [None] * len(packings)
    elif not isinstance(ranks, (list, tuple)):
        ranks = [ranks]
    if len(ranks) != len(packings):
        raise ValueError(f"{len(ranks)} rank assignments for {len(packings)} packings")
    first = packings[0]
    for p in packings[1:]:
        if (p.max_tokens, p.max_images, p.algorithm, p.n_rows) != (
            first.max_tokens,
            first.max_images,
            first.algorithm,
            first.n_rows,
        ):
            raise ValueError(
                "all packings in one packs table must share algorithm, limits and rows"
            )
    epochs = [p.epoch for p in packings]
    if len(set(epochs)) != len(epochs):
        raise ValueError(f"duplicate epochs in packs table: {epochs}")

    total = sum(p.n_items for p in packings)
    list_type = pa.list_(pa.int64()) if total < 2**31 else pa.large_list(pa.int64())
    off_type = np.int32 if total < 2**31 else np.int64

    offsets = [np.zeros(1, dtype=np.int64)]
    base = 0
    for p in packings:
        offsets.append(p.offsets[1:] + base)
        base += p.n_items
    values = pa.array(np.concatenate([p.row_ids for p in packings]), type=pa.int64())
    off = pa.array(np.concatenate(offsets).astype(off_type))
    if list_type == pa.list_(pa.int64()):
        row_ids = pa.ListArray.from_arrays(off, values)
    else:
        row_ids = pa.LargeListArray.from_arrays(off, values)

    steps, rks = [], []
    for p, ra in zip(packings, ranks):
        if ra is None:
            steps.append(np.full(p.n_packs, -1, dtype=np.int64))
            rks.append(np.full(p.n_packs, -1, dtype=np.int32))
        else:
            s, r = ra.pack_step_rank(p.n_packs)
            steps.append(s)
            rks.append(r)
    step = np.concatenate(steps)
    rank = np.concatenate(rks)

    cols = {
        "pack_id": pa.array(
            np.concatenate([np.arange(p.n_packs, dtype=np.int64) for p in packings])
        ),
        "epoch": pa.array(
            np.concatenate([np.full(p.n_packs, p.epoch, np.int32) for p in packings])
        ),
        "row_ids": row_ids,
        "tokens": pa.array(np.concatenate([p.tokens for p in packings]).astype(np.int64)),
        "images": pa.array(np.concatenate([p.images for p in packings]).astype(np.int32)),
        "cost": pa.array(np.concatenate([p.cost for p in packings]).astype(np.int64)),
        "step": pa.array(step, mask=step < 0),
        "rank": pa.array(rank, mask=rank < 0),
    }
    schema = pa.schema(
        [pa.field(f.name, row_ids.type if f.name == "row_ids" else f.type) for f in SCHEMA]
    )
    info = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "algorithm": first.algorithm,
        "max_tokens": first.max_tokens,
        "max_images": first.max_images,
        "seed": first.seed,
        "epochs": epochs,
        "n_rows": first.n_rows,
        "dropped_rows": int(first.dropped.size),
        "packs": [p.n_packs for p in packings],
        "efficiency": [p.efficiency for p in packings],
        "world_size": [None if r is None else r.world_size for r in ranks],
        "rank_method": [None if r is None else r.method for r in ranks],
    }
    schema = schema.with_metadata({PACKING_KEY: json.dumps(info).encode()})
    return pa.Table.from_arrays(list(cols.values()), schema=schema)


def packs_info(table: pa.Table) -> dict:
    """The ``nr.packing`` parameters stored by :func:`packs_table` ({} when absent)."""
    md = table.schema.metadata or {}
    raw = md.get(PACKING_KEY)
    return json.loads(raw) if raw else {}


def write_packs(path, table: pa.Table, metadata: dict | None = None) -> Path:
    """Write ``table`` to ``path`` (Parquet, zstd), with ``metadata`` as JSON under ``nr.meta``.

    The file appears atomically (temporary name, fsync, rename). Returns the path.
    """
    from nrdata.catalog.atomic import publish, temp_path_for

    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"not a packs table: missing columns {missing}")
    md = dict(table.schema.metadata or {})
    md[META_KEY] = json.dumps(metadata or {}, sort_keys=True).encode()
    table = table.replace_schema_metadata(md)
    path = Path(path)
    tmp = temp_path_for(path)
    try:
        pq.write_table(table, tmp, compression="zstd")
        publish(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def packs_summary(path) -> tuple[int, list[dict]]:
    """(packs in the file over all epochs, the catalogs its metadata records), from the footer alone."""
    try:
        footer = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{path}: not a readable packs file ({exc}); make one with `nr pack`") from None
    raw = (footer.metadata or {}).get(META_KEY)
    try:
        meta = json.loads(raw) if raw else {}
    except ValueError:
        raise ValueError(f"{path}: its {META_KEY.decode()} metadata is not JSON; rebuild it with `nr pack`") from None
    return footer.num_rows, list(meta.get("catalogs") or [])


class PacksLockedError(RuntimeError):
    """Another process is writing the same packs output."""


class PackWriteError(RuntimeError):
    """A packs output could not be written (disk full, read-only folder); the previous files are intact."""


def _reason(exc: OSError) -> str:
    return f"{exc.strerror} (errno {exc.errno})" if exc.strerror else str(exc)


class PackOutputs:
    """Files that appear together: each is written to a temporary name next to its final one, and
    all are renamed into place by `publish`; `discard` removes the temporaries of a failed set."""

    def __init__(self) -> None:
        self._pending: dict[Path, Path] = {}

    def write(self, final: str | Path, write: Callable[[Path], object]) -> Path:
        """Call `write(temporary path)`; the file becomes `final` on publish. Returns `final`."""
        from nrdata.catalog.atomic import temp_path_for

        final = Path(final)
        tmp = temp_path_for(final)
        self._pending[final] = tmp
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            write(tmp)
        except OSError as exc:
            raise PackWriteError(f"cannot write {final}: {_reason(exc)}; nothing was replaced (the previous "
                                 "outputs, if any, are as they were). Free space, or choose a writable --out") from exc
        return final

    def publish(self) -> None:
        from nrdata.catalog.atomic import publish

        for final, tmp in list(self._pending.items()):
            try:
                publish(tmp, final)
            except OSError as exc:
                raise PackWriteError(f"cannot write {final}: {_reason(exc)}; free space, or choose a writable "
                                     "--out, and run `nr pack` again") from exc
            del self._pending[final]

    def discard(self) -> None:
        from nrdata.catalog.atomic import TMP_MARK

        for final, tmp in self._pending.items():
            tmp.unlink(missing_ok=True)
            # writers that publish atomically themselves leave their own temporary of our temporary
            for nested in final.parent.glob(f"{TMP_MARK}*{tmp.name}"):
                nested.unlink(missing_ok=True)
        self._pending.clear()


def lock_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def pack_outputs(out: str | Path) -> Iterator[PackOutputs]:
    """Hold the lock of packs output `out` (PacksLockedError when another process holds it) and yield
    a PackOutputs, published when the block ends normally and discarded when it raises. The parent
    folder is created. The lock file stays (removing a lock file others may have opened races)."""
    out = Path(out)
    lock = lock_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")
    except OSError as exc:
        raise PackWriteError(f"cannot write next to {out} ({lock}): {_reason(exc)}; choose a writable --out") from exc
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip()
            raise PacksLockedError(f"another `nr pack` is writing {out} (lock {lock} held by "
                                   f"{'pid ' + holder if holder else 'another process'}); wait for it to finish, "
                                   "or choose another --out") from None
        with contextlib.suppress(OSError):  # the pid only makes the message above more helpful
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
        outputs = PackOutputs()
        try:
            yield outputs
            outputs.publish()
        finally:
            outputs.discard()
    finally:
        handle.close()  # releases the lock


def read_packs(path) -> tuple[pa.Table, dict]:
    """Read a packs file: ``(table, metadata)`` where ``metadata`` is what write_packs stored.

    The packing parameters stay in the table's schema metadata (:func:`packs_info`).
    """
    table = pq.read_table(path)
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not a packs file (missing columns {missing})")
    raw = (table.schema.metadata or {}).get(META_KEY)
    return table, (json.loads(raw) if raw else {})


def epoch_row_ids(table: pa.Table, epoch: int | None = None) -> list[np.ndarray]:
    """Row ids of each pack of ``epoch`` (the only epoch when None), in ``pack_id`` order."""
    epochs = np.unique(table.column("epoch").to_numpy())
    if epoch is None:
        if epochs.size != 1:
            raise ValueError(f"packs table has epochs {epochs.tolist()}; pass epoch=")
        epoch = int(epochs[0])
    mask = table.column("epoch").to_numpy() == int(epoch)
    if not mask.any():
        raise ValueError(f"epoch {epoch} not in packs table (epochs: {epochs.tolist()})")
    sub = table.filter(pa.array(mask))
    order = np.argsort(sub.column("pack_id").to_numpy(), kind="stable")
    col = sub.column("row_ids").combine_chunks()
    offsets = col.offsets.to_numpy().astype(np.int64)
    values = col.flatten().to_numpy()
    offsets = offsets - offsets[0]
    packs = np.split(values, offsets[1:-1])
    return [packs[i] for i in order]
