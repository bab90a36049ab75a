"""What every export reads from a catalog: its rows one index part at a time, each row's latents as
a peer stores them, and the checks that refuse a catalog a format cannot express.

An export holds one index part (the rows of one shard) in memory at a time, never the whole
catalog; latents are sliced out of the memory-mapped shard of that part.

Scaling convention (that of nr's encoders): a catalog stores what the encoder outputs, unscaled:
the DC-AE latent (`mode`) or the KL posterior's mean and log-variance (`moments`); the manifest
records the encoder's `scaling_factor`. NiT, FiT and fast-DiT store latents multiplied by that
factor, so their exports multiply in float32 as those codebases do (`latent * scaling_factor`),
and `import_nit` divides. U-ViT keeps unscaled moments and LightningDiT unscaled samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Collection, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from nrdata.catalog import Catalog, EncoderInfo, Manifest
from nrdata.catalog import layout
from nrdata.catalog.reader import ShardView

DRAWS = ("sample", "mode")  # how a latent is drawn from stored moments
LOGVAR_RANGE = (-30.0, 20.0)  # the clamp of diffusers' and LDM's DiagonalGaussianDistribution


class UnsupportedCatalogError(ValueError):
    """The catalog holds latents a format cannot express; the message says what to encode instead."""


def encode_hint(encoder: str, variants: str, *, patch_size: int = 1) -> str:
    """The `nr encode` command whose catalog the format accepts; `patch_size` the peer model's, which
    sets the unit its sizes are multiples of (a hint that leaves it out makes a catalog refused again)."""
    flags = " ".join(f"--variant {v}" for v in variants.split(","))
    patch = f" --patch-size {patch_size}" if patch_size != 1 else ""
    return f"nr encode SOURCE CATALOG --encoder {encoder} {flags} --flip{patch}"


@dataclass(frozen=True)
class VariantSummary:
    rows: int
    sizes: frozenset[tuple[int, int]]  # (latent_h, latent_w) found among its rows
    all_flipped: bool
    min_label: int


@dataclass(frozen=True)
class CatalogRow:
    """One index row, with where its latent bytes live."""

    row_id: int
    key: str
    variant: str
    label: int
    class_name: str | None
    source: str | None
    orig_w: int | None
    orig_h: int | None
    image_w: int | None
    image_h: int | None
    latent_c: int
    latent_h: int
    latent_w: int
    shard: ShardView
    shard_row: int


class CatalogRows:
    """A catalog opened for export."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.catalog = Catalog(self.path)
        self.manifest: Manifest = self.catalog.manifest

    @cached_property
    def variants(self) -> dict[str, VariantSummary]:
        """Rows, latent sizes, flips and labels of every variant that has rows."""
        columns = ["variant", "latent_h", "latent_w", "flip", "label"]
        parts = [pq.read_table(p, columns=columns) for p in self.catalog.index_parts]
        if not parts:
            return {}
        groups = pa.concat_tables(parts).group_by(["variant", "latent_h", "latent_w"]).aggregate(
            [("flip", "all"), ("label", "min"), ("flip", "count")])
        found: dict[str, VariantSummary] = {}
        for g in groups.to_pylist():
            old = found.get(g["variant"], VariantSummary(0, frozenset(), True, 2**31))
            found[g["variant"]] = VariantSummary(
                rows=old.rows + g["flip_count"], sizes=old.sizes | {(g["latent_h"], g["latent_w"])},
                all_flipped=old.all_flipped and g["flip_all"], min_label=min(old.min_label, g["label_min"]))
        return found

    def policy(self, variant: str) -> dict:
        return next(p for p in self.manifest.policies if p["variant"] == variant)

    def row_ids(self, variants: Collection[str]) -> np.ndarray:
        """Row ids of the given variants, in catalog order (the order `rows` yields them)."""
        ids = [self._select(pq.read_table(p, columns=["row_id", "variant"]), variants)["row_id"].to_numpy()
               for p in self.catalog.index_parts]
        return np.concatenate(ids) if ids else np.empty(0, np.int64)

    def rows(self, variants: Collection[str]) -> Iterator[CatalogRow]:
        """Rows of the given variants in row-id order, one index part in memory at a time."""
        for part in self.catalog.index_parts:
            table = self._select(pq.read_table(part, schema=layout.INDEX_SCHEMA), variants)
            if table.num_rows == 0:
                continue
            shards: dict[str, ShardView] = {}
            for r in table.to_pylist():
                shard = shards.get(r["shard"])
                if shard is None:
                    shard = shards[r["shard"]] = ShardView(self.path / layout.SHARD_DIR / r["shard"])
                yield CatalogRow(
                    row_id=r["row_id"], key=r["key"], variant=r["variant"], label=r["label"],
                    class_name=r["class_name"], source=r["source"], orig_w=r["orig_w"], orig_h=r["orig_h"],
                    image_w=r["image_w"], image_h=r["image_h"], latent_c=r["latent_c"], latent_h=r["latent_h"],
                    latent_w=r["latent_w"], shard=shard, shard_row=r["shard_row"])

    def stored(self, row: CatalogRow, *, flip: bool = False) -> np.ndarray:
        """The stored latent [C', h, w] of a row (its mirrored twin with flip=True) in float32."""
        raw = row.shard.row_bytes(row.shard_row, flip)
        shape = (row.latent_c, row.latent_h, row.latent_w)
        if self.manifest.dtype == "bfloat16":  # raw bf16 words are the top halves of float32 values
            return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32).reshape(shape)
        return raw.view(self.manifest.dtype).astype(np.float32).reshape(shape)

    @staticmethod
    def _select(table: pa.Table, variants: Collection[str]) -> pa.Table:
        return table.filter(pc.is_in(table["variant"], value_set=pa.array(list(variants), pa.string())))


# -- latents as a peer stores them ---------------------------------------------------------------


def row_rng(seed: int, row_id: int) -> np.random.Generator:
    """A generator for one row: draws do not depend on which rows an earlier, interrupted run wrote."""
    return np.random.default_rng([seed, row_id])


def peer_latent(stored: np.ndarray, encoder: EncoderInfo, *, scale: float, draw: str,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """The float32 latent [C, h, w] a peer stores: the encoder's latent multiplied by `scale`.

    A `mode` or `sample` catalog gives its latent; a `moments` catalog the mean (draw="mode") or a
    sample mean + exp(logvar / 2) * noise, the log-variance clamped as diffusers and LDM clamp it
    (draw="sample", noise from `rng`). The arithmetic is float32, as in the peers' own extraction.
    """
    if encoder.quantity == "moments":
        if draw not in DRAWS:
            raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}")
        latent, logvar = stored[: encoder.channels], stored[encoder.channels:]
        if draw == "sample":
            std = np.exp(np.float32(0.5) * np.clip(logvar, *LOGVAR_RANGE))
            latent = latent + std * rng.standard_normal(latent.shape, dtype=np.float32)
    else:
        latent = stored
    return latent if scale == 1.0 else latent * np.float32(scale)


# -- refusals ------------------------------------------------------------------------------------


def require_encoder(manifest: Manifest, fmt: str, names: Collection[str], hint: str, *,
                    quantities: Collection[str] | None = None) -> None:
    encoder = manifest.encoder
    if encoder.name not in names:
        raise UnsupportedCatalogError(
            f"{fmt} needs latents of {' or '.join(sorted(names))}, this catalog holds {encoder.name} latents; "
            f"encode with: {hint}")
    if quantities is not None and encoder.quantity not in quantities:
        raise UnsupportedCatalogError(
            f"{fmt} needs the stored quantity {' or '.join(quantities)}, this catalog stores {encoder.quantity!r}; "
            f"encode with: {hint}")


def require_scaling_factor(manifest: Manifest, fmt: str) -> float:
    factor = manifest.encoder.scaling_factor
    if factor is None:
        raise UnsupportedCatalogError(
            f"{fmt} stores latents multiplied by the encoder's scaling factor, and this catalog's manifest records "
            f"none for {manifest.encoder.name}; re-encode with an nr that records it")
    return factor


def require_flips(manifest: Manifest, fmt: str, hint: str) -> None:
    if manifest.flip != "store":
        raise UnsupportedCatalogError(
            f"{fmt} stores the latent of every image and of its mirror, this catalog stores no flipped latents; "
            f"encode with: {hint}")


def choose_variants(rows: CatalogRows, fmt: str, requested: str | None, kinds: Collection[str], hint: str, *,
                    single: bool) -> list[str]:
    """The variants to export: `requested`, or every variant of an accepted kind (exactly one when
    `single`). Each must hold rows, every one of them labelled and with its flipped twin when the
    manifest stores flips."""
    accepted = [p["variant"] for p in rows.manifest.policies if p.get("kind") in kinds and p["variant"] in rows.variants]
    if requested is not None:
        if requested not in rows.manifest.variants:
            raise UnsupportedCatalogError(
                f"variant {requested!r} is not in this catalog (it has {list(rows.manifest.variants)})")
        if requested not in accepted:
            kind = rows.policy(requested).get("kind")
            reason = "has no rows" if requested not in rows.variants else f"is a {kind} variant"
            raise UnsupportedCatalogError(
                f"{fmt} takes {' or '.join(kinds)} variants; {requested!r} {reason}; encode with: {hint}")
        chosen = [requested]
    elif not accepted:
        raise UnsupportedCatalogError(
            f"{fmt} takes {' or '.join(kinds)} variants and this catalog has none with rows "
            f"(it has {list(rows.manifest.variants)}); encode with: {hint}")
    elif single and len(accepted) > 1:
        raise UnsupportedCatalogError(f"{fmt} takes one variant at a time and this catalog has {accepted}; "
                                      "choose one (variant=, nr export --variant)")
    else:
        chosen = accepted
    for variant in chosen:
        summary = rows.variants[variant]
        if summary.min_label < 0:
            raise UnsupportedCatalogError(
                f"{fmt} trains class-conditional models and variant {variant!r} has unlabelled rows (label -1); "
                "encode a class-folder source so that every row has a label")
        if rows.manifest.flip == "store" and not summary.all_flipped:
            raise UnsupportedCatalogError(f"variant {variant!r} has rows without their flipped latent; "
                                          "re-encode them with --flip store")
    return chosen


def require_one_size(rows: CatalogRows, variant: str, fmt: str) -> tuple[int, int]:
    sizes = rows.variants[variant].sizes
    if len(sizes) != 1:
        raise UnsupportedCatalogError(
            f"{fmt} stores latents of one size and variant {variant!r} has {len(sizes)} sizes "
            f"(e.g. {sorted(sizes)[:3]}); export a center-crop variant")
    return next(iter(sizes))
