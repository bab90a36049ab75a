"""Export to FiT's latent layout (whlzy/FiT, fit/data/in1k_latent_dataset.py; reference/peers.md §1.1).

    OUT/
      less_than_16/<stem>.safetensors              fewer than 16 tokens (FiT's loader never reads them)
      from_16_to_<L>/<stem>.safetensors            images kept at their size (area below S²)
      greater_than_<L>_resize/<stem>.safetensors   images scaled down to area S²
      greater_than_<L>_crop/<stem>.safetensors     their S×S centre crops, if larger than S on both sides
      nr_export.json

S is the fit variant's target and L = (S / 16)² tokens (256 for S = 256, 1024 for S = 512): FiT's
`data_path` is OUT and its `target_len` is L. Each file holds `feature`, float32 [2, h, w, 16] (the
image's latent and its mirror's, patchified 2×2 in FiT's (c p1 p2) order), `grid`, int32 [2, h·w]
(row 0 the w index, row 1 the h index, raster order), `size`, int32 [2] = (h, w) in tokens, and
`label`, int64 [1]. Latents are SD-VAE latents times the scaling factor (0.18215), drawn from
stored moments by sampling unless draw="mode". Crops come from the catalog's center-crop variant
of size S when it has one; the loader pairs them with their resized file by name.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Callable

import numpy as np
import safetensors.numpy

from nrdata.interop.catalog_rows import (
    CatalogRow,
    CatalogRows,
    UnsupportedCatalogError,
    choose_variants,
    encode_hint,
    peer_latent,
    require_encoder,
    require_flips,
    require_scaling_factor,
    row_rng,
)
from nrdata.interop.export_dir import ExportDir, ExportSummary

FORMAT = "fit"
ENCODERS = ("sd-vae-ft-ema", "sd-vae-ft-mse")  # one encoder: ft-EMA and ft-MSE retrained only the decoder
PATCH = 2
MIN_TOKENS = 16


def patchify(latent: np.ndarray) -> np.ndarray:
    """[C, 2h, 2w] -> [h, w, C·4], channels in (c p1 p2) order as FiT's unpatchify expects."""
    c, h2, w2 = latent.shape
    return latent.reshape(c, h2 // PATCH, PATCH, w2 // PATCH, PATCH).transpose(1, 3, 0, 2, 4).reshape(
        h2 // PATCH, w2 // PATCH, c * PATCH * PATCH)


def token_grid(h: int, w: int) -> np.ndarray:
    """[2, h·w]: the w index of every token, then its h index, in raster order."""
    return np.stack([np.tile(np.arange(w, dtype=np.int32), h), np.repeat(np.arange(h, dtype=np.int32), w)])


def export_fit(catalog_path: str | Path, out_dir: str | Path, *, variant: str | None = None, draw: str = "sample",
               seed: int = 0, progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """Write an SD-VAE catalog's fit variant (with stored flips) in FiT's layout, resuming a partial export.

    `variant`: the fit variant (default: the catalog's only one). `draw`/`seed`: how latents are
    drawn from stored moments; each row has its own generator, so a resumed export draws the same.
    """
    rows = CatalogRows(catalog_path)
    manifest = rows.manifest
    hint = encode_hint("sd-vae-ft-ema", "fit:256,256", patch_size=PATCH)
    require_encoder(manifest, FORMAT, ENCODERS, hint)
    require_flips(manifest, FORMAT, hint)
    scale = require_scaling_factor(manifest, FORMAT)
    (fit_variant,) = choose_variants(rows, FORMAT, variant, ("fit",), hint, single=True)
    policy = rows.policy(fit_variant)
    size = policy["target"]
    if policy["unit"] != manifest.encoder.factor * PATCH:
        raise UnsupportedCatalogError(
            f"FiT takes 2x2 patches of f{manifest.encoder.factor} latents, so its sizes are multiples of "
            f"{manifest.encoder.factor * PATCH} px; variant {fit_variant!r} has unit {policy['unit']}; encode with: {hint}")
    crop_variant = next((p["variant"] for p in manifest.policies
                         if p["kind"] == "center-crop" and p.get("target") == size and p["variant"] in rows.variants), None)
    if crop_variant is not None:  # the same checks (labels, flips) as the fit variant
        choose_variants(rows, FORMAT, crop_variant, ("center-crop",), hint, single=True)
    tokens = (size // (manifest.encoder.factor * PATCH)) ** 2
    buckets = {"small": f"less_than_{MIN_TOKENS}", "kept": f"from_{MIN_TOKENS}_to_{tokens}",
               "resized": f"greater_than_{tokens}_resize", "crop": f"greater_than_{tokens}_crop"}

    def features(row: CatalogRow) -> dict[str, np.ndarray]:
        rng = row_rng(seed, row.row_id)
        latents = [peer_latent(rows.stored(row, flip=f), manifest.encoder, scale=scale, draw=draw, rng=rng)
                   for f in (False, True)]
        h, w = row.latent_h // PATCH, row.latent_w // PATCH
        return {"feature": np.stack([patchify(z) for z in latents]), "grid": token_grid(h, w),
                "size": np.array([h, w], np.int32), "label": np.array([row.label], np.int64)}

    total = rows.variants[fit_variant].rows + (rows.variants[crop_variant].rows if crop_variant else 0)
    options = {"variant": fit_variant, "crop_variant": crop_variant, "draw": draw, "seed": seed}
    with ExportDir(out_dir, FORMAT, rows, options) as out:
        for bucket in buckets.values():  # FiT lists every bucket folder, empty or not
            (out.root / bucket).mkdir(exist_ok=True)
        summary = out.summary
        names: dict[str, str] = {}
        resized: set[str] = set()
        done = 0
        for row in rows.rows([fit_variant]):
            name = _file_name(row, names)
            if row.orig_w * row.orig_h >= size * size:  # FiT's own test for scaling an image down
                bucket = buckets["resized"]
                resized.add(name)
            else:
                bucket = buckets["small" if row.latent_h * row.latent_w < MIN_TOKENS * PATCH**2 else "kept"]
            _write(out, f"{bucket}/{name}", row, features)
            done += 1
            if progress:
                progress(done, total)
        if crop_variant is not None:
            for row in rows.rows([crop_variant]):
                name = _stem(row) + ".safetensors"
                # only images larger than S both ways have a crop, and only next to their resized file
                if row.orig_w > size and row.orig_h > size and names.get(name) == row.key and name in resized:
                    _write(out, f"{buckets['crop']}/{name}", row, features)
                done += 1
                if progress:
                    progress(done, total)
    return summary


def _file_name(row: CatalogRow, names: dict[str, str]) -> str:
    if row.orig_w is None or row.orig_h is None:
        raise UnsupportedCatalogError(f"row {row.row_id} ({row.key}) has no original size, which FiT's buckets need; "
                                      "re-encode it")
    name = _stem(row) + ".safetensors"
    other = names.setdefault(name, row.key)
    if other != row.key:
        raise UnsupportedCatalogError(f"keys {other!r} and {row.key!r} both become {name}: FiT keeps every latent of "
                                      "a bucket in one folder; give the source images distinct names")
    return name


def _stem(row: CatalogRow) -> str:
    return PurePosixPath(row.key).name.split(".")[0]


def _write(out: ExportDir, relative: str, row: CatalogRow, features) -> None:
    if out.has(relative):
        out.summary.skipped += 1
    else:
        out.write_bytes(relative, safetensors.numpy.save(features(row)))
        out.summary.written += 1
    out.summary.rows += 1
