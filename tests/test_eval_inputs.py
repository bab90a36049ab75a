"""What nr eval reads and writes without Inception: sample inputs (.npz, nr sample folders, image
folders of mixed sizes), ADM's reference .npz with and without statistics, the reference policies'
sizes and the catalog as a source."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image

from nrdata.catalog import CatalogWriter
from nrdata.policies import center_crop_arr
from nreval.features import size_batches
from nreval.inputs import NpzImages, open_samples
from nreval.metrics import GaussianStatistics
from nreval.reference import read_reference, write_reference
from nreval.reference_builder import PolicyImages, apply_policy, cover_crop, parse_size, source_images
from catalog_factory import make_manifest, make_rows


def write_images(folder, sizes, seed=0):
    rng = np.random.default_rng(seed)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / ("sub" if i % 2 else "") / f"{i:02d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_npz_arr_0_is_read_memory_mapped_when_stored_and_loaded_when_compressed(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=images, arr_1=np.arange(5))
    np.savez_compressed(tmp_path / "small.npz", arr_0=images)
    for name, mapped in (("plain.npz", True), ("small.npz", False)):
        read = NpzImages(tmp_path / name)
        assert len(read) == 5 and read.size(3) == (6, 7)
        assert np.array_equal(np.stack([read[i] for i in range(5)]), images)
        assert isinstance(read.array, np.memmap) == mapped


def test_npz_without_uint8_nhwc_arr_0_is_refused_naming_the_file(tmp_path):
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    np.savez(tmp_path / "none.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"float\.npz: arr_0 is float32 .*expected uint8 \[N, H, W, 3\]"):
        open_samples(tmp_path / "float.npz")
    with pytest.raises(ValueError, match=r"none\.npz: holds no arr_0"):
        open_samples(tmp_path / "none.npz")
    with pytest.raises(ValueError, match="no such file or folder"):
        open_samples(tmp_path / "missing.npz")


def test_image_folder_of_mixed_sizes_is_read_sorted_and_batched_by_size(tmp_path):
    sizes = [(20, 30), (30, 20), (20, 30), (40, 40), (20, 30)]
    paths = write_images(tmp_path / "images", sizes)
    samples = open_samples(tmp_path / "images")
    assert samples.kind == "image-folder" and samples.provenance is None
    assert samples.images.paths == sorted(paths)
    order = [paths.index(p) for p in samples.images.paths]
    assert [samples.images.size(i) for i in range(5)] == [sizes[j] for j in order]
    assert samples.sizes() == {"20x30": 3, "30x20": 1, "40x40": 1}
    for i, j in enumerate(order):
        assert np.array_equal(samples.images[i], np.asarray(Image.open(paths[j])))
    batches = size_batches(samples.images, batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(5))
    assert all(len({samples.images.size(i) for i in b}) == 1 and len(b) <= 2 for b in batches)
    (tmp_path / "images" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        open_samples(tmp_path / "images").sizes()


def test_nr_sample_folder_reads_its_npz_files_and_provenance(tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    square = np.full((3, 8, 8, 3), 1, np.uint8)
    wide = np.full((2, 8, 16, 3), 2, np.uint8)
    np.savez(folder / "samples-8x8.npz", arr_0=square)
    np.savez(folder / "samples-8x16.npz", arr_0=wide)
    (folder / "provenance.json").write_text(json.dumps({"checkpoint": "run/step-10"}))
    samples = open_samples(folder)
    assert samples.kind == "nr-samples" and samples.provenance == {"checkpoint": "run/step-10"}
    assert samples.files == ["samples-8x16.npz", "samples-8x8.npz"] and len(samples.images) == 5
    assert samples.sizes() == {"8x16": 2, "8x8": 3} and samples.images[4][0, 0, 0] == 1
    (folder / "provenance.json").write_text("{broken")
    with pytest.raises(ValueError, match="provenance.json: unreadable"):
        open_samples(folder)


def test_reference_npz_with_and_without_statistics_round_trips(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    pool = GaussianStatistics(rng.normal(size=6), np.eye(6) * 2)
    spatial = GaussianStatistics(rng.normal(size=3), np.eye(3))
    with_statistics = write_reference(tmp_path / "adm.npz", images=images, pool=None, statistics=pool,
                                      spatial_statistics=spatial)
    with np.load(with_statistics) as data:  # ADM's keys, as its evaluator reads them
        assert sorted(data.files) == ["arr_0", "mu", "mu_s", "sigma", "sigma_s"]
    reference = read_reference(with_statistics)
    assert np.array_equal(reference.images.array, images) and reference.pool is None
    assert np.array_equal(reference.statistics.sigma, pool.sigma) and np.array_equal(reference.spatial_statistics.mu,
                                                                                   spatial.mu)
    plain = write_reference(tmp_path / "plain.npz", images=images, pool=None, statistics=None,
                            spatial_statistics=None)
    reference = read_reference(plain)
    assert reference.statistics is None and reference.count == 4 and reference.inception_sha256 is None
    features = rng.normal(size=(4, 2048)).astype(np.float32)
    native = write_reference(tmp_path / "native.npz", images=None, pool=features, statistics=pool,
                             spatial_statistics=spatial, inception_sha256="ab" * 32)
    reference = read_reference(native)
    assert reference.images is None and np.array_equal(reference.pool, features)
    assert reference.inception_sha256 == "ab" * 32 and reference.count == 4
    assert not list(tmp_path.glob(".tmp-*"))


def test_broken_references_are_refused_with_the_reason(tmp_path):
    np.savez(tmp_path / "half.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8), mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match="half.npz: holds mu, sigma but not mu_s, sigma_s"):
        read_reference(tmp_path / "half.npz")
    np.savez(tmp_path / "empty.npz", labels=np.arange(3))
    with pytest.raises(ValueError, match="neither arr_0"):
        read_reference(tmp_path / "empty.npz")
    with pytest.raises(ValueError, match="no such reference file"):
        read_reference(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="both the pool and the spatial"):
        write_reference(tmp_path / "x.npz", images=np.zeros((1, 2, 2, 3), np.uint8), pool=None,
                        statistics=GaussianStatistics(np.zeros(2), np.eye(2)), spatial_statistics=None)


def test_reference_policies_give_the_expected_sizes(tmp_path):
    sizes = [(300, 500), (640, 480), (100, 1000)]
    paths = write_images(tmp_path / "src", sizes)
    for policy, size, expected in (
            ("center-crop", (64, 64), [(64, 64)] * 3),
            ("center-crop", (48, 96), [(48, 96)] * 3),
            ("resize", (40, 70), [(40, 70)] * 3),
            # area capped at 64*64 = 4096, aspect kept, sides floored to multiples of 8
            ("native", (64, 64), [(48, 80), (72, 48), (16, 200)]),
            # FiT: area capped at 64², sides floored to multiples of 8
            ("fit", (64, 64), [(48, 80), (72, 48), (16, 200)])):
        images = PolicyImages(paths, policy, size, unit=8)
        assert [images.size(i) for i in range(3)] == expected, policy
        assert [images[i].shape[:2] for i in range(3)] == expected, policy
    with pytest.raises(ValueError, match="choose one of center-crop, resize, native, fit"):
        PolicyImages(paths, "crop", (64, 64), unit=8)
    assert parse_size("432x768") == (432, 768) and parse_size("256") == (256, 256)
    with pytest.raises(ValueError, match="expected HxW"):
        parse_size("256x")


def test_center_crop_is_adms_for_squares_and_covers_then_crops_otherwise():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 700, 3), dtype=np.uint8))
    assert np.array_equal(apply_policy(image, "center-crop", (128, 128), 32), center_crop_arr(image, 128))
    wide = cover_crop(image, (60, 200))
    assert wide.shape == (60, 200, 3)
    # BOX-halved once (700 >= 2 * 200 and 300 >= 2 * 60) to 350x150, scaled by 200/350 to cover: 200x86, rows 13..72
    half = image.resize((350, 150), Image.Resampling.BOX)
    rows = np.asarray(half.resize((200, 86), Image.Resampling.BICUBIC))[13:73]
    assert np.array_equal(wide, rows)


def test_a_catalogs_source_images_are_the_reference_source(tmp_path):
    root = tmp_path / "src"
    rows = make_rows(6, make_manifest())
    sources = sorted({row.source for row in rows})
    write_images(root, [(20, 24)] * len(sources))
    for i, name in enumerate(sources):  # put the images where the catalog says they are
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        (root / ("sub" if i % 2 else "") / f"{i:02d}.png").rename(target)
    manifest = dataclasses.replace(make_manifest(), source_root=str(root))
    with CatalogWriter(tmp_path / "catalog", manifest) as writer:
        for row in rows:
            writer.add(row)
    paths, recorded_sizes, kind = source_images(tmp_path / "catalog")
    assert kind == "catalog" and paths == [root / name for name in sources]
    assert len(recorded_sizes) == len(sources)
    manifest = dataclasses.replace(manifest, source_root=str(tmp_path / "moved"))
    with CatalogWriter(tmp_path / "moved-catalog", manifest) as writer:
        for row in rows:
            writer.add(row)
    with pytest.raises(ValueError, match="give the image folder itself as SOURCE"):
        source_images(tmp_path / "moved-catalog")
