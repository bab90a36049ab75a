"""Export to NiT's layout (WZDTHU/NiT; reference/nit.md §1 and §6).

    OUT/
      data_meta/<prefix>_<part>_meta.jsonl           one line per exported row, in catalog row order
      sampler_meta/<prefix>_<part>_<ALGO>_<L>.json   packs of JSONL line numbers (from an nr packs file,
                                                     or `nr pack --nit-json`: `pack_sampler_meta`)
      <prefix>-native-resolution/<wnid>/<stem>.safetensors
      <prefix>-256x256/<wnid>/<stem>.safetensors     one folder per variant
      nr_export.json

`prefix` is the encoder's source name (`dc-ae-f32c32-sana-1.1-diffusers`); `part` is `nr`, `256x256`
or `512x512` for one variant and `merge` for several, as in NiT's release. Each safetensors holds
`latent`, float32 [2, 32, h, w] (the image's latent, then its mirror's, times the DC-AE scaling
factor as NiT multiplies them), and `label`, int64 0-d.
NiT's config then takes `jsonl_dir` = the JSONL, `packed_json` = the sampler meta, `data_types` =
the type strings and `latent_dirs` = their folders, `image_dir` = the catalog's source root.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import pyarrow.compute as pc
import safetensors.numpy

from nrdata.interop.catalog_rows import (
    CatalogRow,
    CatalogRows,
    UnsupportedCatalogError,
    choose_variants,
    encode_hint,
    require_encoder,
    require_flips,
    require_scaling_factor,
)
from nrdata.interop.export_dir import ExportDir, ExportSummary
from nrdata.packing import Packing, epoch_row_ids, nit_sampler_meta_name, packs_info, write_nit_sampler_meta
from nrdata.packing.catalog_packs import locate, open_packs

FORMAT = "nit"
ENCODERS = ("dc-ae-f32c32",)
HINT = encode_hint("dc-ae-f32c32", "native,256,512")
NATIVE_TYPE = "native-resolution"


def nit_type(policy: dict) -> str:
    """NiT's `type` string of a native or center-crop policy."""
    if policy["kind"] == "native":
        return NATIVE_TYPE
    return f"fixed-{policy['target']}x{policy['target']}"


def type_folder(prefix: str, data_type: str) -> str:
    return f"{prefix}-{data_type.removeprefix('fixed-')}"


def meta_part(types: list[str]) -> str:
    if len(types) > 1:
        return "merge"
    return "nr" if types[0] == NATIVE_TYPE else types[0].removeprefix("fixed-")


def latent_file(row: CatalogRow) -> str:
    """`<wnid>/<stem>.safetensors` as NiT names it: the image's folder and its name up to the first dot."""
    image = PurePosixPath(row.key)
    wnid = image.parent.name or row.class_name or str(row.label)
    return f"{wnid}/{image.name.split('.')[0]}.safetensors"


def export_nit(catalog_path: str | Path, out_dir: str | Path, *, packs: str | Path | None = None,
               variant: str | None = None, prefix: str | None = None,
               progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """Write a DC-AE f32c32 catalog with stored flips in NiT's layout, resuming a partial export.

    `variant`: one native or center-crop variant (default: all of them, in one merged JSONL).
    `packs`: an nr packs file built from this catalog (with the variants exported); each of its
    epochs becomes a sampler-meta JSON of JSONL line numbers (`..._epoch<e>.json` when several).
    """
    rows = CatalogRows(catalog_path)
    manifest = rows.manifest
    require_encoder(manifest, FORMAT, ENCODERS, HINT, quantities=("mode",))
    require_flips(manifest, FORMAT, HINT)
    variants = choose_variants(rows, FORMAT, variant, ("native", "center-crop"), HINT, single=False)
    types = {v: nit_type(rows.policy(v)) for v in variants}
    prefix = prefix or (PurePosixPath(manifest.encoder.source).name or manifest.encoder.name)
    part = meta_part(list(types.values()))
    jsonl_name = f"{prefix}_{part}_meta.jsonl"
    scale = np.float32(require_scaling_factor(manifest, FORMAT))  # NiT stores latent * factor, in float32
    sampler = None if packs is None else _sampler_meta(packs, rows, variants)

    total = sum(rows.variants[v].rows for v in variants)
    options = {"variants": variants, "prefix": prefix}
    with ExportDir(out_dir, FORMAT, rows, options) as out:
        summary = out.summary
        seen: dict[str, str] = {}
        staged_jsonl = out.stage()
        with open(staged_jsonl, "w") as jsonl:
            for row in rows.rows(variants):
                name = latent_file(row)
                relative = f"{type_folder(prefix, types[row.variant])}/{name}"
                other = seen.setdefault(relative, row.key)
                if other != row.key:
                    raise UnsupportedCatalogError(
                        f"keys {other!r} and {row.key!r} both become {relative}: NiT names latents <folder>/<name up to "
                        "the first dot>; give the source images distinct names")
                if out.has(relative):
                    summary.skipped += 1
                else:
                    tensors = {"latent": np.stack([rows.stored(row), rows.stored(row, flip=True)]) * scale,
                               "label": np.array(row.label, np.int64)}
                    out.write_bytes(relative, safetensors.numpy.save(tensors))
                    summary.written += 1
                jsonl.write(json.dumps({
                    "image_file": row.source or row.key, "latent_file": name, "ori_w": row.orig_w,
                    "ori_h": row.orig_h, "latent_h": row.latent_h, "latent_w": row.latent_w,
                    "image_h": row.image_h, "image_w": row.image_w, "type": types[row.variant],
                }) + "\n")
                summary.rows += 1
                if progress:
                    progress(summary.rows, total)
        summary.outputs["data_meta"] = out.publish(staged_jsonl, f"data_meta/{jsonl_name}")
        if sampler is not None:
            (out.root / "sampler_meta").mkdir(exist_ok=True)
            name = nit_sampler_meta_name(jsonl_name, sampler.algorithm, sampler.max_tokens)
            for epoch, lines in sampler.epochs.items():
                several = len(sampler.epochs) > 1
                path = out.root / "sampler_meta" / (name.replace(".json", f"_epoch{epoch}.json") if several else name)
                summary.outputs[f"sampler_meta_epoch{epoch}" if several else "sampler_meta"] = (
                    write_nit_sampler_meta(path, lines))
    return summary


@dataclass(frozen=True)
class SamplerMeta:
    """JSONL line numbers of every pack, per epoch, and the packing's algorithm and token budget."""

    algorithm: str
    max_tokens: int
    epochs: dict[int, list[np.ndarray]]


def _sampler_meta(packs: str | Path, rows: CatalogRows, variants: list[str]) -> SamplerMeta:
    """Map a packs file's row ids to line numbers of the JSONL this export writes, refusing packs
    of another catalog or of rows the export leaves out, before anything is written."""
    table, _, _ = open_packs(packs, [rows.path])
    info = packs_info(table)
    exported = rows.row_ids(variants)  # ascending: line i of the JSONL is row exported[i]
    per_epoch = {}
    for epoch in sorted(pc.unique(table["epoch"]).to_pylist()):
        epoch_packs = epoch_row_ids(table, epoch)
        flat = np.concatenate(epoch_packs) if epoch_packs else np.empty(0, np.int64)
        lines, missing = _line_numbers(exported, flat)
        if missing is not None:
            raise UnsupportedCatalogError(
                f"{packs}: epoch {epoch} packs row {missing}, which this export leaves out "
                f"(it exports variants {variants}); pack with the same --variant as the export")
        per_epoch[epoch] = np.split(lines, np.cumsum([len(p) for p in epoch_packs])[:-1])
    return SamplerMeta(info["algorithm"], info["max_tokens"], per_epoch)


def _line_numbers(exported: np.ndarray, row_ids: np.ndarray) -> tuple[np.ndarray, int | None]:
    """(line of each row id in a JSONL of the `exported` rows in this order, the first row id that is
    not among them or None)."""
    order = np.argsort(exported, kind="stable")
    at = np.searchsorted(exported[order], row_ids)
    found = at < len(exported)
    found[found] = exported[order[at[found]]] == row_ids[found]
    if not found.all():
        return np.empty(0, np.int64), int(row_ids[~found][0])
    return order[at].astype(np.int64), None


def pack_sampler_meta(packing: Packing, metadata: dict) -> list[np.ndarray]:
    """NiT sampler-meta of a packing made by `pack_catalogs`: each pack as line numbers of the data-meta
    JSONL that `export_nit` writes for the same catalog and variants.

    With one variant selected that is the JSONL of `export_nit(catalog, variant=V)`; otherwise the
    merged JSONL of `export_nit(catalog)` (every native and center-crop variant). Several catalogs
    number their lines on, in the order packed: their JSONLs concatenated in that order. A pack of
    rows no such JSONL holds (a fit variant, say) is refused with UnsupportedCatalogError.
    """
    variants = metadata.get("variants") or []
    which, local = locate(packing.row_ids, metadata)
    lines = np.empty(len(packing.row_ids), np.int64)
    first_line = 0
    for i, record in enumerate(metadata["catalogs"]):
        rows = CatalogRows(record["path"])
        exported_variants = choose_variants(rows, FORMAT, variants[0] if len(variants) == 1 else None,
                                            ("native", "center-crop"), HINT, single=False)
        exported = rows.row_ids(exported_variants)
        mine = which == i
        found, missing = _line_numbers(exported, local[mine])
        if missing is not None:
            variant = rows.catalog.index["variant"][missing].as_py()
            raise UnsupportedCatalogError(
                f"{record['path']}: row {missing} (variant {variant!r}) is in the packs but not in the JSONL that "
                f"`nr export nit` writes (variants {exported_variants}); pack with --variant set to a native or "
                "center-crop variant")
        lines[mine] = found + first_line
        first_line += len(exported)
    offsets = packing.offsets.tolist()
    return [lines[a:b] for a, b in zip(offsets[:-1], offsets[1:])]
