"""The catalog: written and read back exactly, idempotent, crash-safe, and validated."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from catalog_factory import make_manifest, make_rows, random_latent, write_catalog
from nrdata.catalog import (
    Catalog,
    CatalogLockedError,
    CatalogWriter,
    CorruptLatentError,
    LatentRow,
    ManifestError,
    read_manifest,
    validate_catalog,
)
from nrdata.catalog import layout

TESTS = Path(__file__).parent
REPO = TESTS.parent


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16", "uint8"])
@pytest.mark.parametrize("flip", ["store", "none"])
def test_written_catalog_reads_back_exactly(tmp_path, dtype, flip):
    manifest = make_manifest(dtype=dtype, flip=flip)
    rows = make_rows(40, manifest)
    write_catalog(tmp_path, rows, manifest, shard_rows=7)

    cat = Catalog(tmp_path)
    assert len(cat) == 40
    assert len(cat.index_parts) == 6  # 7+7+7+7+7+5
    index = cat.index.to_pylist()
    for row_id, row in enumerate(rows):
        got = cat.latent(row_id, verify=True)
        assert got.shape == row.latent.shape
        assert np.array_equal(got.view(np.uint8), row.latent.view(np.uint8))
        assert index[row_id]["key"] == row.key and index[row_id]["label"] == row.label
        assert index[row_id]["latent_h"] == row.latent.shape[1]
        if flip == "store":
            assert np.array_equal(cat.latent(row_id, flip=True).view(np.uint8), row.latent_flip.view(np.uint8))
        else:
            with pytest.raises(KeyError):
                cat.latent(row_id, flip=True)
    assert validate_catalog(tmp_path).ok


def test_torch_view_has_the_catalog_dtype(tmp_path):
    manifest = make_manifest(dtype="bfloat16", flip="none")
    rng = np.random.default_rng(1)
    value = torch.randn(4, 3, 5).to(torch.bfloat16)
    with CatalogWriter(tmp_path, manifest) as writer:
        writer.add(LatentRow(key="a", variant="native", latent=value))
        writer.add(LatentRow(key="b", variant="native", latent=random_latent(rng, 4, 2, 2, "bfloat16")))
    tensor = Catalog(tmp_path).latent_torch(0)
    assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, value)


def test_rows_from_numpy_are_views_into_the_shard_file(tmp_path):
    manifest = make_manifest()
    write_catalog(tmp_path, make_rows(5, manifest), manifest)
    latent = Catalog(tmp_path).latent(3)
    assert not latent.flags.writeable and not latent.flags.owndata  # no copy was made


def test_index_is_readable_without_nr_or_ray(tmp_path):
    manifest = make_manifest()
    write_catalog(tmp_path, make_rows(12, manifest), manifest, shard_rows=5)
    script = textwrap.dedent(f"""
        import sys
        sys.modules['nrdata'] = None  # any import of nr (or ray) now fails
        sys.modules['ray'] = None
        import json, numpy as np, polars as pl, pyarrow.parquet as pq, pyarrow as pa
        root = {str(tmp_path)!r}
        lf = pl.scan_parquet(root + '/index/*.parquet')
        counts = lf.group_by('variant').len().sort('variant').collect()
        table = pq.ParquetDataset(root + '/index').read()
        row = table.filter(pa.compute.equal(table['row_id'], 7)).to_pylist()[0]
        with pa.memory_map(root + '/shards/' + row['shard']) as src:
            batch = pa.ipc.open_file(src).get_batch(0)
            raw = batch.column('latent')[row['shard_row']].as_py()
        manifest = json.load(open(root + '/manifest.json'))
        latent = np.frombuffer(raw, manifest['dtype']).reshape(row['latent_c'], row['latent_h'], row['latent_w'])
        print(json.dumps({{"counts": counts.to_dicts(), "rows": table.num_rows, "sum": float(latent.astype('f8').sum())}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["rows"] == 12
    assert result["counts"] == [{"variant": "256", "len": 4}, {"variant": "native", "len": 8}]
    assert result["sum"] == pytest.approx(float(Catalog(tmp_path).latent(7).astype("f8").sum()))


def test_rewriting_the_same_keys_is_idempotent(tmp_path):
    manifest = make_manifest()
    rows = make_rows(20, manifest)
    write_catalog(tmp_path, rows[:12], manifest, shard_rows=5)
    with CatalogWriter(tmp_path, manifest, shard_rows=5) as writer:
        accepted = [writer.add(r) for r in rows]
    assert accepted == [False] * 12 + [True] * 8
    assert writer.summary.skipped == 12 and writer.summary.committed == 8
    cat = Catalog(tmp_path)
    assert [r["key"] for r in cat.index.to_pylist()] == [r.key for r in rows]
    assert cat.index["row_id"].to_pylist() == list(range(20))  # earlier row ids did not move
    assert validate_catalog(tmp_path).ok


def test_appending_changes_the_content_fingerprint_not_the_manifest_fingerprint(tmp_path):
    manifest = make_manifest()
    rows = make_rows(10, manifest)
    write_catalog(tmp_path, rows[:5], manifest)
    before = Catalog(tmp_path)
    content_before = before.content_fingerprint()
    write_catalog(tmp_path, rows, manifest)
    after = Catalog(tmp_path)
    assert before.manifest.fingerprint == after.manifest.fingerprint
    assert content_before != after.content_fingerprint()


def test_a_catalog_refuses_latents_made_differently(tmp_path):
    write_catalog(tmp_path, make_rows(3, make_manifest()), make_manifest())
    with pytest.raises(ManifestError, match="dtype"):
        CatalogWriter(tmp_path, make_manifest(dtype="float32"))


def test_a_hand_edited_manifest_is_refused(tmp_path):
    write_catalog(tmp_path, make_rows(3, make_manifest()), make_manifest())
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["dtype"] = "float32"
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="edited by hand"):
        read_manifest(tmp_path)
    assert not validate_catalog(tmp_path).ok


def test_one_writer_at_a_time(tmp_path):
    manifest = make_manifest()
    with CatalogWriter(tmp_path, manifest):
        with pytest.raises(CatalogLockedError, match="another process"):
            CatalogWriter(tmp_path, manifest)
    CatalogWriter(tmp_path, manifest).close()  # the lock is released on close


def test_wrong_shapes_and_variants_are_refused(tmp_path):
    manifest = make_manifest()
    rng = np.random.default_rng(0)
    good = random_latent(rng, 4, 2, 3, "float16")
    with CatalogWriter(tmp_path, manifest) as writer:
        with pytest.raises(ValueError, match="variant"):
            writer.add(LatentRow(key="a", variant="1024", latent=good, latent_flip=good))
        with pytest.raises(ValueError, match=r"\[4, h, w\]"):
            writer.add(LatentRow(key="a", variant="native", latent=good[:3], latent_flip=good[:3]))
        with pytest.raises(ValueError, match="flip"):
            writer.add(LatentRow(key="a", variant="native", latent=good))
        with pytest.raises(TypeError, match="dtype"):
            writer.add(LatentRow(key="a", variant="native", latent=good.astype(np.float32),
                                 latent_flip=good.astype(np.float32)))
    bf16 = make_manifest(dtype="bfloat16", flip="none")
    with CatalogWriter(tmp_path / "bf16", bf16) as writer:
        with pytest.raises(TypeError, match="bfloat16"):  # same width, different numbers
            writer.add(LatentRow(key="a", variant="native", latent=good))


def test_non_finite_latents_become_error_rows(tmp_path):
    manifest = make_manifest()
    rng = np.random.default_rng(0)
    good = random_latent(rng, 4, 2, 3, "float16")
    bad = good.copy()
    bad[1, 0, 2] = np.nan
    with CatalogWriter(tmp_path, manifest) as writer:
        assert writer.add(LatentRow(key="ok", variant="native", latent=good, latent_flip=good))
        assert not writer.add(LatentRow(key="nan", variant="native", latent=good, latent_flip=bad))
    cat = Catalog(tmp_path)
    assert cat.index["key"].to_pylist() == ["ok"]
    errors = cat.errors().to_pylist()
    assert [(e["key"], e["stage"]) for e in errors] == [("nan", "encode")]
    assert "non-finite" in errors[0]["message"]


def test_errors_are_recorded_once_and_hidden_once_resolved(tmp_path):
    manifest = make_manifest()
    rows = make_rows(3, manifest)
    for _ in range(2):  # a re-run meets the same bad file again
        with CatalogWriter(tmp_path, manifest) as writer:
            writer.add_error("bad/zero.jpg", "decode", "zero-byte file", source="bad/zero.jpg")
            writer.add_error(rows[0].key, "decode", "transient failure")
    cat = Catalog(tmp_path)
    assert sorted(cat.errors()["key"].to_pylist()) == sorted(["bad/zero.jpg", rows[0].key])
    write_catalog(tmp_path, rows, manifest)  # the transient failure succeeds later
    cat = Catalog(tmp_path)
    assert cat.errors()["key"].to_pylist() == ["bad/zero.jpg"]
    assert len(cat.errors(include_resolved=True)) == 2


def test_manifest_statistics_are_exact_over_all_stored_latents(tmp_path):
    manifest = make_manifest(dtype="float32")
    rows = make_rows(30, manifest)
    write_catalog(tmp_path, rows[:17], manifest, shard_rows=4)
    write_catalog(tmp_path, rows, manifest, shard_rows=6)  # a second run: stats merge across runs
    values = np.concatenate([a.reshape(4, -1) for r in rows for a in (r.latent, r.latent_flip)], axis=1)
    norm = read_manifest(tmp_path).normalization
    assert norm.count == values.shape[1]
    np.testing.assert_allclose(norm.mean, values.astype(np.float64).mean(axis=1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(norm.std, values.astype(np.float64).std(axis=1), rtol=1e-10)


def test_moments_statistics_cover_the_mean_half_only(tmp_path):
    manifest = make_manifest(dtype="float32", flip="none", channels=2, quantity="moments")
    rng = np.random.default_rng(3)
    latents = [np.concatenate([rng.normal(5, 2, (2, 3, 3)), rng.normal(-9, 1, (2, 3, 3))]).astype(np.float32)
               for _ in range(4)]
    with CatalogWriter(tmp_path, manifest) as writer:
        for i, latent in enumerate(latents):
            writer.add(LatentRow(key=str(i), variant="native", latent=latent))
    means = np.concatenate([z[:2].reshape(2, -1) for z in latents], axis=1).mean(axis=1)
    np.testing.assert_allclose(read_manifest(tmp_path).normalization.mean, means, rtol=1e-6)


# -- corruption is caught ------------------------------------------------------------------

@pytest.fixture
def valid_catalog(tmp_path):
    manifest = make_manifest()
    write_catalog(tmp_path, make_rows(30, manifest), manifest, shard_rows=10)
    assert validate_catalog(tmp_path).ok
    return tmp_path


def _shards(root: Path) -> list[Path]:
    return layout.listing(root / layout.SHARD_DIR, layout.SHARD_SUFFIX)


def test_validate_catches_a_flipped_byte_in_a_shard(valid_catalog):
    cat = Catalog(valid_catalog)
    target = cat.index.to_pylist()[13]
    shard = valid_catalog / "shards" / target["shard"]
    data = bytearray(shard.read_bytes())
    latent = cat.latent(13)
    offset = data.find(latent.tobytes())  # the row's bytes inside the file
    assert offset > 0
    data[offset + 5] ^= 0x10
    shard.write_bytes(bytes(data))

    report = validate_catalog(valid_catalog)
    assert not report.ok
    text = " ".join(report.problems)
    assert target["shard"] in text and "checksum" in text and target["key"] in text
    with pytest.raises(CorruptLatentError):
        Catalog(valid_catalog).latent(13, verify=True)


def test_validate_catches_a_missing_shard(valid_catalog):
    _shards(valid_catalog)[1].unlink()
    report = validate_catalog(valid_catalog)
    assert not report.ok and any("missing" in p and "10 rows lost" in p for p in report.problems)


def test_validate_catches_an_index_row_pointing_nowhere(valid_catalog):
    part = layout.listing(valid_catalog / layout.INDEX_DIR, layout.PART_SUFFIX)[2]
    table = pq.read_table(part)
    rows = table["shard_row"].to_pylist()
    rows[4] = 99
    table = table.set_column(table.schema.get_field_index("shard_row"), "shard_row", pa.array(rows, pa.int32()))
    pq.write_table(table, part)  # keeps the part metadata, so only the pointer is wrong
    report = validate_catalog(valid_catalog)
    assert not report.ok
    assert any("shard row 99" in p for p in report.problems)


def test_validate_catches_duplicated_rows(valid_catalog):
    parts = layout.listing(valid_catalog / layout.INDEX_DIR, layout.PART_SUFFIX)
    table = pq.read_table(parts[0])
    keys = table["key"].to_pylist()
    keys[1] = keys[0]
    variants = table["variant"].to_pylist()
    variants[1] = variants[0]
    table = table.set_column(1, "key", pa.array(keys)).set_column(2, "variant", pa.array(variants))
    pq.write_table(table, parts[0])
    report = validate_catalog(valid_catalog)
    assert any("duplicated" in p for p in report.problems)


def test_validate_reports_an_unreadable_index_part(valid_catalog):
    part = layout.listing(valid_catalog / layout.INDEX_DIR, layout.PART_SUFFIX)[0]
    part.write_bytes(part.read_bytes()[:100])
    report = validate_catalog(valid_catalog)
    assert not report.ok and any("unreadable" in p for p in report.problems)


# -- a writer killed at any moment ---------------------------------------------------------

KILLER = """
import os, signal, sys
sys.path.insert(0, {tests!r})
from catalog_factory import make_manifest, make_rows
import nrdata.catalog.writer as writer_module
from nrdata.catalog import CatalogWriter

kill_at = {kill_at}
calls = 0
real_publish = writer_module.publish

def publish(tmp, final):
    global calls
    calls += 1
    if calls == kill_at:  # the temporary file is complete but not renamed yet
        os.kill(os.getpid(), signal.SIGKILL)
    real_publish(tmp, final)
    if -calls == kill_at:  # renamed, and nothing after it happened
        os.kill(os.getpid(), signal.SIGKILL)

writer_module.publish = publish
manifest = make_manifest()
writer = CatalogWriter({root!r}, manifest, shard_rows=6)
for i, row in enumerate(make_rows(40, manifest)):
    writer.add(row)
    if i == 27 and kill_at == 0:
        os.kill(os.getpid(), signal.SIGKILL)  # half-way through a shard: rows only in memory
writer.close()
"""


# publish calls alternate: shard (odd), index part (even). Kill before/after each rename.
@pytest.mark.parametrize("kill_at", [0, 3, -3, 4, -4])
def test_a_writer_killed_mid_shard_leaves_a_valid_catalog_that_a_rerun_completes(tmp_path, kill_at):
    root = tmp_path / "cat"
    script = KILLER.format(tests=str(TESTS), kill_at=kill_at, root=str(root))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    report = validate_catalog(root)
    assert report.ok, report.problems
    warnings = " ".join(report.warnings)
    assert ("temporary" in warnings) == (kill_at in (3, 4))
    assert ("without an index part" in warnings) == (kill_at in (-3, 4))
    survivors = Catalog(root)
    assert 0 < len(survivors) < 40
    for row_id in range(len(survivors)):
        survivors.latent(row_id, verify=True)

    manifest = make_manifest()
    rows = make_rows(40, manifest)
    write_catalog(root, rows, manifest, shard_rows=6)
    report = validate_catalog(root)
    assert report.ok and not report.warnings  # the re-run cleaned the leftovers
    cat = Catalog(root)
    keys = cat.index["key"].to_pylist()
    assert sorted(keys) == sorted(r.key for r in rows) and len(set(keys)) == 40
    by_key = {r.key: r for r in rows}
    for row_id, key in enumerate(keys):
        assert np.array_equal(cat.latent(row_id), by_key[key].latent)


def test_a_writer_killed_at_a_random_moment(tmp_path):
    """Not only at chosen points: SIGKILL from outside while shards are being written."""
    root = tmp_path / "cat"
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        from catalog_factory import make_manifest, make_rows
        from nrdata.catalog import CatalogWriter
        manifest = make_manifest()
        rows = make_rows(400, manifest)
        with CatalogWriter({str(root)!r}, manifest, shard_rows=3) as writer:
            for i, row in enumerate(rows):
                writer.add(row)
                if i == 30:
                    print("started", flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "started"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert validate_catalog(root).ok
    manifest = make_manifest()
    write_catalog(root, make_rows(400, manifest), manifest, shard_rows=50)
    cat = Catalog(root)
    assert len(cat) == 400 and len(set(cat.index["key"].to_pylist())) == 400
    assert validate_catalog(root).ok
