"""FiT, LightningDiT, fast-DiT/U-DiT and U-ViT/DiMR exports, each read back by a reader written from
the format's description (reference/peers.md), not by nr; resume; refusals."""

from __future__ import annotations

import os
from glob import glob
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import torch

from interop_factory import make_manifest, make_rows, write_catalog
from nrdata.interop import (
    UnsupportedCatalogError,
    export_fastdit,
    export_fit,
    export_lightningdit,
    export_uvit,
)

SD_SCALE = np.float32(0.18215)


def mean_of(moments: np.ndarray) -> np.ndarray:
    return moments[: moments.shape[0] // 2]


# -- FiT -----------------------------------------------------------------------------------------

FIT_SIZES = [(40, 50), (100, 90), (300, 200), (600, 100), (129, 500), (250, 60), (700, 650), (120, 130)]


@pytest.fixture(scope="module")
def fit_catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit") / "catalog"
    manifest = make_manifest("sd-vae-ft-ema", ["fit:128", "128"], quantity="moments", unit=16)
    return root, write_catalog(root, manifest, make_rows(manifest, len(FIT_SIZES), seed=2, sizes=FIT_SIZES))


def unpatchify(feature: np.ndarray) -> np.ndarray:
    """FiT's `h w (c p1 p2) -> c (h p1) (w p2)` for one latent [h, w, 16]."""
    h, w, _ = feature.shape
    return feature.reshape(h, w, 4, 2, 2).transpose(2, 0, 3, 1, 4).reshape(4, 2 * h, 2 * w)


def test_fit_export_reads_back_as_fit_reads_it(fit_catalog, tmp_path):
    root, rows = fit_catalog
    summary = export_fit(root, tmp_path / "fit", draw="mode")
    out = tmp_path / "fit"
    s, tokens = 128, 64
    by_name = {}
    for row in rows:
        by_name.setdefault(row.key.split("/")[1].split(".")[0] + ".safetensors", {})[row.variant] = row

    expected_buckets = {}
    for name, variants in by_name.items():
        row = variants["fit-128"]
        if row.orig_w * row.orig_h >= s * s:
            expected_buckets[name] = f"greater_than_{tokens}_resize"
        elif (row.latent.shape[1] // 2) * (row.latent.shape[2] // 2) < 16:
            expected_buckets[name] = "less_than_16"
        else:
            expected_buckets[name] = f"from_16_to_{tokens}"
    listed = {b: sorted(os.listdir(out / b)) for b in
              ("less_than_16", f"from_16_to_{tokens}", f"greater_than_{tokens}_resize", f"greater_than_{tokens}_crop")}
    for bucket in listed:
        if bucket.endswith("_crop"):
            continue
        assert listed[bucket] == sorted(n for n, b in expected_buckets.items() if b == bucket)
    crops = sorted(n for n, v in by_name.items() if v["128"].orig_w > s and v["128"].orig_h > s)
    assert listed[f"greater_than_{tokens}_crop"] == crops and crops
    assert set(crops) <= set(listed[f"greater_than_{tokens}_resize"])  # FiT pairs them by name
    assert all(listed.values())  # the sizes above reach every bucket
    assert summary.rows == summary.written == len(by_name) + len(crops)

    for bucket, names in listed.items():
        for name in names:
            data = safetensors.numpy.load_file(str(out / bucket / name))
            row = by_name[name]["128" if bucket.endswith("_crop") else "fit-128"]
            assert set(data) == {"feature", "grid", "size", "label"}
            h, w = row.latent.shape[1] // 2, row.latent.shape[2] // 2
            assert data["feature"].shape == (2, h, w, 16) and data["feature"].dtype == np.float32
            assert np.array_equal(unpatchify(data["feature"][0]), mean_of(row.latent) * SD_SCALE)
            assert np.array_equal(unpatchify(data["feature"][1]), mean_of(row.latent_flip) * SD_SCALE)
            t = np.arange(h * w)
            assert np.array_equal(data["grid"], np.stack([t % w, t // w]))  # row 0: w index, row 1: h index
            assert data["size"].tolist() == [h, w]
            assert data["label"].shape == (1,) and data["label"].dtype == np.int64 and data["label"][0] == row.label


def test_fit_samples_are_seeded_per_row_and_follow_the_moments(fit_catalog, tmp_path):
    root, rows = fit_catalog
    export_fit(root, tmp_path / "a", seed=7)
    export_fit(root, tmp_path / "b", seed=7)
    noise = []
    for path in sorted((tmp_path / "a").rglob("*.safetensors")):
        a = safetensors.numpy.load_file(str(path))["feature"]
        assert np.array_equal(a, safetensors.numpy.load_file(str(tmp_path / "b" / path.relative_to(tmp_path / "a")))["feature"])
        if "crop" in path.parent.name:
            continue
        row = next(r for r in rows if r.variant == "fit-128" and r.key.endswith("/" + path.stem + ".JPEG"))
        c = row.latent.shape[0] // 2
        z = unpatchify(a[0]) / SD_SCALE
        noise.append(((z - row.latent[:c]) / np.exp(0.5 * row.latent[c:])).ravel())
    noise = np.concatenate(noise)
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05  # mean + std * N(0, 1)


# -- LightningDiT --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vavae_catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldit") / "catalog"
    manifest = make_manifest("va-vae-f16d32", ["256"], quantity="moments")
    return root, write_catalog(root, manifest, make_rows(manifest, 23, seed=4), shard_rows=7)


def read_lightningdit(data_dir: Path):
    """LightningDiT's ImgLatentDataset, in short: sorted *.safetensors, rows in order, slices by key."""
    latents, flips, labels = [], [], []
    for path in sorted(glob(os.path.join(data_dir, "*.safetensors"))):
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            assert set(f.keys()) == {"latents", "latents_flip", "labels"}
            n = f.get_slice("labels").get_shape()[0]
            assert f.metadata()["total_size"] == str(n)
            latents.append(f.get_slice("latents")[0:n])
            flips.append(f.get_slice("latents_flip")[0:n])
            labels.append(f.get_slice("labels")[0:n])
    return torch.cat(latents), torch.cat(flips), torch.cat(labels)


def test_lightningdit_shards_and_stats(vavae_catalog, tmp_path):
    root, rows = vavae_catalog
    calls = []
    summary = export_lightningdit(root, tmp_path / "ld", draw="mode", shard_rows=10,
                                  progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (23, 23) and summary.written == 23
    names = sorted(p.name for p in (tmp_path / "ld").glob("*.safetensors"))
    assert names == [f"latents_rank00_shard{i:03d}.safetensors" for i in range(3)]
    latents, flips, labels = read_lightningdit(tmp_path / "ld")
    assert latents.shape == (23, 32, 16, 16) and latents.dtype == torch.float32 and labels.dtype == torch.int64
    assert labels.tolist() == [r.label for r in rows]
    for i, row in enumerate(rows):  # unscaled: LightningDiT normalises with the stats file
        assert np.array_equal(latents[i].numpy(), mean_of(row.latent))
        assert np.array_equal(flips[i].numpy(), mean_of(row.latent_flip))
    stats = torch.load(tmp_path / "ld" / "latents_stats.pt")
    assert stats["mean"].shape == stats["std"].shape == (1, 32, 1, 1) and stats["std"].dtype == torch.float32
    torch.testing.assert_close(stats["mean"], latents.mean(dim=[0, 2, 3], keepdim=True), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats["std"], latents.std(dim=[0, 2, 3], keepdim=True), rtol=1e-5, atol=1e-6)


def test_lightningdit_resumes_shard_by_shard(vavae_catalog, tmp_path):
    root, _ = vavae_catalog
    out = tmp_path / "ld"
    export_lightningdit(root, out, shard_rows=10, seed=3)
    before = read_lightningdit(out)
    stats_before = torch.load(out / "latents_stats.pt")
    (out / "latents_rank00_shard001.safetensors").unlink()
    (out / "latents_stats.pt").unlink()
    summary = export_lightningdit(root, out, shard_rows=10, seed=3)
    assert (summary.written, summary.skipped, summary.rows) == (10, 13, 23)
    assert sorted(p.name for p in out.glob("*.safetensors")) == [f"latents_rank00_shard{i:03d}.safetensors" for i in range(3)]
    for again, first in zip(read_lightningdit(out), before):  # the same samples again
        assert torch.equal(again, first)
    stats = torch.load(out / "latents_stats.pt")
    torch.testing.assert_close(stats["mean"], stats_before["mean"], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats["std"], stats_before["std"], rtol=1e-6, atol=1e-7)


# -- fast-DiT / U-DiT ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdvae_catalog(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd") / "catalog"
    manifest = make_manifest("sd-vae-ft-ema", ["256"], quantity="moments")
    return root, write_catalog(root, manifest, make_rows(manifest, 9, seed=5))


def udit_order(names: list[str]) -> list[str]:
    """U-DiT's fastdit_kit: sort by int(step) * 8 + rank, drop the last (padded) file."""
    return sorted(names, key=lambda x: int(x.split("_")[0]) * 8 + int(x[-5]))[:-1]


def test_fastdit_files_as_fastdit_and_udit_read_them(sdvae_catalog, tmp_path):
    root, rows = sdvae_catalog
    summary = export_fastdit(root, tmp_path / "fd", draw="mode", seed=1)
    features_dir, labels_dir = tmp_path / "fd" / "imagenet256_features", tmp_path / "fd" / "imagenet256_labels"
    features, labels = sorted(os.listdir(features_dir)), sorted(os.listdir(labels_dir))
    assert features == labels and len(features) == len(rows) + 1  # fast-DiT pairs them by sorted name
    order = udit_order(features)
    assert len(order) == len(rows) == summary.rows
    mirrored = []
    for name, row in zip(order, rows):
        x, y = np.load(features_dir / name), np.load(labels_dir / name)
        assert x.shape == (1, 4, 32, 32) and x.dtype == np.float32
        assert y.shape == (1,) and y.dtype == np.int64 and y[0] == row.label
        own, mirror = mean_of(row.latent) * SD_SCALE, mean_of(row.latent_flip) * SD_SCALE
        assert np.array_equal(x[0], own) or np.array_equal(x[0], mirror)
        mirrored.append(np.array_equal(x[0], mirror))
    assert 0 < sum(mirrored) < len(rows)  # one of the two at random
    padding = f"{len(rows)}_0.npy"  # what U-DiT drops: the last image again
    assert np.array_equal(np.load(features_dir / padding), np.load(features_dir / order[-1]))


def test_fastdit_resume_rewrites_a_row_missing_either_file(sdvae_catalog, tmp_path):
    root, rows = sdvae_catalog
    out = tmp_path / "fd"
    export_fastdit(root, out, udit_padding=False)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*.npy")}
    (out / "imagenet256_labels" / "3_0.npy").unlink()
    (out / "imagenet256_features" / "5_0.npy").unlink()
    summary = export_fastdit(root, out, udit_padding=False)
    assert (summary.written, summary.skipped) == (2, len(rows) - 2)
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*.npy")} == before


def test_fastdit_without_flips_keeps_the_images_own_latent(tmp_path):
    manifest = make_manifest("sd-vae-ft-ema", ["256"], quantity="moments", flip="none")
    rows = write_catalog(tmp_path / "cat", manifest, make_rows(manifest, 3))
    with pytest.raises(UnsupportedCatalogError, match="flips='none'"):
        export_fastdit(tmp_path / "cat", tmp_path / "fd")
    export_fastdit(tmp_path / "cat", tmp_path / "fd", flips="none", draw="mode", udit_padding=False)
    for k, row in enumerate(rows):
        assert np.array_equal(np.load(tmp_path / "fd" / "imagenet256_features" / f"{k}_0.npy")[0],
                              mean_of(row.latent) * SD_SCALE)


# -- U-ViT / DiMR --------------------------------------------------------------------------------


def test_uvit_pickled_moments_and_labels(sdvae_catalog, tmp_path):
    root, rows = sdvae_catalog
    summary = export_uvit(root, tmp_path / "uv")
    folder = tmp_path / "uv" / "imagenet256_features"
    assert sorted(os.listdir(folder), key=lambda n: int(n[:-4])) == [f"{i}.npy" for i in range(2 * len(rows))]
    assert summary.rows == summary.written == len(rows)
    for idx in range(2 * len(rows)):  # U-ViT's FeatureDataset.__getitem__
        z, label = np.load(folder / f"{idx}.npy", allow_pickle=True)
        row = rows[idx // 2]
        assert z.dtype == np.float32 and z.shape == (8, 32, 32)
        assert np.array_equal(z, row.latent if idx % 2 == 0 else row.latent_flip)  # unscaled mean | logvar
        assert isinstance(label, np.int64) and label == row.label


# -- refusals ------------------------------------------------------------------------------------


REFUSALS = [
    (export_lightningdit, "dc-ae-f32c32", ["256"], {}, {}, "--encoder va-vae-f16d32"),
    (export_lightningdit, "va-vae-f16d32", ["native"], {}, {}, "center-crop"),
    (export_lightningdit, "va-vae-f16d32", ["256", "512"], {}, {}, "choose one"),
    (export_lightningdit, "va-vae-f16d32", ["256"], {"flip": "none"}, {}, "--flip"),
    (export_fit, "sd-vae-ft-ema", ["fit:256"], {"unit": 8}, {}, "unit 8"),
    (export_fit, "sd-vae-ft-ema", ["256"], {"unit": 16}, {}, "--variant fit:256"),
    (export_uvit, "sd-vae-ft-ema", ["256"], {"quantity": "mode"}, {}, "moments"),
    (export_uvit, "sd-vae-ft-ema", ["256"], {"quantity": "moments", "flip": "none"}, {}, "--flip"),
    (export_fastdit, "va-vae-f16d32", ["256"], {}, {}, "--encoder sd-vae-ft-ema"),
    (export_fastdit, "sd-vae-ft-ema", ["256"], {}, {"variant": "512"}, "not in this catalog"),
]


@pytest.mark.parametrize("export, encoder, variants, manifest_kw, export_kw, match", REFUSALS)
def test_refusals_say_what_to_encode(tmp_path, export, encoder, variants, manifest_kw, export_kw, match):
    manifest = make_manifest(encoder, variants, **manifest_kw)
    write_catalog(tmp_path / "cat", manifest, make_rows(manifest, 2, sizes=[(300, 260), (280, 420)]))
    with pytest.raises(UnsupportedCatalogError, match=match):
        export(tmp_path / "cat", tmp_path / "out", **export_kw)
    assert not (tmp_path / "out").exists()
