"""NiT interop: the export read back by a reader written from NiT's format description, sampler
meta over the exported JSONL, import of NiT-style files, the exact round trip, resume, refusals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch

from interop_factory import make_manifest, make_rows, write_catalog
from nrdata.catalog import Catalog, LatentRow
from nrdata.interop import (
    NIT_ENCODER,
    ExportMismatchError,
    UnsupportedCatalogError,
    export_nit,
    import_nit,
)
from nrdata.packing.catalog_packs import pack_catalogs, write_pack_result

PREFIX = "dc-ae-f32c32-sana-1.1-diffusers"
SCALE = np.float32(0.41407)  # NiT multiplies the DC-AE latent by its scaling factor, in float32
TYPE_DIRS = {"native-resolution": f"{PREFIX}-native-resolution", "fixed-256x256": f"{PREFIX}-256x256"}


def read_nit(out: Path, part: str = "merge") -> list[dict]:
    """NiT's loader, in short: JSONL lines, and for each the safetensors under its type's folder."""
    lines = [json.loads(line) for line in (out / "data_meta" / f"{PREFIX}_{part}_meta.jsonl").read_text().splitlines()]
    for line in lines:
        line["tensors"] = safetensors.numpy.load_file(str(out / TYPE_DIRS[line["type"]] / line["latent_file"]))
    return lines


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> tuple[Path, list[LatentRow]]:
    root = tmp_path_factory.mktemp("nit") / "catalog"
    manifest = make_manifest("dc-ae-f32c32", ["native", "256"])
    return root, write_catalog(root, manifest, make_rows(manifest, 14, seed=3))


def test_export_reads_back_as_nit_reads_it(catalog, tmp_path):
    root, rows = catalog
    calls = []
    summary = export_nit(root, tmp_path / "nit", progress=lambda done, total: calls.append((done, total)))
    assert (summary.rows, summary.written, summary.skipped) == (len(rows), len(rows), 0)
    assert calls[-1] == (len(rows), len(rows)) and len(calls) == len(rows)

    lines = read_nit(tmp_path / "nit")
    assert len(lines) == len(rows)
    for line, row in zip(lines, rows):  # the JSONL follows catalog row order
        want_type = "native-resolution" if row.variant == "native" else "fixed-256x256"
        wnid, name = row.key.split("/")
        assert line["type"] == want_type
        assert line["image_file"] == row.key
        assert line["latent_file"] == f"{wnid}/{name.split('.')[0]}.safetensors"
        assert (line["latent_h"], line["latent_w"]) == row.latent.shape[1:]
        assert (line["ori_w"], line["ori_h"], line["image_w"], line["image_h"]) == (
            row.orig_w, row.orig_h, row.image_w, row.image_h)
        latent, label = line["tensors"]["latent"], line["tensors"]["label"]
        assert latent.dtype == np.float32 and latent.shape == (2, 32, *row.latent.shape[1:])
        assert np.array_equal(latent[0], row.latent * SCALE)  # [orig, flip]
        assert np.array_equal(latent[1], row.latent_flip * SCALE)
        assert label.shape == () and label.dtype == np.int64 and int(label) == row.label
    assert set(json.loads((tmp_path / "nit" / "nr_export.json").read_text())) >= {"identity", "catalog"}
    assert not (tmp_path / "nit" / ".nr-staging").exists()


def test_one_variant_gets_its_own_jsonl_name(catalog, tmp_path):
    root, rows = catalog
    export_nit(root, tmp_path / "nit", variant="256")
    lines = read_nit(tmp_path / "nit", part="256x256")
    crops = [r for r in rows if r.variant == "256"]
    assert [line["image_file"] for line in lines] == [r.key for r in crops]
    assert {line["type"] for line in lines} == {"fixed-256x256"}
    assert not (tmp_path / "nit" / TYPE_DIRS["native-resolution"]).exists()


def _check_sampler_meta(meta_path: Path, lines: list[dict], max_tokens: int, pack_tokens) -> None:
    packs = json.loads(meta_path.read_text())
    lengths = [line["latent_h"] * line["latent_w"] for line in lines]
    assert all(isinstance(i, int) for pack in packs for i in pack)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lines)))  # every line once per epoch
    sums = [sum(lengths[i] for i in pack) for pack in packs]
    assert max(sums) <= max_tokens
    assert sums == pack_tokens  # the packer's own token counts, recomputed from the JSONL


@pytest.mark.parametrize("variant", [None, "native"])
def test_sampler_meta_indexes_the_exported_jsonl(catalog, tmp_path, variant):
    import pyarrow.parquet as pq

    root, _ = catalog
    result = pack_catalogs([root], max_tokens=700, seed=5, epochs=2, variants=[variant] if variant else None)
    packs = write_pack_result(tmp_path / "packs.parquet", result)
    summary = export_nit(root, tmp_path / "nit", packs=packs, variant=variant)
    lines = read_nit(tmp_path / "nit", part="merge" if variant is None else "nr")
    table = pq.read_table(packs).to_pylist()
    for epoch in (0, 1):
        path = summary.outputs[f"sampler_meta_epoch{epoch}"]
        assert path.name == f"{PREFIX}_{'merge' if variant is None else 'nr'}_LPFHP_700_epoch{epoch}.json"
        pack_tokens = [r["tokens"] for r in sorted(table, key=lambda r: r["pack_id"]) if r["epoch"] == epoch]
        _check_sampler_meta(path, lines, 700, pack_tokens)


def test_packs_of_rows_the_export_leaves_out_are_refused_before_writing(catalog, tmp_path):
    root, _ = catalog
    packs = write_pack_result(tmp_path / "packs.parquet", pack_catalogs([root], max_tokens=700))
    with pytest.raises(UnsupportedCatalogError, match="same --variant"):
        export_nit(root, tmp_path / "nit", packs=packs, variant="native")
    assert not (tmp_path / "nit").exists()


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_round_trip_catalog_nit_catalog(tmp_path, dtype):
    manifest = make_manifest("dc-ae-f32c32", ["native", "256"], dtype=dtype)
    rows = write_catalog(tmp_path / "a", manifest, make_rows(manifest, 10, seed=1))
    export_nit(tmp_path / "a", tmp_path / "nit")
    summary = import_nit(tmp_path / "nit", tmp_path / "b", dtype=dtype)
    assert (summary.committed, summary.errors) == (len(rows), 0)

    back = Catalog(tmp_path / "b")
    m = back.manifest
    assert (m.encoder.name, m.encoder.quantity, m.encoder.channels, m.encoder.factor) == ("dc-ae-f32c32", "mode", 32, 32)
    assert m.encoder.scaling_factor == NIT_ENCODER.scaling_factor and m.flip == "store" and m.dtype == dtype
    assert m.variants == ("native", "256") and m.normalization.ready
    assert m.policies == manifest.policies  # the policies NiT used are the ones nr encodes with
    index = back.index.to_pylist()
    assert len(index) == len(rows)
    exact = total = 0
    for row_id, (got, row) in enumerate(zip(index, rows)):
        assert (got["key"], got["variant"], got["label"], got["class_name"]) == (
            row.key, row.variant, row.label, row.class_name)
        assert (got["orig_w"], got["orig_h"], got["image_w"], got["image_h"]) == (
            row.orig_w, row.orig_h, row.image_w, row.image_h)
        for flip, want in ((False, row.latent), (True, row.latent_flip)):
            have = back.latent(row_id, flip=flip, verify=True)
            if dtype != "float32":  # the float32 detour through NiT's x s loses nothing of these
                assert np.array_equal(have, want)
                continue
            ulps = np.abs(have.view(np.int32).astype(np.int64) - want.view(np.int32))
            assert ulps.max() <= 1
            exact, total = exact + int((ulps == 0).sum()), total + ulps.size
    if dtype == "float32":  # x s in float32 merges some neighbouring floats: most survive
        assert 0.75 < exact / total < 1

    # and the imported catalog exports to NiT's bytes again
    export_nit(tmp_path / "b", tmp_path / "nit2")
    for path in (tmp_path / "nit").rglob("*.safetensors"):
        again = safetensors.numpy.load_file(str(tmp_path / "nit2" / path.relative_to(tmp_path / "nit")))
        assert np.array_equal(again["latent"], safetensors.numpy.load_file(str(path))["latent"])


def _nit_file(path: Path, latent: torch.Tensor, label: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"latent": latent, "label": label}, str(path))


def test_import_of_released_style_files_with_float_labels_and_bad_files(tmp_path):
    """Files as NiT's preprocessing writes them (float32 labels), plus a missing, a corrupt and a
    mis-shaped one: those become error rows, the rest rows; a re-run adds nothing."""
    nit = tmp_path / "nit"
    gen = torch.Generator().manual_seed(0)
    lines, latents = [], {}
    for i in range(8):
        h, w = 1 + i % 3, 2 + i % 2
        image = f"n0000000{i % 2}/n0000000{i % 2}_{i}.JPEG"
        latent_file = f"n0000000{i % 2}/n0000000{i % 2}_{i}.safetensors"
        lines.append({"image_file": image, "latent_file": latent_file, "ori_w": 32 * w + 5, "ori_h": 32 * h + 1,
                      "latent_h": h, "latent_w": w, "image_h": 32 * h, "image_w": 32 * w, "type": "native-resolution"})
        latents[image] = torch.randn(2, 32, h, w, generator=gen) * float(SCALE)  # as NiT's encode writes them
        if i == 3:
            continue  # missing
        path = nit / "dc-ae-f32c32-sana-1.1-diffusers-native-resolution" / latent_file
        if i == 5:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"not a safetensors file")
        elif i == 6:
            _nit_file(path, latents[image][:, :, :, :1].contiguous(), torch.tensor(1.0))
        else:
            _nit_file(path, latents[image], torch.tensor(float(i % 2)))  # the float32 label quirk
    (nit / "data_meta").mkdir()
    (nit / "data_meta" / "dc-ae-f32c32-sana-1.1-diffusers_nr_meta.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines))

    summary = import_nit(nit, tmp_path / "cat", image_root="/imagenet/train")
    assert (summary.committed, summary.errors) == (5, 3)
    cat = Catalog(tmp_path / "cat")
    assert cat.manifest.source_root == "/imagenet/train" and cat.manifest.variants == ("native",)
    for row_id, row in enumerate(cat.index.to_pylist()):
        i = int(row["key"].split("_")[-1].split(".")[0])
        assert row["label"] == i % 2 and row["variant"] == "native"
        stored = latents[row["key"]].double() / float(SCALE)  # the catalog holds the unscaled latent
        assert np.array_equal(cat.latent(row_id), stored[0].float().numpy())
        assert np.array_equal(cat.latent(row_id, flip=True), stored[1].float().numpy())
        assert np.array_equal(cat.latent(row_id) * SCALE, latents[row["key"]][0].numpy())  # NiT's values again
    errors = cat.errors().to_pylist()
    assert sorted(e["key"].split("_")[-1] for e in errors) == ["3.JPEG", "5.JPEG", "6.JPEG"]
    assert all(e["stage"] == "import" and "line" in e["message"] for e in errors)

    again = import_nit(nit, tmp_path / "cat")
    assert (again.committed, again.skipped, again.errors) == (0, 5, 0)
    assert len(Catalog(tmp_path / "cat")) == 5


def test_interrupted_import_resumes_without_duplicates(catalog, tmp_path):
    root, rows = catalog
    export_nit(root, tmp_path / "nit")
    done = []

    def stop_after_six(count, total):
        done.append(count)
        if count == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        import_nit(tmp_path / "nit", tmp_path / "cat", progress=stop_after_six)
    partial = len(Catalog(tmp_path / "cat"))  # the writer commits what it had on the way out
    summary = import_nit(tmp_path / "nit", tmp_path / "cat")
    assert summary.committed == len(rows) - partial and summary.skipped == partial
    keys = [(r["key"], r["variant"]) for r in Catalog(tmp_path / "cat").index.to_pylist()]
    assert sorted(keys) == sorted((r.key, r.variant) for r in rows)


def test_resume_after_a_partial_export_writes_only_what_is_missing(catalog, tmp_path):
    root, rows = catalog
    out = tmp_path / "nit"
    export_nit(root, out)
    files = sorted(p.relative_to(out) for p in out.rglob("*.safetensors"))
    before = {p: (out / p).read_bytes() for p in files}
    for p in files[::4]:
        (out / p).unlink()
    (out / "data_meta" / f"{PREFIX}_merge_meta.jsonl").unlink()
    (out / ".nr-staging").mkdir()
    (out / ".nr-staging" / "half-written").write_bytes(b"\0" * 10)  # what a killed run leaves

    summary = export_nit(root, out)
    assert (summary.written, summary.skipped) == (len(files[::4]), len(rows) - len(files[::4]))
    assert sorted(p.relative_to(out) for p in out.rglob("*.safetensors")) == files
    assert all((out / p).read_bytes() == data for p, data in before.items())
    assert len(read_nit(out)) == len(rows)
    assert not (out / ".nr-staging").exists()


def test_an_output_holding_another_export_is_refused(catalog, tmp_path):
    root, _ = catalog
    export_nit(root, tmp_path / "nit", variant="256")
    with pytest.raises(ExportMismatchError, match="another export"):
        export_nit(root, tmp_path / "nit", variant="native")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(ExportMismatchError, match="not empty"):
        export_nit(root, tmp_path / "other")


@pytest.mark.parametrize("case, match", [
    ("sd-vae", "--encoder dc-ae-f32c32"),
    ("no-flips", "--flip"),
    ("fit-variant", "native or center-crop"),
    ("unlabelled", "label -1"),
])
def test_refusals_say_what_to_encode(tmp_path, case, match):
    if case == "sd-vae":
        manifest, kwargs = make_manifest("sd-vae-ft-ema", ["256"]), {}
    elif case == "no-flips":
        manifest, kwargs = make_manifest("dc-ae-f32c32", ["native"], flip="none"), {}
    elif case == "fit-variant":
        manifest, kwargs = make_manifest("dc-ae-f32c32", ["native", "fit:256"]), {"variant": "fit-256"}
    else:
        manifest, kwargs = make_manifest("dc-ae-f32c32", ["native"]), {}
    write_catalog(tmp_path / "cat", manifest, make_rows(manifest, 3, labelled=case != "unlabelled"))
    with pytest.raises(UnsupportedCatalogError, match=match):
        export_nit(tmp_path / "cat", tmp_path / "nit", **kwargs)
    assert not (tmp_path / "nit").exists()


def test_colliding_names_are_refused(tmp_path):
    manifest = make_manifest("dc-ae-f32c32", ["256"])
    rows = make_rows(manifest, 2)
    rows[1].key = rows[0].key.replace(".JPEG", ".png")  # same folder and stem
    write_catalog(tmp_path / "cat", manifest, rows)
    with pytest.raises(UnsupportedCatalogError, match="distinct names"):
        export_nit(tmp_path / "cat", tmp_path / "nit")
    assert not (tmp_path / "nit" / "data_meta").exists()  # nothing a NiT run could pick up


def test_catalog_is_streamed_one_part_at_a_time(catalog, tmp_path, monkeypatch):
    """The export never builds the catalog's whole index table."""
    root, rows = catalog
    monkeypatch.setattr(Catalog, "index", property(lambda self: pytest.fail("whole index loaded")))
    assert export_nit(root, tmp_path / "nit").rows == len(rows)
    assert os.listdir(tmp_path / "nit" / "data_meta")
