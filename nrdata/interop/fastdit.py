"""Export to fast-DiT's feature layout, which U-DiT reads too (chuanyangjin/fast-DiT extract_features.py
and train.py, YuchuanTian/U-DiT utils/fastdit_kit.py; reference/peers.md §3).

    OUT/
      imagenet256_features/<k>_0.npy   float32 [1, 4, 32, 32]: an SD-VAE latent times 0.18215
      imagenet256_labels/<k>_0.npy     int64 [1]
      nr_export.json

One latent per image, as fast-DiT's extraction keeps: of the image or of its mirror, chosen at
random (flips="random"; flips="none" keeps the image's own), drawn from stored moments by sampling
unless draw="mode". Files are named `<k>_0.npy`, k = 0, 1, ... in catalog order: fast-DiT pairs
features with labels by sorted name, U-DiT sorts by int(k) * 8 + rank. U-DiT drops the last file
(its extraction padded the last batch) and then asserts ImageNet's 1,281,167 images, so
`udit_padding` (on by default) writes the last image once more as `<N>_0.npy`; fast-DiT then sees
that one image twice. For 512 the folders are `imagenet512_*`: U-DiT finds them, fast-DiT's
train.py reads `imagenet256_*` only.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np

from nrdata.interop.catalog_rows import (
    CatalogRow,
    CatalogRows,
    UnsupportedCatalogError,
    choose_variants,
    encode_hint,
    peer_latent,
    require_encoder,
    require_one_size,
    require_scaling_factor,
    row_rng,
)
from nrdata.interop.export_dir import ExportDir, ExportSummary

FORMAT = "fastdit"
ENCODERS = ("sd-vae-ft-ema", "sd-vae-ft-mse")  # one encoder: ft-EMA and ft-MSE retrained only the decoder
HINT = encode_hint("sd-vae-ft-ema", "256")
FLIPS = ("random", "none")


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def export_fastdit(catalog_path: str | Path, out_dir: str | Path, *, variant: str | None = None,
                   flips: str = "random", draw: str = "sample", seed: int = 0, udit_padding: bool = True,
                   progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """Write an SD-VAE catalog's center-crop variant as fast-DiT's per-image .npy files, resuming a
    partial export. `seed` drives the flip choice and the draw, one generator per row."""
    if flips not in FLIPS:
        raise ValueError(f"flips must be one of {FLIPS}, got {flips!r}")
    rows = CatalogRows(catalog_path)
    manifest = rows.manifest
    require_encoder(manifest, FORMAT, ENCODERS, HINT)
    if flips == "random" and manifest.flip != "store":
        raise UnsupportedCatalogError(
            f"{FORMAT} keeps the image or its mirror at random and this catalog stores no flipped latents; "
            f"encode with: {HINT}, or export with flips='none'")
    scale = require_scaling_factor(manifest, FORMAT)
    (chosen,) = choose_variants(rows, FORMAT, variant, ("center-crop",), HINT, single=True)
    require_one_size(rows, chosen, FORMAT)
    size = rows.policy(chosen)["target"]
    features, labels = f"imagenet{size}_features", f"imagenet{size}_labels"
    total = rows.variants[chosen].rows

    def write(out: ExportDir, k: int, row: CatalogRow) -> bool:
        name = f"{k}_0.npy"
        if out.has(f"{features}/{name}") and out.has(f"{labels}/{name}"):
            return False
        rng = row_rng(seed, row.row_id)
        mirrored = flips == "random" and rng.random() < 0.5
        latent = peer_latent(rows.stored(row, flip=mirrored), manifest.encoder, scale=scale, draw=draw, rng=rng)
        # a row is complete once both files exist: a run killed between the two writes both again
        out.write_bytes(f"{features}/{name}", npy_bytes(latent[None]))
        out.write_bytes(f"{labels}/{name}", npy_bytes(np.array([row.label], np.int64)))
        return True

    options = {"variant": chosen, "flips": flips, "draw": draw, "seed": seed, "udit_padding": udit_padding}
    with ExportDir(out_dir, FORMAT, rows, options) as out:
        summary = out.summary
        last = None
        for row in rows.rows([chosen]):
            if write(out, summary.rows, row):
                summary.written += 1
            else:
                summary.skipped += 1
            summary.rows += 1
            last = row
            if progress:
                progress(summary.rows, total)
        if udit_padding:
            write(out, summary.rows, last)
    return summary
