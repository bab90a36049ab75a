"""Catalogs grow: new variants and new images append, the same weights read from elsewhere are the
same encoder, and what would change the latents is refused with the field that differs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import diffusers
from catalog_factory import make_manifest, make_rows, write_catalog
from nrdata.catalog import Catalog, CatalogWriter, ManifestError, read_manifest, validate_catalog
from nrdata.catalog.manifest import Manifest, write_manifest
from nrdata.encoders import load_encoder
from nrdata.encoding import catalog_manifest, encode_locally
from nrdata.packing.catalog_packs import PacksMismatchError, open_packs, pack_catalogs, write_pack_result
from nrdata.policies import parse_policy
from nrdata.sources import list_image_folder
from vae_factory import KL_CONFIG, _randomise

UNIT = 8  # the tiny KL VAE's factor, patch size 1


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images in two class folders (a second folder of new images), the tiny KL VAE saved as a diffusers
    folder, the same weights re-saved in another format, and weights that differ in one tensor."""
    root = tmp_path_factory.mktemp("growth")
    rng = np.random.default_rng(0)
    for folder, count in (("images", 4), ("more", 2)):
        for i in range(count):
            cls = f"n0{i % 2}"
            (root / folder / cls).mkdir(parents=True, exist_ok=True)
            size = (int(rng.integers(40, 90)), int(rng.integers(40, 90)))
            Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(
                root / folder / cls / f"{folder}_{i}.png")
    torch.manual_seed(0)
    model = _randomise(diffusers.AutoencoderKL(**KL_CONFIG))
    model.save_pretrained(root / "kl")
    model.save_pretrained(root / "kl-copy", safe_serialization=False)  # other files, the same tensors
    with torch.no_grad():
        next(iter(model.parameters())).add_(1e-3)
    model.save_pretrained(root / "kl-other")
    return root


def _encode(world: Path, out: Path, *, source: str, variants: list[str], images: str = "images"):
    encoder = load_encoder("sd-vae-ft-ema", str(world / source))
    policies = [parse_policy(v, unit=UNIT) for v in variants]
    manifest = catalog_manifest(encoder, policies, flip=True, source_root=str(world / images))
    with CatalogWriter(out, manifest) as writer:
        return encode_locally(list_image_folder(world / images), writer, encoder, policies, flip=True)


def test_a_variant_and_a_local_copy_of_the_weights_extend_the_catalog(world, tmp_path):
    out = tmp_path / "cat"
    _encode(world, out, source="kl", variants=["native"])
    before = Catalog(out)
    first_rows = before.index.to_pylist()
    packs = write_pack_result(tmp_path / "packs.parquet", pack_catalogs([out], max_tokens=4096))

    added = _encode(world, out, source="kl", variants=["native", "64"])
    assert (added.committed, added.skipped) == (4, 4)  # only the new variant was encoded
    moved = _encode(world, out, source="kl-copy", variants=["native", "64"], images="more")
    assert (moved.committed, moved.skipped) == (4, 0)  # new images, weights read from the copy

    cat = Catalog(out)
    assert cat.manifest.variants == ("native", "64")
    assert cat.manifest.schema_version == 2 and cat.manifest.encoder_weights.startswith("sha256:")
    assert cat.manifest.encoder.source == str((world / "kl").resolve())  # the first source stays recorded
    grown = cat.manifest.notes["grown"]
    assert grown[0]["variants_added"] == ["64"]
    assert grown[1]["encoder_source"] == str((world / "kl-copy").resolve()) and grown[1]["variants_added"] == []
    assert cat.index.to_pylist()[:len(first_rows)] == first_rows  # earlier rows did not move
    assert sorted(cat.index["variant"].to_pylist()) == ["64"] * 6 + ["native"] * 6
    assert validate_catalog(out).ok
    assert cat.manifest.fingerprint != before.manifest.fingerprint
    with pytest.raises(PacksMismatchError, match="contents changed"):  # packs of the catalog before it grew
        open_packs(packs)


def test_other_weights_are_refused_with_the_reason(world, tmp_path):
    out = tmp_path / "cat"
    _encode(world, out, source="kl", variants=["native"])
    manifest_before = (out / "manifest.json").read_text()
    with pytest.raises(ManifestError) as refused:
        _encode(world, out, source="kl-other", variants=["native", "64"])
    message = str(refused.value)
    recorded = read_manifest(out).encoder_weights
    assert "encoder weights differ" in message and recorded in message and "--encoder-source" in message
    assert "\n" not in message
    assert (out / "manifest.json").read_text() == manifest_before


def test_what_changes_the_latents_is_refused_naming_the_field(tmp_path):
    manifest = make_manifest()
    write_catalog(tmp_path, make_rows(3, manifest), manifest)
    native = dict(manifest.policies[0], max_area=1024 * 1024)
    cases = {
        "flip mode differs: the catalog has 'store', this run 'none'; pass --flip": make_manifest(flip="none"),
        "variant 'native' differs: the catalog made it with max_area=4194304, this run with max_area=1048576":
            Manifest(encoder=manifest.encoder, dtype=manifest.dtype, flip=manifest.flip,
                     policies=(native, manifest.policies[1])),
        "encoder channels differs: the catalog has 4, this run 8": make_manifest(channels=8),
    }
    for reason, run in cases.items():
        with pytest.raises(ManifestError, match=reason):
            CatalogWriter(tmp_path, run)


def test_schema_1_manifests_are_read_and_upgraded_when_rows_are_added(tmp_path):
    manifest = make_manifest()
    rows = make_rows(6, manifest)
    write_catalog(tmp_path, rows[:3], manifest)
    as_v1 = {**read_manifest(tmp_path).to_dict(), "schema_version": 1}
    del as_v1["fingerprint"], as_v1["encoder_weights"]
    old = Manifest.from_dict(as_v1)
    write_manifest(tmp_path, old)
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["schema_version"] == 1 and "encoder_weights" not in data
    assert read_manifest(tmp_path).fingerprint == old.fingerprint  # its recorded fingerprint still holds

    write_catalog(tmp_path, rows[:3], manifest)  # nothing new: the manifest stays as it was
    assert json.loads((tmp_path / "manifest.json").read_text())["schema_version"] == 1

    moved = dataclasses.replace(manifest, encoder=dataclasses.replace(manifest.encoder, source="elsewhere"),
                                encoder_weights="sha256:0")
    with pytest.raises(ManifestError, match="records no content hash .* run once with --encoder-source tests/tiny"):
        CatalogWriter(tmp_path, moved)

    write_catalog(tmp_path, rows, manifest)
    upgraded = read_manifest(tmp_path)
    assert upgraded.schema_version == 2 and len(Catalog(tmp_path)) == 6 and validate_catalog(tmp_path).ok


def test_nr_encode_adds_a_variant_and_reads_the_same_weights_from_a_copy(world, tmp_path):
    """The real `nr encode` (embedded Ray) honours the same contract."""
    pytest.importorskip("ray")
    from cli import app

    out = tmp_path / "cat"
    _encode(world, out, source="kl", variants=["native"])
    result = CliRunner().invoke(app, ["encode", str(world / "images"), str(out), "--encoder", "sd-vae-ft-ema",
                                      "--encoder-source", str(world / "kl-copy"), "--variant", "native",
                                      "--variant", "64"])
    assert result.exit_code == 0, result.output
    assert "4 rows encoded, 4 already in the catalog" in result.output
    assert Catalog(out).manifest.variants == ("native", "64") and validate_catalog(out).ok

    refused = CliRunner().invoke(app, ["encode", str(world / "images"), str(out), "--encoder", "sd-vae-ft-ema",
                                       "--encoder-source", str(world / "kl-other"), "--variant", "native"])
    assert refused.exit_code == 2 and "encoder weights differ" in refused.output
