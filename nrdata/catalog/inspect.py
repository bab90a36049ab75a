"""Summaries of a catalog for people: counts, sizes, aspect ratios. Values only; the CLI prints."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from nrdata.catalog.reader import Catalog
from nrdata.extras import require

# log2(w/h) bin edges: 1:4 .. 4:1, so each bin is one "doubling" of elongation split in halves
ASPECT_EDGES = np.array([-np.inf, -1.75, -1.25, -0.75, -0.25, 0.25, 0.75, 1.25, 1.75, np.inf])
ASPECT_LABELS = ["<1:3 tall", "~1:3", "~1:2", "~2:3", "~1:1", "~3:2", "~2:1", "~3:1", ">3:1 wide"]


@dataclass(frozen=True)
class Histogram:
    title: str
    labels: list[str]
    counts: list[int]


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def describe(cat: Catalog) -> dict:
    """The facts `nr catalog info` shows, as a plain dict."""
    m = cat.manifest
    per_variant = (
        pl.from_arrow(cat.index.select(["variant", "latent_h", "latent_w"]))
        .group_by("variant")
        .agg(pl.len().alias("rows"), (pl.col("latent_h") * pl.col("latent_w")).sum().alias("latent_pixels"))
        .sort("variant")
        .to_dicts()
        if len(cat) else []
    )
    return {
        "path": str(cat.root),
        "fingerprint": m.fingerprint,
        "content_fingerprint": cat.content_fingerprint(),
        "encoder": f"{m.encoder.name} ({m.encoder.source or 'no weights'}"
                   + (f" @ {m.encoder.revision}" if m.encoder.revision else "") + ")",
        "encoder_weights": m.encoder_weights or ("none" if not m.encoder.source else "not recorded (schema 1)"),
        "factor": m.encoder.factor,
        "channels": m.encoder.channels,
        "stored_quantity": m.encoder.quantity,
        "dtype": m.dtype,
        "flip": m.flip,
        "variants": list(m.variants),
        "policies": list(m.policies),
        "normalization": (f"{m.normalization.convention}; mean/std over {m.normalization.count:,} latent pixels"
                          if m.normalization.ready else "not computed yet"),
        "repa_images": (f"stored, {m.repa_pixels} px per latent cell (nr encode --repa-pixels)" if m.repa_pixels
                        else "none (REPA training needs them, or repa_image_root to decode sources per step)"),
        "source_root": m.source_root,
        "code_version": m.code_version,
        "created": m.created,
        "rows": len(cat),
        "rows_per_variant": per_variant,
        "shards": len(cat.index_parts),
        "errors": len(cat.errors()),
        "disk_bytes": disk_bytes(cat.root),
    }


def _counts(values: np.ndarray, edges: np.ndarray) -> list[int]:
    return np.histogram(values, bins=edges)[0].astype(int).tolist()


def size_histograms(cat: Catalog, variant: str | None = None) -> list[Histogram]:
    """Histograms of latent tokens (h*w), and of aspect ratio of the source images."""
    frame = pl.from_arrow(cat.index.select(["variant", "latent_h", "latent_w", "orig_w", "orig_h"]))
    if variant is not None:
        frame = frame.filter(pl.col("variant") == variant)
    if frame.height == 0:
        return []
    tokens = (frame["latent_h"] * frame["latent_w"]).to_numpy()
    top = int(tokens.max())
    edges = np.unique(np.concatenate([[0.5], 2.0 ** np.arange(0, int(np.ceil(np.log2(max(top, 1)))) + 1) + 0.5]))
    token_labels = [f"{int(lo + 0.5)}-{int(hi - 0.5)}" if int(hi - 0.5) > int(lo + 0.5) else f"{int(lo + 0.5)}"
                    for lo, hi in zip(edges[:-1], edges[1:])]
    hists = [Histogram("latent tokens per row (h*w)", token_labels, _counts(tokens, edges))]
    orig = frame.drop_nulls(["orig_w", "orig_h"])
    if orig.height:
        aspect = np.log2(orig["orig_w"].to_numpy() / orig["orig_h"].to_numpy())
        hists.append(Histogram("aspect ratio of the source images (w:h)", ASPECT_LABELS, _counts(aspect, ASPECT_EDGES)))
    return hists


def plot_size_histograms(cat: Catalog, png: Path) -> Path:
    """A PNG with the latent-size scatter (h against w, per variant) and the aspect histogram.
    Raises MissingExtraError when matplotlib is not installed."""
    matplotlib = require("matplotlib")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = pl.from_arrow(cat.index.select(["variant", "latent_h", "latent_w", "orig_w", "orig_h"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for variant in sorted(frame["variant"].unique().to_list()):
        sub = frame.filter(pl.col("variant") == variant)
        sizes = sub.group_by(["latent_w", "latent_h"]).len()
        left.scatter(sizes["latent_w"], sizes["latent_h"], s=8 + 40 * np.sqrt(sizes["len"].to_numpy()),
                     alpha=0.5, label=f"{variant} ({sub.height:,})")
    left.set(xlabel="latent width", ylabel="latent height", title="latent sizes (area ~ count)")
    left.legend(fontsize=8)
    hists = size_histograms(cat)
    if len(hists) > 1:
        aspect = hists[1]
        right.bar(range(len(aspect.counts)), aspect.counts, color="tab:gray")
        right.set_xticks(range(len(aspect.labels)), aspect.labels, rotation=45, ha="right", fontsize=8)
        right.set(title=aspect.title, ylabel="rows")
    fig.suptitle(f"{cat.root.name}: {len(cat):,} rows, {cat.manifest.encoder.name}, {cat.manifest.dtype}")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def head(cat: Catalog, n: int = 10, variant: str | None = None) -> pl.DataFrame:
    lf = cat.scan()
    if variant is not None:
        lf = lf.filter(pl.col("variant") == variant)
    return lf.head(n).collect()

