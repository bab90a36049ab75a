"""From a source image to catalog rows: decode, apply each variant's policy, encode, and the
single-process loop that drives it (the Ray pipeline runs the same per-item steps in parallel)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from nrdata.catalog import CatalogWriter, LatentRow, Manifest, WriteSummary
from nrdata.encoders.base import Encoder
from nrdata.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from nrdata.policies import ResolutionPolicy
from nrdata.sources import SourceItem


@dataclass
class ItemResult:
    rows: list[LatentRow] = field(default_factory=list)
    errors: list[tuple[str | None, str, str]] = field(default_factory=list)  # (variant, stage, message)
    skipped: int = 0  # variants the catalog already holds


def catalog_manifest(encoder: Encoder, policies: Iterable[ResolutionPolicy], *, flip: bool,
                     source_root: str = "", notes: dict | None = None) -> Manifest:
    return Manifest(
        encoder=encoder.info,
        dtype=encoder.dtype,
        policies=tuple({**p.to_dict(), "variant": p.variant} for p in policies),
        flip="store" if flip else "none",
        source_root=source_root,
        notes=notes or {},
    )


def encode_item(item: SourceItem, encoder: Encoder, policies: list[ResolutionPolicy], *, flip: bool,
                max_pixels: int = DEFAULT_MAX_PIXELS, skip: Callable[[str, str], bool] | None = None) -> ItemResult:
    """Rows for every variant of one image; failures come back as error tuples, never raised."""
    result = ItemResult()
    wanted = [p for p in policies if skip is None or not skip(item.key, p.variant)]
    result.skipped = len(policies) - len(wanted)
    policies = wanted
    if not policies:
        return result
    try:
        image = decode_image(item.path, max_pixels=max_pixels, name=item.key)
    except ImageDecodeError as exc:
        result.errors.append((None, "decode", str(exc)))
        return result
    for policy in policies:
        try:
            pixels = policy.apply(image)
            batch = pixels[None] if not flip else np.stack([pixels, pixels[:, ::-1]])
            latents = encoder.encode(np.ascontiguousarray(batch))
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
            result.errors.append((policy.variant, "encode", f"{type(exc).__name__}: {exc}"))
            continue
        result.rows.append(LatentRow(
            key=item.key, variant=policy.variant, latent=latents[0], latent_flip=latents[1] if flip else None,
            label=item.label, class_name=item.class_name, source=item.key, orig_w=image.width, orig_h=image.height,
            image_w=pixels.shape[1], image_h=pixels.shape[0],
        ))
    return result


def encode_locally(items: Iterable[SourceItem], writer: CatalogWriter, encoder: Encoder,
                   policies: list[ResolutionPolicy], *, flip: bool, max_pixels: int = DEFAULT_MAX_PIXELS,
                   on_item: Callable[[SourceItem, ItemResult], None] | None = None) -> WriteSummary:
    """Encode items one by one in this process, skipping what the catalog already holds."""
    for item in items:
        result = encode_item(item, encoder, policies, flip=flip, max_pixels=max_pixels, skip=writer.has)
        for variant, stage, message in result.errors:
            writer.add_error(item.key, stage, message, variant=variant, source=item.key)
        for row in result.rows:
            writer.add(row)
        writer.summary.skipped += result.skipped
        if on_item:
            on_item(item, result)
    return writer.summary
