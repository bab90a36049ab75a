"""Packs built from catalogs: which rows, how many tokens each, and the fingerprints that tie a
packs file to the exact catalog contents it was built from.

Row ids in a packs file are *merged* ids: the rows of the first catalog, then those of the second
shifted by the first's row count, and so on (NiT's `merge` of its three variants works the same
way). The metadata lists every catalog with its row offset, so `locate` maps ids back.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nrdata.catalog import Catalog
from nrdata.packing.assign import Packing, pack_epochs
from nrdata.packing.packs_file import packs_table, read_packs, write_packs
from nrdata.packing.ranks import RankAssignment, assign_ranks
from nrdata.version import code_version


class PacksMismatchError(RuntimeError):
    """A packs file does not belong to the catalogs it is used with."""


@dataclass(frozen=True)
class RowSelection:
    lengths: np.ndarray  # tokens per selected row
    row_ids: np.ndarray  # merged row id of each selected row
    catalogs: list[dict]  # path, fingerprints, rows, row_offset of every catalog


@dataclass
class PackResult:
    packings: list[Packing]  # row ids already merged ids
    ranks: list[RankAssignment]
    selection: RowSelection
    metadata: dict


def select_rows(paths: list[str | Path], *, patch_size: int = 1, variants: list[str] | None = None) -> RowSelection:
    """Token lengths of the rows of one or several catalogs, optionally only some variants."""
    if patch_size < 1:
        raise ValueError(f"patch size must be >= 1, got {patch_size}")
    lengths, row_ids, catalogs = [], [], []
    offset = 0
    first = None
    for path in paths:
        cat = Catalog(path)
        m = cat.manifest
        if first is None:
            first = m
        elif (m.encoder.name, m.encoder.stored_channels, m.encoder.factor) != (
                first.encoder.name, first.encoder.stored_channels, first.encoder.factor):
            raise ValueError(f"{path}: encoder {m.encoder.name} ({m.encoder.stored_channels} channels, f{m.encoder.factor}) "
                             f"differs from the first catalog's {first.encoder.name}; one model reads one kind of latent")
        index = cat.index
        if variants:
            unknown = set(variants) - set(m.variants)
            if unknown == set(variants):
                raise ValueError(f"{path}: none of the variants {sorted(variants)} is in this catalog "
                                 f"(it has {list(m.variants)})")
            index = index.filter(pc.is_in(index["variant"], value_set=pa.array(variants)))
        h = index["latent_h"].to_numpy().astype(np.int64)
        w = index["latent_w"].to_numpy().astype(np.int64)
        bad = np.flatnonzero((h % patch_size) | (w % patch_size))
        if bad.size:
            rid = int(index["row_id"][int(bad[0])].as_py())
            raise ValueError(f"{path}: {bad.size} rows have latent sizes that patch size {patch_size} does not divide "
                             f"(e.g. row {rid}: {h[bad[0]]}x{w[bad[0]]}); pack with a patch size that divides them "
                             "or re-encode with unit = factor x patch")
        lengths.append((h // patch_size) * (w // patch_size))
        row_ids.append(index["row_id"].to_numpy() + offset)
        catalogs.append({"path": str(Path(path).resolve()), "fingerprint": m.fingerprint,
                         "content_fingerprint": cat.content_fingerprint(), "rows": len(cat), "row_offset": offset})
        offset += len(cat)
    if not catalogs:
        raise ValueError("no catalogs given")
    return RowSelection(np.concatenate(lengths), np.concatenate(row_ids), catalogs)


def pack_catalogs(paths: list[str | Path], *, max_tokens: int, algorithm: str = "lpfhp", patch_size: int = 1,
                  variants: list[str] | None = None, max_images: int | None = None, seed: int = 0,
                  epochs: int = 1, world_size: int = 1, on_too_long: str = "error") -> PackResult:
    selection = select_rows(paths, patch_size=patch_size, variants=variants)
    local = pack_epochs(selection.lengths, max_tokens, epochs, algorithm=algorithm, max_images=max_images,
                        seed=seed, on_too_long=on_too_long)
    # ranks are balanced on the packs' costs, which do not depend on how rows are numbered
    ranks = [assign_ranks(p, world_size) for p in local]
    packings = [dataclasses.replace(p, row_ids=selection.row_ids[p.row_ids], dropped=selection.row_ids[p.dropped])
                for p in local]
    metadata = {
        "catalogs": selection.catalogs, "variants": variants, "patch_size": patch_size, "max_tokens": max_tokens,
        "algorithm": algorithm, "max_images": max_images, "seed": seed, "epochs": epochs, "world_size": world_size,
        "on_too_long": on_too_long, "dropped": int(local[0].dropped.size) if local else 0,
        "code_version": code_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    return PackResult(packings, ranks, selection, metadata)


def write_pack_result(path: str | Path, result: PackResult) -> Path:
    return write_packs(path, packs_table(result.packings, result.ranks), result.metadata)


def open_packs(path: str | Path, catalogs: list[str | Path] | None = None):
    """Read a packs file and the catalogs it was built from, refusing any whose contents changed.

    `catalogs` overrides the recorded paths (catalogs that moved); they are matched in order.
    Returns (table, metadata, [Catalog, ...]).
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such packs file; make one with `nr pack CATALOG -L MAX_TOKENS --out {path}`")
    table, metadata = read_packs(path)
    recorded = metadata.get("catalogs")
    if not recorded:
        raise PacksMismatchError(f"{path}: the packs file records no catalogs; rebuild it with `nr pack`")
    paths = [c["path"] for c in recorded] if catalogs is None else [str(p) for p in catalogs]
    if len(paths) != len(recorded):
        raise PacksMismatchError(f"{path}: built from {len(recorded)} catalogs, {len(paths)} given")
    opened = []
    for given, record in zip(paths, recorded):
        cat = Catalog(given)
        now = cat.content_fingerprint()
        if now != record["content_fingerprint"]:
            raise PacksMismatchError(
                f"{given}: catalog contents changed since {path} was packed (content fingerprint {now}, packs built "
                f"for {record['content_fingerprint']}); re-run `nr pack` on the catalog as it is now"
            )
        opened.append(cat)
    return table, metadata, opened


def locate(row_ids: np.ndarray, metadata: dict) -> tuple[np.ndarray, np.ndarray]:
    """(catalog position, row id inside that catalog) of merged row ids."""
    offsets = np.array([c["row_offset"] for c in metadata["catalogs"]], np.int64)
    which = np.searchsorted(offsets, row_ids, side="right") - 1
    return which, row_ids - offsets[which]
