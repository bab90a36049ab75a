"""nr pack on catalogs: merged row ids, variant filters, fingerprints that refuse changed catalogs."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from catalog_factory import make_manifest, make_rows, write_catalog
from cli import app
from nrdata.catalog import Catalog
from nrdata.packing.catalog_packs import PacksMismatchError, locate, open_packs, pack_catalogs, select_rows


@pytest.fixture
def two_catalogs(tmp_path):
    manifest = make_manifest()
    write_catalog(tmp_path / "a", make_rows(30, manifest, seed=1, prefix="a"), manifest)
    write_catalog(tmp_path / "b", make_rows(25, manifest, seed=2, prefix="b"), manifest)
    return [tmp_path / "a", tmp_path / "b"]


def test_merged_row_ids_cover_every_selected_row_once_per_epoch(two_catalogs):
    result = pack_catalogs(two_catalogs, max_tokens=128, epochs=3, world_size=2, variants=["native"])
    cats = [Catalog(p) for p in two_catalogs]
    expected = {(i, r["row_id"]) for i, c in enumerate(cats) for r in c.index.to_pylist() if r["variant"] == "native"}
    for packing in result.packings:
        which, local = locate(packing.row_ids, result.metadata)
        got = list(zip(which.tolist(), local.tolist()))
        assert len(got) == len(set(got)) and set(got) == expected
        # tokens recorded per pack are the catalogs' latent sizes
        for p in range(packing.n_packs):
            w, l = locate(packing.pack(p), result.metadata)
            sizes = [cats[i].index["latent_h"][j].as_py() * cats[i].index["latent_w"][j].as_py()
                     for i, j in zip(w.tolist(), l.tolist())]
            assert sum(sizes) == packing.tokens[p] <= 128
    assert [c["row_offset"] for c in result.metadata["catalogs"]] == [0, 30]


def test_patch_size_divides_tokens_or_is_refused(two_catalogs):
    full = select_rows(two_catalogs, patch_size=1, variants=["256"])
    halved = select_rows(two_catalogs, patch_size=2, variants=["256"])  # 256 rows are 8x8 latents
    assert np.array_equal(halved.lengths * 4, full.lengths)
    with pytest.raises(ValueError, match="patch size 2 does not divide"):
        select_rows(two_catalogs, patch_size=2)
    with pytest.raises(ValueError, match="none of the variants"):
        select_rows(two_catalogs, variants=["1024"])


def test_packs_of_a_changed_catalog_are_refused(two_catalogs, tmp_path):
    from nrdata.packing.catalog_packs import write_pack_result

    packs = tmp_path / "packs.parquet"
    write_pack_result(packs, pack_catalogs(two_catalogs, max_tokens=128))
    table, metadata, cats = open_packs(packs)
    assert len(cats) == 2 and table.num_rows > 0
    manifest = make_manifest()
    write_catalog(two_catalogs[1], make_rows(27, manifest, seed=2, prefix="b"), manifest)  # two rows appended
    with pytest.raises(PacksMismatchError, match="contents changed"):
        open_packs(packs)


def test_nr_pack_writes_packs_report_plot_and_nit_json(two_catalogs, tmp_path):
    out = tmp_path / "packs.parquet"
    nit = tmp_path / "sampler_meta.json"
    result = CliRunner().invoke(app, ["pack", *map(str, two_catalogs), "-L", "100", "--out", str(out),
                                      "--epochs", "2", "--ranks", "2", "--nit-json", str(nit)])
    assert result.exit_code == 0, result.output
    assert "efficiency" in result.output
    frame = pl.read_parquet(out)
    assert sorted(frame["epoch"].unique().to_list()) == [0, 1]
    assert out.with_suffix(".png").stat().st_size > 1000
    report = json.loads(out.with_suffix(".report.json").read_text())
    assert report["epoch0"]["packs"] == frame.filter(pl.col("epoch") == 0).height
    packs = json.loads(nit.read_text())
    assert sorted(i for p in packs for i in p) == list(range(55))


def test_nr_pack_explains_items_longer_than_l(two_catalogs, tmp_path):
    result = CliRunner().invoke(app, ["pack", str(two_catalogs[0]), "-L", "20", "--out", str(tmp_path / "p.parquet")])
    assert result.exit_code == 2 and "longer than max_tokens=20" in " ".join(result.output.split())
    dropped = CliRunner().invoke(app, ["pack", str(two_catalogs[0]), "-L", "20", "--out", str(tmp_path / "p.parquet"),
                                       "--drop-too-long"])
    assert dropped.exit_code == 0, dropped.output
