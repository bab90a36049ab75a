"""Small catalogs for tests: a manifest and reproducible random latents of many shapes."""

from __future__ import annotations

import numpy as np

from nrdata.catalog import CatalogWriter, EncoderInfo, LatentRow, Manifest

POLICIES = ({"kind": "native", "unit": 32, "max_area": 2048 * 2048, "target": None, "variant": "native"},
            {"kind": "center-crop", "unit": 32, "max_area": None, "target": 256, "variant": "256"})


def make_manifest(dtype: str = "float16", flip: str = "store", channels: int = 4, quantity: str = "mode") -> Manifest:
    encoder = EncoderInfo(name="test-ae", source="tests/tiny", revision="r1", factor=32, channels=channels,
                          quantity=quantity, scaling_factor=0.5)
    return Manifest(encoder=encoder, dtype=dtype, policies=POLICIES, flip=flip, source_root="/data/src")


def random_latent(rng: np.random.Generator, c: int, h: int, w: int, dtype: str) -> np.ndarray:
    if dtype == "uint8":
        return rng.integers(0, 256, (c, h, w), dtype=np.uint8)
    if dtype == "bfloat16":  # raw bf16 words: the top halves of float32 values
        return (rng.standard_normal((c, h, w)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return rng.standard_normal((c, h, w)).astype(dtype)


def make_rows(n: int, manifest: Manifest, seed: int = 0, prefix: str = "cls") -> list[LatentRow]:
    rng = np.random.default_rng(seed)
    rows = []
    c = manifest.encoder.stored_channels
    for i in range(n):
        variant = "native" if i % 3 else "256"
        h, w = (8, 8) if variant == "256" else (int(rng.integers(1, 12)), int(rng.integers(1, 12)))
        latent = random_latent(rng, c, h, w, manifest.dtype)
        flip = random_latent(rng, c, h, w, manifest.dtype) if manifest.flip == "store" else None
        rows.append(LatentRow(key=f"{prefix}{i % 5}/img_{i:05d}.jpg", variant=variant, latent=latent,
                              latent_flip=flip, label=i % 5, class_name=f"{prefix}{i % 5}",
                              source=f"{prefix}{i % 5}/img_{i:05d}.jpg", orig_w=w * 32 + 7, orig_h=h * 32 + 3,
                              image_w=w * 32, image_h=h * 32))
    return rows


def write_catalog(root, rows, manifest, **writer_kw) -> None:
    with CatalogWriter(root, manifest, **writer_kw) as writer:
        for row in rows:
            writer.add(row)
