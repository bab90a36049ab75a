"""Where a catalog keeps its files and what their columns are.

    CATALOG/
      manifest.json            what the latents are (encoder, dtype, policies, flip, statistics)
      index/<seq>-<id>.parquet one row per latent; `polars.scan_parquet("CATALOG/index/*.parquet")`
      shards/<seq>-<id>.arrow  latent bytes (and REPA images when stored): Arrow IPC files, one record
                               batch each, memory-mapped
      errors/<seq>-<id>.parquet rows that failed: key, variant, stage, message
      .lock                    held by the one writer at a time

An index part is published only after its shard file, so an index row always points at bytes
that exist. `seq` grows with every commit, which keeps `row_id` (the position of a row in the
index read in file-name order) stable when a later run appends.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

INDEX_DIR = "index"
SHARD_DIR = "shards"
ERROR_DIR = "errors"
LOCK_NAME = ".lock"
SHARD_SUFFIX = ".arrow"
PART_SUFFIX = ".parquet"

# Parquet key-value metadata of an index part: which shard it describes and how to verify it.
PART_META_KEY = b"nr.part"

INDEX_SCHEMA = pa.schema([
    pa.field("row_id", pa.int64(), nullable=False),
    pa.field("key", pa.string(), nullable=False),  # stable id of the source image (its relative path)
    pa.field("variant", pa.string(), nullable=False),  # "native", "256", "512", "fit-256", ...
    pa.field("label", pa.int32(), nullable=False),  # -1 when the source has no labels
    pa.field("class_name", pa.string()),
    pa.field("source", pa.string()),  # path relative to the manifest's source_root
    pa.field("orig_w", pa.int32()),
    pa.field("orig_h", pa.int32()),
    pa.field("image_w", pa.int32()),  # pixel size fed to the encoder
    pa.field("image_h", pa.int32()),
    pa.field("latent_c", pa.int32(), nullable=False),  # stored channels (2C for moments)
    pa.field("latent_h", pa.int32(), nullable=False),
    pa.field("latent_w", pa.int32(), nullable=False),
    pa.field("flip", pa.bool_(), nullable=False),  # a horizontally flipped twin is stored
    pa.field("shard", pa.string(), nullable=False),  # file name under shards/
    pa.field("shard_row", pa.int32(), nullable=False),
    pa.field("nbytes", pa.int64(), nullable=False),  # bytes of one latent (the twin has as many)
    pa.field("crc32", pa.int64(), nullable=False),  # zlib.crc32 of the latent bytes, then the twin's
])

# large_binary keeps every shard's bytes in one contiguous buffer with 64-bit offsets: rows are
# sliced out of the memory map without a copy, and no column ever hits Arrow's 2 GiB offset limit.
SHARD_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("variant", pa.string(), nullable=False),
    pa.field("latent", pa.large_binary(), nullable=False),
    pa.field("latent_flip", pa.large_binary(), nullable=True),
    # zlib.crc32 of each half on its own (the index's crc32 chains the two): a reader checks the half
    # it reads without touching the other. Shards written before these columns existed lack them.
    pa.field("latent_crc32", pa.uint32(), nullable=False),
    pa.field("latent_flip_crc32", pa.uint32(), nullable=True),
    # the REPA encoder's input view of the image the latent was encoded from: uint8 [h*k, w*k, 3]
    # for a latent of h x w and the manifest's repa_pixels k (the twin's is its mirror, made on the
    # fly), so training never decodes a source image; null when the manifest stores none
    pa.field("repa_image", pa.large_binary(), nullable=True),
    pa.field("repa_image_crc32", pa.uint32(), nullable=True),
])

ERROR_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("variant", pa.string()),  # null when the failure happened before any variant (decode)
    pa.field("stage", pa.string(), nullable=False),  # "decode", "resize", "encode", "write", ...
    pa.field("message", pa.string(), nullable=False),
    pa.field("source", pa.string()),
    pa.field("time", pa.string()),
])


def part_name(seq: int, writer_id: str, suffix: str) -> str:
    return f"{seq:08d}-{writer_id}{suffix}"


def part_seq(name: str) -> int:
    return int(name.split("-", 1)[0])


def listing(folder: Path, suffix: str) -> list[Path]:
    """Committed files of one kind, in commit order (temporary files excluded)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix == suffix and not p.name.startswith("."))
