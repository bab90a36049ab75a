"""Export to U-ViT's feature layout, which DiMR reads too (baofff/U-ViT scripts/extract_imagenet_feature.py
and datasets.py; reference/peers.md §4.1).

    OUT/
      imagenet256_features/<i>.npy   a pickled pair (moments float32 [8, 32, 32], label int64)
      nr_export.json

Moments are the SD-VAE encoder's mean then log-variance, unscaled: U-ViT samples them and
multiplies by 0.18215 at train time. Every image gives two samples, i = 2k its own moments and
i = 2k + 1 its mirror's, k = 0, 1, ... in catalog order. U-ViT's dataset hard-codes ImageNet's
length (1,281,167 × 2) and loads with np.load(..., allow_pickle=True); the pair is written as a
numpy object array, which every numpy version writes and reads (a ragged tuple needs numpy < 1.24).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

import numpy as np

from nrdata.interop.catalog_rows import (
    CatalogRows,
    choose_variants,
    encode_hint,
    require_encoder,
    require_flips,
    require_one_size,
)
from nrdata.interop.export_dir import ExportDir, ExportSummary

FORMAT = "uvit"
ENCODERS = ("sd-vae-ft-ema", "sd-vae-ft-mse")  # one encoder: ft-EMA and ft-MSE retrained only the decoder
HINT = encode_hint("sd-vae-ft-ema", "256")


def moments_and_label(moments: np.ndarray, label: int) -> bytes:
    pair = np.empty(2, dtype=object)
    pair[0], pair[1] = moments, np.int64(label)
    buffer = io.BytesIO()
    np.save(buffer, pair, allow_pickle=True)
    return buffer.getvalue()


def export_uvit(catalog_path: str | Path, out_dir: str | Path, *, variant: str | None = None,
                progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """Write an SD-VAE moments catalog's center-crop variant (with stored flips) as U-ViT's
    per-sample files, resuming a partial export."""
    rows = CatalogRows(catalog_path)
    manifest = rows.manifest
    require_encoder(manifest, FORMAT, ENCODERS, HINT, quantities=("moments",))
    require_flips(manifest, FORMAT, HINT)
    (chosen,) = choose_variants(rows, FORMAT, variant, ("center-crop",), HINT, single=True)
    require_one_size(rows, chosen, FORMAT)
    folder = f"imagenet{rows.policy(chosen)['target']}_features"
    total = rows.variants[chosen].rows

    with ExportDir(out_dir, FORMAT, rows, {"variant": chosen}) as out:
        summary = out.summary
        for row in rows.rows([chosen]):
            wrote = False
            for index, flip in ((2 * summary.rows, False), (2 * summary.rows + 1, True)):
                relative = f"{folder}/{index}.npy"
                if not out.has(relative):
                    out.write_bytes(relative, moments_and_label(rows.stored(row, flip=flip), row.label))
                    wrote = True
            summary.written += wrote
            summary.skipped += not wrote
            summary.rows += 1
            if progress:
                progress(summary.rows, total)
    return summary
