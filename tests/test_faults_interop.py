"""Defects found by reading our exports with the peers' own loaders: NiT sampler meta from `nr pack
--nit-json`, the FiT refusal's encode hint, a missing packs file, and the NiT name prefix."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import diffusers
from cli import app
from interop_factory import make_manifest, make_rows, write_catalog
from nrdata.catalog import CatalogWriter
from nrdata.encoding import encode_locally
from nrdata.interop import UnsupportedCatalogError, export_fit
from nrdata.sources import list_source
from vae_factory import KL_CONFIG, _randomise

PREFIX = "dc-ae-f32c32-sana-1.1-diffusers"
runner = CliRunner()


@pytest.fixture(scope="module")
def nit_catalog(tmp_path_factory) -> Path:
    """A DC-AE catalog with two variants, native and 256: each image's rows are interleaved, so the
    row ids of one variant are not the line numbers of its JSONL."""
    root = tmp_path_factory.mktemp("nit") / "catalog"
    manifest = make_manifest("dc-ae-f32c32", ["native", "256"])
    write_catalog(root, manifest, make_rows(manifest, 12, seed=4))
    return root


def _read_as_nit(jsonl: Path, sampler_meta: Path) -> tuple[list[dict], list[list[int]]]:
    """What NiT's dataset does: the JSONL as a list of lines, the sampler meta as packs of indices into it."""
    lines = [json.loads(line) for line in jsonl.read_text().splitlines()]
    return lines, json.loads(sampler_meta.read_text())


@pytest.mark.parametrize("variant", ["256", None])
def test_nit_json_of_nr_pack_indexes_the_lines_nr_export_nit_writes(nit_catalog, tmp_path, variant):
    flags = ["--variant", variant] if variant else []
    packs, meta = tmp_path / "packs.parquet", tmp_path / "meta.json"
    packed = runner.invoke(app, ["pack", str(nit_catalog), "-L", "600", "--out", str(packs), "--nit-json", str(meta),
                                 *flags])
    assert packed.exit_code == 0, packed.output
    exported = runner.invoke(app, ["export", "nit", str(nit_catalog), "--out", str(tmp_path / "nit"), *flags])
    assert exported.exit_code == 0, exported.output
    part = {"256": "256x256", "native": "nr", None: "merge"}[variant]
    lines, nit_packs = _read_as_nit(tmp_path / "nit" / "data_meta" / f"{PREFIX}_{part}_meta.jsonl", meta)

    import polars as pl

    table = pl.read_parquet(packs).filter(pl.col("epoch") == 0).sort("pack_id")
    index = pl.read_parquet(nit_catalog / "index").sort("row_id")
    assert len(nit_packs) == table.height
    for pack, row_ids in zip(nit_packs, table["row_ids"].to_list()):
        assert all(0 <= i < len(lines) for i in pack)
        for i, row_id in zip(pack, row_ids):  # line i is the very row the packer chose
            row = index.row(row_id, named=True)
            assert (lines[i]["image_file"], lines[i]["latent_h"], lines[i]["latent_w"]) == (
                row["source"], row["latent_h"], row["latent_w"])
            if variant == "256":
                assert lines[i]["type"] == "fixed-256x256" and (lines[i]["latent_h"], lines[i]["latent_w"]) == (8, 8)
    assert sorted(i for pack in nit_packs for i in pack) == list(range(len(lines)))


def test_nit_json_refuses_rows_no_nit_jsonl_holds(tmp_path):
    manifest = make_manifest("sd-vae-ft-ema", ["fit:128", "256"], unit=16)
    write_catalog(tmp_path / "cat", manifest, make_rows(manifest, 4, seed=1))
    result = runner.invoke(app, ["pack", str(tmp_path / "cat"), "-L", "4096", "--out", str(tmp_path / "p.parquet"),
                                 "--nit-json", str(tmp_path / "meta.json")])
    assert result.exit_code == 2 and "fit-128" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "meta.json").exists()


def test_export_nit_with_a_missing_packs_file_is_one_error_line(nit_catalog, tmp_path):
    missing = tmp_path / "no-such-packs.parquet"
    result = runner.invoke(app, ["export", "nit", str(nit_catalog), "--out", str(tmp_path / "nit"),
                                 "--packs", str(missing)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if "error" in line]
    assert len(errors) == 1 and "no such packs file" in errors[0] and "nr pack" in " ".join(result.output.split())


def test_export_nit_takes_a_prefix(nit_catalog, tmp_path):
    help_text = runner.invoke(app, ["export", "--help"]).output
    assert "--prefix" in help_text
    result = runner.invoke(app, ["export", "nit", str(nit_catalog), "--out", str(tmp_path / "nit"),
                                 "--variant", "native", "--prefix", "my-ae"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "nit" / "data_meta" / "my-ae_nr_meta.jsonl").is_file()
    assert any((tmp_path / "nit" / "my-ae-native-resolution").rglob("*.safetensors"))
    refused = runner.invoke(app, ["export", "fit", str(nit_catalog), "--out", str(tmp_path / "fit"),
                                  "--prefix", "x"])
    assert refused.exit_code == 2 and "applies to nit" in refused.output


def _encode_without_ray(config, on_progress=None):
    """run_encode's encoder, policies and manifest from the same config, encoded in this process."""
    from pipelines.encode import EncodeProgress, EncodeSummary, load_encoder, run_manifest

    encoder = load_encoder(config.encoder)
    policies, manifest = run_manifest(config, encoder)
    with CatalogWriter(config.out, manifest) as writer:
        encode_locally(list_source(config.source), writer, encoder, policies, flip=config.flip)
    summary = writer.summary
    return EncodeSummary(config.out, 0, summary.committed, summary.skipped, summary.errors, 0.0, EncodeProgress(),
                         {"mode": "none"})


def test_following_the_fit_refusal_hint_makes_a_catalog_fit_exports(tmp_path, monkeypatch):
    import pipelines.encode

    monkeypatch.setattr(pipelines.encode, "run_encode", _encode_without_ray)
    rng = np.random.default_rng(0)
    for i in range(2):
        (tmp_path / "images" / f"n0{i}").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 72, 3), dtype=np.uint8)).save(
            tmp_path / "images" / f"n0{i}" / f"img{i}.png")
    torch.manual_seed(0)
    _randomise(diffusers.AutoencoderKL(**KL_CONFIG)).save_pretrained(tmp_path / "kl")

    def encode(args: list[str]) -> None:
        result = runner.invoke(app, [*args, "--encoder-source", str(tmp_path / "kl")])
        assert result.exit_code == 0, result.output

    # a catalog of f8 latents at the encoder's unit (patch size 1): FiT's 2x2 patches need unit 16
    encode(["encode", str(tmp_path / "images"), str(tmp_path / "unit8"), "--encoder", "sd-vae-ft-ema",
            "--variant", "fit:256", "--variant", "256", "--flip"])
    with pytest.raises(UnsupportedCatalogError, match="encode with: ") as refused:
        export_fit(tmp_path / "unit8", tmp_path / "fit")
    hint = str(refused.value).split("encode with: ")[1].split()
    assert hint[:4] == ["nr", "encode", "SOURCE", "CATALOG"]
    encode(["encode", str(tmp_path / "images"), str(tmp_path / "unit16"), *hint[4:]])
    summary = export_fit(tmp_path / "unit16", tmp_path / "fit")
    assert summary.rows == 2 and summary.written == 2
