"""The single-process encode path: source listing, pixel encoder, rows, errors and resume."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from nrdata.catalog import Catalog, CatalogWriter, validate_catalog
from nrdata.demo_data import BAD_FILES, CLASSES, write_demo_images
from nrdata.encoders import PixelEncoder
from nrdata.encoding import catalog_manifest, encode_locally
from nrdata.policies import parse_policy
from nrdata.sources import list_image_folder


def test_pixel_encoder_is_lossless_space_to_depth():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 24, 40, 3), dtype=np.uint8)
    enc = PixelEncoder(factor=8)
    latents = enc.encode(images)
    assert latents.shape == (2, 192, 3, 5) and latents.dtype == np.uint8
    # channel (c, dy, dx) of token (i, j) is pixel (8i+dy, 8j+dx, c)
    assert latents[1, 2 * 64 + 3 * 8 + 5, 1, 4] == images[1, 8 + 3, 32 + 5, 2]
    assert np.array_equal(enc.decode(latents), images)
    with pytest.raises(ValueError, match="multiples of 8"):
        enc.encode(images[:, :20])


def test_folder_listing_uses_sorted_class_order(tmp_path):
    for cls in ("n02", "n01", "n10"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (4, 4)).save(tmp_path / cls / "a.png")
    (tmp_path / "n01" / "notes.txt").write_text("not an image extension")
    items = list_image_folder(tmp_path)
    assert [(i.key, i.label, i.class_name) for i in items] == [
        ("n01/a.png", 0, "n01"), ("n02/a.png", 1, "n02"), ("n10/a.png", 2, "n10")]


def test_demo_images_are_deterministic(tmp_path):
    a = write_demo_images(tmp_path / "a", per_class=3, seed=5)
    write_demo_images(tmp_path / "b", per_class=3, seed=5)
    files = sorted(p.relative_to(a.root) for p in a.root.rglob("*") if p.is_file())
    assert len(files) == 3 * len(CLASSES) + len(BAD_FILES)
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()


def test_encode_a_folder_resume_and_errors(tmp_path):
    demo = write_demo_images(tmp_path / "images", per_class=4, seed=1)
    encoder = PixelEncoder(factor=8)
    policies = [parse_policy("native", unit=8), parse_policy("64", unit=8)]
    manifest = catalog_manifest(encoder, policies, flip=True, source_root=str(demo.root))
    items = list_image_folder(demo.root)

    with CatalogWriter(tmp_path / "cat", manifest, shard_rows=7) as writer:
        first = encode_locally(items[:9], writer, encoder, policies, flip=True)
    with CatalogWriter(tmp_path / "cat", manifest, shard_rows=7) as writer:
        second = encode_locally(items, writer, encoder, policies, flip=True)

    good = 4 * len(CLASSES)
    assert first.committed + second.committed == 2 * good
    assert second.skipped == first.committed
    cat = Catalog(tmp_path / "cat")
    assert validate_catalog(cat.root).ok
    assert sorted(cat.errors()["key"].to_pylist()) == sorted(BAD_FILES)
    index = cat.index.to_pylist()
    assert len({(r["key"], r["variant"]) for r in index}) == len(index) == 2 * good
    # a stored latent is the encoder applied to the policy's pixels, and its twin the mirror image
    row = next(r for r in index if r["variant"] == "native" and r["orig_w"] % 8)
    source = Image.open(demo.root / row["key"]).convert("RGB")
    pixels = policies[0].apply(source)
    assert (row["image_w"], row["image_h"]) == (pixels.shape[1], pixels.shape[0])
    assert np.array_equal(encoder.decode(cat.latent(row["row_id"])[None])[0], pixels)
    assert np.array_equal(encoder.decode(cat.latent(row["row_id"], flip=True)[None])[0], pixels[:, ::-1])
    assert row["label"] == CLASSES.index(row["class_name"])


def _write_real_world_folder(root):
    """Every awkward kind of file the catalog issue lists, in one ImageNet-style folder."""
    good, bad = root / "good", root / "bad"
    good.mkdir(parents=True)
    bad.mkdir()
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    rgb.save(good / "exif_rotated.jpg", exif=exif)
    rgb.convert("CMYK").save(good / "cmyk.jpg")
    rgb.convert("L").save(good / "gray.png")
    rgb.convert("P").save(good / "palette.png")
    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(good / "alpha.png")
    Image.fromarray((rng.integers(0, 65535, (30, 20))).astype(np.uint16)).save(good / "sixteen_bit.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(good / "one_pixel.png")
    Image.new("RGB", (10000, 20), (200, 10, 10)).save(good / "very_wide.png")
    whole = (good / "cmyk.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "random_bytes.jpg").write_bytes(rng.bytes(3000))
    (bad / "text.png").write_text("hello")
    Image.new("RGB", (3000, 3000)).save(bad / "bomb.png")  # over the max_pixels used below


def test_every_bad_kind_becomes_an_error_row_and_every_odd_kind_a_row(tmp_path):
    _write_real_world_folder(tmp_path / "src")
    encoder = PixelEncoder(factor=8)
    policies = [parse_policy("native", unit=8)]
    manifest = catalog_manifest(encoder, policies, flip=False)
    with CatalogWriter(tmp_path / "cat", manifest) as writer:
        encode_locally(list_image_folder(tmp_path / "src"), writer, encoder, policies, flip=False,
                       max_pixels=5_000_000)
    cat = Catalog(tmp_path / "cat")
    errors = {e["key"]: e for e in cat.errors().to_pylist()}
    assert set(errors) == {f"bad/{n}" for n in ("truncated.jpg", "zero.jpg", "random_bytes.jpg", "text.png",
                                                 "bomb.png")}
    assert all(e["stage"] == "decode" and e["message"] for e in errors.values())
    assert "max_pixels" in errors["bad/bomb.png"]["message"]
    rows = {r["key"]: r for r in cat.index.to_pylist()}
    assert set(rows) == {f"good/{n}" for n in ("exif_rotated.jpg", "cmyk.jpg", "gray.png", "palette.png",
                                                "alpha.png", "sixteen_bit.png", "one_pixel.png", "very_wide.png")}
    assert (rows["good/exif_rotated.jpg"]["orig_w"], rows["good/exif_rotated.jpg"]["orig_h"]) == (40, 56)
    assert (rows["good/one_pixel.png"]["image_w"], rows["good/one_pixel.png"]["image_h"]) == (8, 8)
    assert (rows["good/very_wide.png"]["latent_w"], rows["good/very_wide.png"]["latent_h"]) == (1250, 2)
    assert validate_catalog(cat.root).ok


class _FussyEncoder(PixelEncoder):
    """A pixel encoder that runs out of memory above a batch size and fails on one poisoned image."""

    def __init__(self, max_batch):
        super().__init__(factor=8)
        self.max_batch = max_batch
        self.calls = []

    def encode(self, images):
        self.calls.append(len(images))
        if len(images) > self.max_batch:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if (images == 13).all(axis=(1, 2, 3)).any():
            raise ValueError("poisoned pixels")
        return super().encode(images)


def _prepared(key, value, size=(16, 24)):
    from nrdata.encoding import PreparedImage

    pixels = np.full((*size, 3), value, np.uint8)
    return PreparedImage(key, "native", pixels, 0, "c", key, size[1], size[0])


def test_encode_prepared_groups_by_shape_under_the_pixel_budget():
    from nrdata.encoding import encode_prepared

    encoder = _FussyEncoder(max_batch=100)
    images = [_prepared(f"a{i}", i, (16, 24)) for i in range(5)] + [_prepared(f"b{i}", i, (8, 8)) for i in range(3)]
    rows, errors = encode_prepared(encoder, images, flip=True, batch_pixels=2 * 2 * 16 * 24)
    assert not errors and len(rows) == 8
    # 16x24 images go two at a time (flips included in the budget), the three 8x8 ones together
    assert sorted(encoder.calls) == sorted([4, 4, 2, 6])
    row = next(r for r in rows if r.key == "a3")
    assert np.array_equal(encoder.decode(row.latent[None])[0], images[3].pixels)


def test_out_of_memory_retries_smaller_batches_and_one_bad_image_fails_alone():
    from nrdata.encoding import encode_prepared

    encoder = _FussyEncoder(max_batch=2)
    images = [_prepared(f"k{i}", 13 if i == 5 else i) for i in range(8)]
    rows, errors = encode_prepared(encoder, images, flip=False, batch_pixels=10**9)
    assert encoder.calls[0] == 8 and max(encoder.calls[1:]) <= 4
    assert sorted(r.key for r in rows) == [f"k{i}" for i in range(8) if i != 5]
    assert [(key, stage) for key, _, stage, _ in errors] == [("k5", "encode")]
    assert "poisoned" in errors[0][3]
    for row in rows:
        assert np.array_equal(encoder.decode(row.latent[None])[0], images[int(row.key[1:])].pixels)


def test_an_image_too_big_for_memory_alone_is_an_error_row():
    from nrdata.encoding import encode_prepared

    rows, errors = encode_prepared(_FussyEncoder(max_batch=0), [_prepared("big", 1)], flip=False)
    assert rows == [] and errors[0][:3] == ("big", "native", "encode-oom")


def test_file_list_source_and_spread_limit(tmp_path):
    import polars as pl

    from nrdata.sources import list_source, spread_limit

    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(tmp_path / "imgs" / f"{i}.png")
    pl.DataFrame({"path": [f"imgs/{i}.png" for i in range(4)], "label": [3, 1, 4, 1]}).write_csv(tmp_path / "l.csv")
    pl.DataFrame({"path": ["imgs/0.png"], "label": [2.0], "class_name": ["x"]}).write_parquet(tmp_path / "l.parquet")
    items = list_source(tmp_path / "l.csv")
    assert [(i.key, i.label) for i in items] == [("imgs/0.png", 3), ("imgs/1.png", 1), ("imgs/2.png", 4),
                                                 ("imgs/3.png", 1)]
    assert items[0].path == (tmp_path / "imgs" / "0.png").resolve()
    assert [(i.label, i.class_name) for i in list_source(tmp_path / "l.parquet")] == [(2, "x")]
    assert [i.key for i in spread_limit(items, 2)] == ["imgs/0.png", "imgs/3.png"]
    pl.DataFrame({"path": ["a.png", "a.png"], "label": [0, 1]}).write_csv(tmp_path / "dup.csv")
    with pytest.raises(ValueError, match="row 1 repeats path"):
        list_source(tmp_path / "dup.csv")
    pl.DataFrame({"file": ["a.png"], "label": [0]}).write_csv(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="missing \\['path'\\]"):
        list_source(tmp_path / "bad.csv")
