"""Nothing trains on damaged data: a catalog damaged after it was written or packed (a byte flipped
in a shard, a shard truncated or deleted, an index part truncated, deleted or copied, the manifest's
statistics edited) is refused by `nr train`, `nr pack`, `nr export` and `nr catalog validate` with
one line naming the file and what to do, and a non-zero exit; training stops before any step runs
on the damage."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from interop_factory import make_manifest, make_rows, write_catalog  # noqa: E402

from cli import app  # noqa: E402
from nrdata.catalog import Catalog, CatalogIntegrityError, CatalogWriter, CorruptLatentError, layout  # noqa: E402
from nrdata.catalog.manifest import read_manifest  # noqa: E402
from nrdata.catalog.reader import ShardView  # noqa: E402
from nrdata.packing.catalog_packs import pack_catalogs, write_pack_result  # noqa: E402
from nrtrain.loader import PackedDataset  # noqa: E402
from nrtrain.train import TrainConfig, train  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """20 rows (10 images, native and 256) of DC-AE-like bf16 latents with twins, in 4 shards."""
    root = tmp_path_factory.mktemp("pristine")
    manifest = make_manifest("dc-ae-f32c32", ["native", "256"], dtype="bfloat16")
    write_catalog(root / "cat", manifest, make_rows(manifest, 10), shard_rows=5)
    return root / "cat"


@pytest.fixture
def cat(pristine, tmp_path) -> Path:
    """A fresh copy of the catalog, packed (one epoch, packs of at most 512 tokens) before any damage."""
    shutil.copytree(pristine, tmp_path / "cat")
    _pack(tmp_path)
    return tmp_path / "cat"


def _pack(root: Path) -> Path:
    write_pack_result(root / "packs.parquet", pack_catalogs([root / "cat"], max_tokens=512))
    return root / "packs.parquet"


def _parts(cat: Path) -> list[Path]:
    return layout.listing(cat / layout.INDEX_DIR, layout.PART_SUFFIX)


def _shards(cat: Path) -> list[Path]:
    return layout.listing(cat / layout.SHARD_DIR, layout.SHARD_SUFFIX)


def _flip_byte(cat: Path, row: int, twin: bool = False) -> tuple[str, str]:
    """Flip one bit inside row `row`'s latent (or twin) bytes in its shard file; returns (shard, key)."""
    catalog = Catalog(cat)
    record = catalog.index.to_pylist()[row]
    shard = cat / layout.SHARD_DIR / record["shard"]
    data = bytearray(shard.read_bytes())
    at = data.find(catalog.latent(row, flip=twin).tobytes())
    assert at > 0
    data[at + 7] ^= 0x04
    shard.write_bytes(bytes(data))
    return record["shard"], record["key"]


def _half_used(cat: Path, batch) -> bool:
    """Whether the first image of `batch` is its row's twin (the loader draws one of the two)."""
    catalog, row = Catalog(cat), int(batch.row_ids[0])
    norm = catalog.manifest.normalization
    h, w = (int(x) for x in batch.sizes[0])
    for twin in (False, True):
        words = catalog.latent(row, flip=twin).astype(np.uint32) << 16  # bf16 words to float32
        z = (words.view(np.float32).reshape(len(norm.mean), -1).T - norm.mean) / norm.std
        if np.allclose(batch.tokens[: h * w].numpy(), z, rtol=1e-5, atol=1e-5):
            return twin
    raise AssertionError("the first image is neither the latent nor its twin")


def _invoke(args: list[str], code: int, *names: str) -> str:
    """Run `nr ARGS`; it must exit with `code` through the CLI's own error path (no traceback) and
    name every one of `names`."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # a clean exit, not a crash
    text = " ".join(result.output.split())
    assert "Traceback" not in text
    for name in names:
        assert name in text, (name, text)
    return text


def _train(cat: Path, *, code: int = 2, names: tuple[str, ...] = ()) -> str:
    out = cat.parent / "run"
    text = _invoke(["train", "--packs", cat.parent / "packs.parquet", "--out", out, "--model", "tiny", "--steps", "2",
                    "--set", "workers=0", "--set", "tensorboard=false", "--set", "ckpt_every=1",
                    "--set", "log_every=1"], code, *names)
    # refused before the first step: nothing trained, nothing saved
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    return text


def _pack_cli(cat: Path, *names: str) -> str:
    return _invoke(["pack", cat, "-L", "512", "--out", cat.parent / "again.parquet"], 2, *names)


def _validate(cat: Path, *names: str) -> str:
    return _invoke(["catalog", "validate", cat], 1, "INVALID", *names)


def _export(cat: Path, *names: str) -> str:
    return _invoke(["export", "nit", cat, "--out", cat.parent / "nit", "--variant", "native"], 2, *names)


def test_a_byte_flipped_after_packing_stops_training_before_the_first_step(cat):
    batch = PackedDataset(cat.parent / "packs.parquet").batch(0)
    shard, key = _flip_byte(cat, int(batch.row_ids[0]), twin=_half_used(cat, batch))
    text = _train(cat, names=(shard, key, "checksum", f"nr catalog validate {cat}"))
    assert text.count("error:") == 1
    _validate(cat, shard, key, "checksum")


def test_a_damaged_row_met_mid_run_stops_the_run_before_the_step_that_would_use_it(cat, tmp_path):
    packs = cat.parent / "packs.parquet"
    dataset = PackedDataset(packs)
    batches = [dataset.batch(p) for p in range(dataset.num_steps)]
    position = next(p for p in range(2, len(batches)) if len(batches[p].row_ids))
    row = int(batches[position].row_ids[0])
    shard, key = _flip_byte(cat, row, twin=_half_used(cat, batches[position]))

    seen = []
    config = TrainConfig(packs=str(packs), out=str(tmp_path / "run"), model="tiny", steps=len(batches), workers=1,
                         log_every=1, ckpt_every=1000, tensorboard=False)
    with pytest.raises(CorruptLatentError) as caught:
        train(config, on_step=lambda step, batch, terms: seen.append((step, batch.row_ids.tolist())))
    assert [step for step, _ in seen] == list(range(position))  # every step before it ran, none after
    assert not any(row in rows for _, rows in seen)
    message = str(caught.value)  # the worker's message, not the DataLoader's traceback of it
    assert shard in message and key in message and "\n" not in message and "Traceback" not in message


def test_a_truncated_shard_is_refused_naming_it(cat):
    shard = _shards(cat)[1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    _train(cat, names=(str(shard), "truncated"))
    _pack_cli(cat, str(shard), "truncated")
    _export(cat, str(shard), "truncated")
    _validate(cat, shard.name, "truncated")


def test_a_deleted_shard_is_refused_naming_it(cat):
    shard = _shards(cat)[2]
    shard.unlink()
    _train(cat, names=(str(shard), "missing"))
    _pack_cli(cat, str(shard), "missing")
    _export(cat, str(shard), "missing")
    _validate(cat, shard.name, "missing")


def test_a_truncated_index_part_is_refused_naming_it(cat):
    part = _parts(cat)[1]
    part.write_bytes(part.read_bytes()[:200])
    _train(cat, names=(str(part), "unreadable"))
    _pack_cli(cat, str(part), "unreadable")
    _export(cat, str(part), "unreadable")
    _validate(cat, part.name, "unreadable")


def test_a_deleted_index_part_is_refused_naming_the_rows_and_the_shard_left_behind(cat):
    part = _parts(cat)[1]
    part.unlink()
    orphan = part.stem + layout.SHARD_SUFFIX
    _train(cat, names=("row ids 5..9", "deleted", orphan))
    _pack_cli(cat, "row ids 5..9", orphan)
    _export(cat, "row ids 5..9", orphan)
    _validate(cat, "row ids 5..9", orphan)
    # a writer would number new rows after the last and delete the shard no part names: refused
    with pytest.raises(CatalogIntegrityError, match="cannot be appended to: row ids 5..9"):
        CatalogWriter(cat, read_manifest(cat))
    assert (cat / layout.SHARD_DIR / orphan).exists()


def test_a_deleted_last_index_part_is_caught_by_the_packs_and_then_by_the_statistics(cat):
    part = _parts(cat)[-1]
    part.unlink()
    _train(cat, names=("contents changed", "nr pack"))  # the packs were made for the whole catalog
    _pack(cat.parent)  # what the message says to do: the rest of the catalog packs as it is ...
    # ... but the manifest's statistics still count the lost rows: the shard left behind is named
    _train(cat, names=("manifest.json", "index parts hold", part.stem + layout.SHARD_SUFFIX, "nr encode"))
    _validate(cat, "manifest.json", part.stem + layout.SHARD_SUFFIX)


def test_a_duplicated_index_part_is_refused_by_every_reader_naming_both_parts(cat):
    parts = _parts(cat)
    copy = cat / layout.INDEX_DIR / "00000099-feedbeef.parquet"
    shutil.copy(parts[1], copy)
    names = (parts[1].name, copy.name, "both hold row ids 5..9", "remove the copy")
    _train(cat, names=names)
    _pack_cli(cat, *names)
    _export(cat, *names)
    _validate(cat, *names)


def test_an_edited_normalisation_in_the_manifest_is_refused(cat):
    path = cat / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["normalization"]["std"][3] *= 1.5
    path.write_text(json.dumps(manifest, indent=2))
    _train(cat, names=(str(path), "normalization.std[3]", "edited"))
    _validate(cat, "manifest.json", "normalization.std[3]")


def _drop_half_crcs(cat: Path) -> None:
    """Rewrite the catalog as a writer did before shards kept per-half checksums."""
    old = pa.schema([f for f in layout.SHARD_SCHEMA if not f.name.endswith("_crc32")])
    for part in _parts(cat):
        table = pq.read_table(part)
        meta = json.loads(table.schema.metadata[layout.PART_META_KEY])
        shard = cat / layout.SHARD_DIR / meta["shard"]
        with pa.memory_map(str(shard)) as source:
            rows = pa.ipc.open_file(source).read_all().select(old.names)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, old) as ipc:
            ipc.write_table(rows.cast(old))
        blob = sink.getvalue()
        shard.write_bytes(blob.to_pybytes())
        meta.update(shard_bytes=blob.size, shard_blake2b=hashlib.blake2b(blob).hexdigest())
        pq.write_table(table.replace_schema_metadata({layout.PART_META_KEY: json.dumps(meta).encode()}), part)


def test_shards_without_per_half_checksums_are_checked_on_both_halves(cat):
    _drop_half_crcs(cat)
    packs = _pack(cat.parent)
    batch = PackedDataset(packs).batch(0)
    assert ShardView(_shards(cat)[0]).half_crcs is None
    # the half batch 0 does not use: an old shard's checksum covers both, so both are read
    shard, key = _flip_byte(cat, int(batch.row_ids[0]), twin=not _half_used(cat, batch))
    with pytest.raises(CorruptLatentError, match=f"{shard}.*{key}"):
        PackedDataset(packs)


def test_a_shard_whose_checksums_differ_from_its_index_part_is_refused_before_any_batch(cat):
    part = _parts(cat)[1]
    table = pq.read_table(part)
    crcs = table["crc32"].to_pylist()
    crcs[2] ^= 1
    pq.write_table(table.set_column(table.schema.get_field_index("crc32"), "crc32", pa.array(crcs, pa.int64())), part)
    with pytest.raises(CatalogIntegrityError, match="checksums the shard keeps do not match its index part"):
        PackedDataset(cat.parent / "packs.parquet")
    _validate(cat, "row 7", "checksum mismatch")
