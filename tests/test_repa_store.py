"""REPA images stored at encode time (`nr encode --repa-pixels`): what encode writes, that a training
step sees the targets of the per-step decode path, and that a catalog without them is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nrdata.catalog import Catalog, CatalogWriter, ManifestError
from nrdata.encoders import PixelEncoder
from nrdata.encoding import catalog_manifest, encode_locally
from nrdata.images import decode_image
from nrdata.packing.catalog_packs import pack_catalogs, write_pack_result
from nrdata.policies import parse_policy
from nrdata.repa_images import resize_pixels
from nrdata.sources import list_image_folder
from nrtrain.loader import PackedDataset, PackedLoader
from nrtrain.repa import MissingRepaImages, load_vision_encoder, repa_targets, stored_repa_rows
from nrtrain.train import TrainConfig, train
from test_repa import TinyViT, save_scripted, write_images

FACTOR = 4  # pixel encoder: 4x4 pixels per latent cell
REPA_PIXELS = 2  # stored REPA images: 2x2 pixels per latent cell, a real downscale of the encoded pixels
POLICIES = ("native", "center-crop:16")
# Targets from stored uint8 images against targets from the float resize of the same source pixels:
# the stored pixels are within 0.5/255 of the float ones (rounding), which moves the tiny ViT's
# LayerNorm-scaled features by at most FEATURE_ATOL per value, and turns no token's target by more
# than the cosine similarity (what the REPA term measures) FEATURE_COSINE.
FEATURE_ATOL = 0.05
FEATURE_COSINE = 0.9995


def encode(root, images, *, repa_pixels: int):
    encoder = PixelEncoder(factor=FACTOR)
    policies = [parse_policy(p, unit=FACTOR) for p in POLICIES]
    manifest = catalog_manifest(encoder, policies, flip=True, source_root=str(images), repa_pixels=repa_pixels)
    with CatalogWriter(root, manifest, shard_rows=8) as writer:
        encode_locally(list_image_folder(images), writer, encoder, policies, flip=True)
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The same images encoded twice, with and without stored REPA images, each packed the same way;
    and a tiny random ViT of patch 2, which needs 2 px per latent cell with model patch 1."""
    root = tmp_path_factory.mktemp("repa_store")
    images = write_images(root / "images")
    torch.manual_seed(0)
    vit = save_scripted(TinyViT(patch_size=REPA_PIXELS), root / "vit_p2.pt")
    # what the encode stores is what this encoder needs: its patch size / the model's (1) per latent cell
    needed = load_vision_encoder(vit).patch_size // 1
    for name, k in (("stored", needed), ("plain", 0)):
        encode(root / name, images, repa_pixels=k)
        write_pack_result(root / f"{name}.parquet", pack_catalogs([root / name], max_tokens=160, epochs=2, seed=1))
    return root, vit


def test_encode_stores_each_latents_repa_image_at_k_pixels_per_cell(store):
    root, _ = store
    cat = Catalog(root / "stored")
    plain = Catalog(root / "plain")
    assert cat.manifest.repa_pixels == REPA_PIXELS and plain.manifest.repa_pixels == 0
    assert "repa_pixels" not in json.loads((root / "plain" / "manifest.json").read_text())
    from nrdata.catalog.inspect import describe  # what `nr catalog info` shows
    assert describe(cat)["repa_images"].startswith(f"stored, {REPA_PIXELS} px per latent cell")
    assert describe(plain)["repa_images"].startswith("none")
    assert cat.manifest.fingerprint != plain.manifest.fingerprint  # the fingerprint covers it
    policies = {p.variant: p for p in (parse_policy(s, unit=FACTOR) for s in POLICIES)}
    index = cat.index.to_pylist()
    assert len(index) == len(plain) > 10
    for row, entry in enumerate(index):
        latent = cat.latent(row)
        image = cat.repa_image(row)
        assert image.dtype == np.uint8 and image.shape == (latent.shape[1] * REPA_PIXELS,
                                                           latent.shape[2] * REPA_PIXELS, 3)
        np.testing.assert_array_equal(cat.repa_image(row, flip=True), image[:, ::-1])
        source = policies[entry["variant"]].apply(decode_image(root / "images" / entry["source"]))
        floats = resize_pixels(torch.from_numpy(source).permute(2, 0, 1)[None].float() / 255, image.shape[:2])
        exact = floats[0].permute(1, 2, 0).numpy() * 255
        assert np.abs(image.astype(np.float64) - exact).max() <= 0.5 + 1e-3  # rounded, nothing else
        np.testing.assert_array_equal(cat.latent(row), plain.latent(row))  # latents unchanged
    with pytest.raises(KeyError, match="stores no REPA images"):
        plain.repa_image(0)


def test_a_grown_catalog_keeps_its_repa_images_and_refuses_another_k(store, tmp_path):
    root, _ = store
    images = root / "images"
    encoder = PixelEncoder(factor=FACTOR)
    native = [parse_policy("native", unit=FACTOR)]
    first = catalog_manifest(encoder, native, flip=True, source_root=str(images), repa_pixels=2)
    with CatalogWriter(tmp_path / "grow", first) as writer:
        encode_locally(list_image_folder(images)[:5], writer, encoder, native, flip=True)
    both = [parse_policy(p, unit=FACTOR) for p in POLICIES]
    with CatalogWriter(tmp_path / "grow", catalog_manifest(encoder, both, flip=True, source_root=str(images),
                                                           repa_pixels=2)) as writer:
        encode_locally(list_image_folder(images), writer, encoder, both, flip=True)  # resumes, adds a variant
    grown = Catalog(tmp_path / "grow")
    assert len(grown) == len(Catalog(root / "stored")) and grown.manifest.repa_pixels == 2
    assert all(grown.repa_image(r).shape[0] == grown.latent(r).shape[1] * 2 for r in range(len(grown)))
    for k, fix in ((3, "pass --repa-pixels 2"), (0, "pass --repa-pixels 2")):
        with pytest.raises(ManifestError, match=f"REPA pixels per latent cell differs.*{fix}"):
            CatalogWriter(tmp_path / "grow", catalog_manifest(encoder, native, flip=True, repa_pixels=k,
                                                              source_root=str(images)))


def test_stored_images_give_the_targets_of_the_per_step_decode_path(store):
    root, vit = store
    encoder = load_vision_encoder(vit)
    stored = PackedDataset(root / "stored.parquet", repa_images="stored", repa_patch_size=REPA_PIXELS, seed=3,
                           steps=8)
    decoded = PackedDataset(root / "plain.parquet", repa_images="source", seed=3, steps=8)
    cat = Catalog(root / "stored")
    worst, least_cosine, flips = 0.0, 1.0, 0
    for position in range(stored.num_steps):
        a, b = stored.batch(position), decoded.batch(position)
        torch.testing.assert_close(a.tokens, b.tokens, rtol=0, atol=0)  # same packs, same draws
        assert a.row_ids.tolist() == b.row_ids.tolist()
        for image, source, row in zip(a.images, b.images, a.row_ids.tolist()):
            flips += not np.array_equal(image, cat.repa_image(row))
        # the source path resizes inside repa_targets, the stored path hands over the resized view
        ta = repa_targets(encoder, a.images, a.sizes, "cpu")
        tb = repa_targets(encoder, b.images, b.sizes, "cpu")
        assert ta.shape == tb.shape == (a.num_tokens, encoder.dim)
        worst = max(worst, float((ta - tb).abs().max()))
        least_cosine = min(least_cosine, float(torch.nn.functional.cosine_similarity(ta, tb, dim=-1).min()))
    assert 0 < worst <= FEATURE_ATOL and least_cosine >= FEATURE_COSINE, (worst, least_cosine)
    assert flips > 5  # mirrored twins were drawn, and their images mirrored with them


def test_workers_hand_over_the_same_stored_images(store):
    root, _ = store
    serial = PackedDataset(root / "stored.parquet", repa_images="stored", seed=4)
    loader = PackedLoader(root / "stored.parquet", repa_images="stored", seed=4, num_workers=2)
    batches = list(loader)  # held all at once: later batches fall back from the slot pool to own buffers
    assert len(batches) == serial.num_steps
    for position, batch in enumerate(batches):
        expected = serial.batch(position)
        torch.testing.assert_close(batch.tokens, expected.tokens, rtol=0, atol=0)
        assert [i.shape for i in batch.images] == [i.shape for i in expected.images]
        for got, want in zip(batch.images, expected.images):
            np.testing.assert_array_equal(got, want)


def run(store, tmp_path, packs: str, **extra):
    root, vit = store
    seen = []
    config = TrainConfig(packs=str(root / packs), out=str(tmp_path / packs), model="tiny", steps=2, lr=1e-3,
                         workers=0, log_every=1, ckpt_every=2, keep_checkpoints=None, tensorboard=False,
                         weight_decay=0.0, repa_encoder=vit, repa_depth=1, repa_weight=0.5, repa_hidden=32, seed=7,
                         **extra)
    summary = train(config, on_step=lambda step, batch, terms: seen.append((terms.mse.item(), terms.repa.item())))
    return summary, seen


def test_training_on_stored_images_equals_training_on_decoded_ones(store, tmp_path):
    root, _ = store
    stored, stored_terms = run(store, tmp_path, "stored.parquet")
    decoded, decoded_terms = run(store, tmp_path, "plain.parquet", repa_image_root=str(root / "images"))
    assert len(stored_terms) == len(decoded_terms) == 2
    for (mse_a, repa_a), (mse_b, repa_b) in zip(stored_terms, decoded_terms):
        assert mse_a == pytest.approx(mse_b, rel=1e-3, abs=1e-4)
        assert repa_a == pytest.approx(repa_b, rel=1e-2, abs=1e-3)
    np.testing.assert_allclose(stored.losses, decoded.losses, rtol=1e-2, atol=1e-3)


def test_a_catalog_without_repa_images_is_refused_with_the_encode_command(store, tmp_path):
    root, _ = store
    with pytest.raises(MissingRepaImages, match=r"stores no REPA images.*nr encode .*images .*plain-repa2 "
                                                r"--encoder pixel --factor 4 --variant native --variant 16 "
                                                r"--dtype uint8 --flip --repa-pixels 2"):
        run(store, tmp_path, "plain.parquet")
    with pytest.raises(MissingRepaImages, match="stores REPA images at 2 px per latent cell.*needs 4 px"):
        PackedDataset(root / "stored.parquet", repa_images="stored", repa_patch_size=4)
    with pytest.raises(ValueError, match="not a multiple of the model's patch size 2"):
        stored_repa_rows([Catalog(root / "stored")], patch_size=2, repa_patch_size=3)
    with pytest.raises(ValueError, match="repa_images must be"):
        PackedDataset(root / "stored.parquet", repa_images=True)


def test_a_damaged_repa_image_stops_the_batch_naming_its_shard_and_key(store, tmp_path):
    import shutil

    from nrdata.catalog import CorruptLatentError

    root, _ = store
    copy = tmp_path / "stored"
    shutil.copytree(root / "stored", copy)
    row = int(PackedDataset(root / "stored.parquet", repa_images="stored", seed=4).batch(0).row_ids[0])
    entry = Catalog(copy).index.slice(row, 1).to_pylist()[0]
    shard = copy / "shards" / entry["shard"]
    data = bytearray(shard.read_bytes())
    start = bytes(data).find(Catalog(copy).repa_image(row).tobytes())  # the image's bytes in its shard
    assert start >= 0
    data[start] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CorruptLatentError, match=f"{shard}.*key {entry['key']}.*REPA image"):
        PackedDataset(root / "stored.parquet", catalogs=[copy], repa_images="stored", seed=4)
    # the latents alone are intact: a run without REPA reads them
    PackedDataset(root / "stored.parquet", catalogs=[copy], seed=4).batch(0)
