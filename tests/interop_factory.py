"""Small catalogs with the encoders the peer formats need, and random latents of the sizes the
resolution policies give."""

from __future__ import annotations

import numpy as np

from catalog_factory import random_latent
from nrdata.catalog import CatalogWriter, EncoderInfo, LatentRow, Manifest
from nrdata.policies import ResolutionPolicy

ENCODERS = {
    "dc-ae-f32c32": dict(source="mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", factor=32, channels=32,
                         scaling_factor=0.41407),
    "sd-vae-ft-ema": dict(source="stabilityai/sd-vae-ft-ema", factor=8, channels=4, scaling_factor=0.18215),
    "va-vae-f16d32": dict(source="hustvl/vavae-imagenet256-f16d32-dinov2", factor=16, channels=32,
                          scaling_factor=None),
}


def policy(spec: str, unit: int) -> dict:
    """A manifest policy entry from a short spec: "native", "256" (center crop) or "fit:128"."""
    kind, _, size = spec.partition(":")
    if kind == "native":
        p = ResolutionPolicy("native", unit, max_area=2048 * 2048)
    elif kind == "fit":
        p = ResolutionPolicy("fit", unit, target=int(size))
    else:
        p = ResolutionPolicy("center-crop", unit, target=int(kind))
    return {**p.to_dict(), "variant": p.variant}


def make_manifest(encoder: str, variants: list[str], *, quantity: str = "mode", dtype: str = "float32",
                  flip: str = "store", unit: int | None = None) -> Manifest:
    info = ENCODERS[encoder]
    return Manifest(
        encoder=EncoderInfo(name=encoder, source=info["source"], revision="r1", factor=info["factor"],
                            channels=info["channels"], quantity=quantity, scaling_factor=info["scaling_factor"]),
        dtype=dtype, policies=tuple(policy(v, unit or info["factor"]) for v in variants), flip=flip,
        source_root="/data/imagenet/train")


def latent_size(p: dict, orig_w: int, orig_h: int, factor: int) -> tuple[int, int]:
    """(latent_h, latent_w) of an image under a manifest policy entry."""
    w, h = ResolutionPolicy.from_dict({k: v for k, v in p.items() if k != "variant"}).output_size(orig_w, orig_h)
    return h // factor, w // factor


def make_rows(manifest: Manifest, images: int, *, seed: int = 0, sizes=None, labelled: bool = True) -> list[LatentRow]:
    """Rows for `images` images, every variant of an image in a row, as encode writes them.

    `sizes`: (orig_w, orig_h) per image; random between 40 and 700 px by default.
    """
    rng = np.random.default_rng(seed)
    factor, c = manifest.encoder.factor, manifest.encoder.stored_channels
    rows = []
    for i in range(images):
        orig_w, orig_h = sizes[i] if sizes else (int(rng.integers(40, 700)), int(rng.integers(40, 700)))
        cls = i % 3
        key = f"n{cls:08d}/n{cls:08d}_{i:05d}.JPEG"
        for p in manifest.policies:
            h, w = latent_size(p, orig_w, orig_h, factor)

            def draw():
                z = random_latent(rng, c, h, w, manifest.dtype)
                if manifest.encoder.quantity == "moments":  # a log-variance that is plausible
                    z[c // 2:] = (rng.standard_normal((c // 2, h, w)) - 4).astype(z.dtype)
                return z

            latent = draw()
            flipped = draw() if manifest.flip == "store" else None
            rows.append(LatentRow(key=key, variant=p["variant"], latent=latent, latent_flip=flipped,
                                  label=cls if labelled else -1, class_name=f"n{cls:08d}", source=key,
                                  orig_w=orig_w, orig_h=orig_h, image_w=w * factor, image_h=h * factor))
    return rows


def write_catalog(root, manifest: Manifest, rows: list[LatentRow], shard_rows: int = 5) -> list[LatentRow]:
    with CatalogWriter(root, manifest, shard_rows=shard_rows) as writer:
        for row in rows:
            writer.add(row)
    return rows

