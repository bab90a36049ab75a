"""Export to LightningDiT's latent shards (hustvl/LightningDiT, extract_features.py and
datasets/img_latent_dataset.py; reference/peers.md §2.1).

    OUT/
      latents_rank00_shard000.safetensors   `latents`, `latents_flip` float32 [n, 32, 16, 16], `labels` int64 [n]
      latents_rank00_shard001.safetensors   ... 10,000 images a shard by default, as LightningDiT writes them
      latents_stats.pt                      {'mean', 'std'}: float32 [1, 32, 1, 1], read with torch.load
      nr_export.json

LightningDiT's `data_path` is OUT. Latents are VA-VAE posterior samples without any scaling (drawn
from stored moments unless draw="mode"); LightningDiT normalises them with the statistics file.
Those statistics are taken channel-wise over every exported non-flipped latent, with the unbiased
std of torch.std (LightningDiT itself takes 10,000 random ones). A shard holds up to `shard_rows`
latents of each kind in memory while it is written: 10,000 of 32x16x16 is about 0.7 GB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import safetensors
import safetensors.numpy

from nrdata.catalog.stats import ChannelStats
from nrdata.interop.catalog_rows import (
    CatalogRow,
    CatalogRows,
    choose_variants,
    encode_hint,
    peer_latent,
    require_encoder,
    require_flips,
    require_one_size,
    row_rng,
)
from nrdata.interop.export_dir import ExportDir, ExportSummary

FORMAT = "lightningdit"
ENCODERS = ("va-vae-f16d32",)
HINT = encode_hint("va-vae-f16d32", "256")
SHARD_ROWS = 10_000
STATS_NAME = "latents_stats.pt"
READ_BACK_ROWS = 1024  # latents read at a time from a shard an earlier run wrote


def shard_name(index: int) -> str:
    return f"latents_rank00_shard{index:03d}.safetensors"


def export_lightningdit(catalog_path: str | Path, out_dir: str | Path, *, variant: str | None = None,
                        draw: str = "sample", seed: int = 0, shard_rows: int = SHARD_ROWS,
                        progress: Callable[[int, int], None] | None = None) -> ExportSummary:
    """Write a VA-VAE catalog's center-crop variant (with stored flips) as LightningDiT's shards and
    statistics, resuming a partial export shard by shard.

    `variant`: the center-crop variant (default: the catalog's only one). `draw`/`seed`: how
    latents are drawn from stored moments, with one generator per row.
    """
    if shard_rows < 1:
        raise ValueError(f"shard_rows must be >= 1, got {shard_rows}")
    rows = CatalogRows(catalog_path)
    manifest = rows.manifest
    require_encoder(manifest, FORMAT, ENCODERS, HINT)
    require_flips(manifest, FORMAT, HINT)
    (chosen,) = choose_variants(rows, FORMAT, variant, ("center-crop",), HINT, single=True)
    h, w = require_one_size(rows, chosen, FORMAT)
    channels = manifest.encoder.channels
    total = rows.variants[chosen].rows

    def latent(row: CatalogRow, rng: np.random.Generator, flip: bool) -> np.ndarray:
        return peer_latent(rows.stored(row, flip=flip), manifest.encoder, scale=1.0, draw=draw, rng=rng)

    options = {"variant": chosen, "draw": draw, "seed": seed, "shard_rows": shard_rows}
    with ExportDir(out_dir, FORMAT, rows, options) as out:
        summary = out.summary
        stats = ChannelStats.empty(channels)
        shard = _Shard(min(shard_rows, total), channels, h, w)
        for row in rows.rows([chosen]):
            index = summary.rows // shard_rows
            if out.has(shard_name(index)):
                summary.skipped += 1
            else:
                rng = row_rng(seed, row.row_id)
                shard.add(latent(row, rng, False), latent(row, rng, True), row.label)
            summary.rows += 1
            if summary.rows % shard_rows == 0 or summary.rows == total:
                if out.has(shard_name(index)):
                    stats = stats.merge(_read_back_stats(out.root / shard_name(index)))
                else:
                    stats = stats.merge(shard.stats())
                    out.write_with(shard_name(index), shard.save)
                    summary.written += shard.size
                shard = _Shard(min(shard_rows, total - summary.rows), channels, h, w)
            if progress:
                progress(summary.rows, total)
        summary.outputs["stats"] = out.write_with(STATS_NAME, lambda path: _save_stats(path, stats))
    return summary


class _Shard:
    """The latents of one shard, filled row by row."""

    def __init__(self, capacity: int, channels: int, h: int, w: int) -> None:
        self.latents = np.empty((capacity, channels, h, w), np.float32)
        self.flips = np.empty_like(self.latents)
        self.labels = np.empty(capacity, np.int64)
        self.size = 0

    def add(self, latent: np.ndarray, flip: np.ndarray, label: int) -> None:
        self.latents[self.size], self.flips[self.size], self.labels[self.size] = latent, flip, label
        self.size += 1

    def stats(self) -> ChannelStats:
        return _channel_stats(self.latents[: self.size])

    def save(self, path: Path) -> None:
        n = self.size
        safetensors.numpy.save_file(
            {"latents": self.latents[:n], "latents_flip": self.flips[:n], "labels": self.labels[:n]}, str(path),
            metadata={"total_size": str(n), "dtype": "torch.float32", "device": "cpu"})


def _channel_stats(latents: np.ndarray) -> ChannelStats:
    """Statistics of a batch [n, C, h, w] of latents, per channel."""
    return ChannelStats.of(np.ascontiguousarray(latents.swapaxes(0, 1)))


def _read_back_stats(path: Path) -> ChannelStats:
    with safetensors.safe_open(str(path), "np") as f:
        latents = f.get_slice("latents")
        n = latents.get_shape()[0]
        stats = ChannelStats.empty(latents.get_shape()[1])
        for start in range(0, n, READ_BACK_ROWS):
            stats = stats.merge(_channel_stats(latents[start: min(start + READ_BACK_ROWS, n)]))
    return stats


def _save_stats(path: Path, stats: ChannelStats) -> None:
    import torch

    channels = len(stats.mean)
    std = np.sqrt(stats.m2 / max(stats.count - 1, 1))  # unbiased, as torch.std
    torch.save({"mean": torch.tensor(stats.mean, dtype=torch.float32).view(1, channels, 1, 1),
                "std": torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)}, path)
