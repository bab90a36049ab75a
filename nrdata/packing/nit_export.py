"""Export to NiT's sampler-meta JSON (``reference/nit.md`` §1.2).

The file is a JSON list of packs, each a list of 0-based line numbers of the data-meta JSONL the
packing was built from (no header, no lengths). Catalog row ids are not line numbers: a JSONL holds
only the exported rows. `nrdata.interop.nit.pack_sampler_meta` turns packs of catalog rows into the
line numbers of the JSONL that `nr export nit` writes; this module only names and writes the file.
"""

from __future__ import annotations

import json
from pathlib import Path
import numpy as np


def nit_sampler_meta_name(data_meta: str | Path, algorithm: str, max_tokens: int) -> str:
    """NiT's file name: ``<data-meta name minus "_meta.jsonl">_<ALGO>_<L>.json``."""
    name = Path(data_meta).name
    stem = name[: -len("_meta.jsonl")] if name.endswith("_meta.jsonl") else Path(name).stem
    return f"{stem}_{algorithm.upper()}_{int(max_tokens)}.json"


def write_nit_sampler_meta(path, packs_row_ids, *, indent: int | None = None) -> Path:
    """Write packs as NiT sampler-meta JSON: ``[[row, row, ...], ...]``.

    ``packs_row_ids``: a :class:`~nrdata.packing.Packing` or an iterable of per-pack row-id
    sequences (e.g. :func:`~nrdata.packing.epoch_row_ids` of a packs table). NiT writes with
    ``indent=4``; the default here is compact (same content, about 5x smaller). Atomic write.
    """
    from nrdata.catalog.atomic import atomic_write_bytes

    if hasattr(packs_row_ids, "row_ids") and hasattr(packs_row_ids, "offsets"):
        flat = packs_row_ids.row_ids.tolist()
        off = packs_row_ids.offsets.tolist()
        packs = [flat[a:b] for a, b in zip(off[:-1], off[1:])]
    else:
        packs = []
        for p in packs_row_ids:
            a = np.asarray(p)
            if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 0):
                raise ValueError(f"row ids must be non-negative integers, got {a[:5]!r}...")
            packs.append(a.astype(np.int64).tolist())
    data = json.dumps(packs, indent=indent, separators=None if indent else (",", ":"))
    path = Path(path)
    atomic_write_bytes(path, data.encode())
    return path
