"""From source images to catalog rows, in two steps that the Ray pipeline runs on different workers:

1. `prepare_item` (CPU): decode one image once and apply every variant's policy to it;
2. `encode_prepared` (the encoder's device): group the prepared images by shape, cut each group into
   batches under a pixel budget, encode, and turn the latents into rows.

`encode_locally` chains both in this process, for runs without Ray. Nothing here raises for one
bad image: decode failures, encoder exceptions and out-of-memory on a single image come back as
error tuples that become rows of the catalog's errors table.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import numpy as np

from nrdata.catalog import CatalogWriter, LatentRow, Manifest, WriteSummary
from nrdata.encoders.base import Encoder
from nrdata.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_image
from nrdata.policies import ResolutionPolicy
from nrdata.repa_images import repa_views
from nrdata.sources import SourceItem

# Images per encoder call are bounded by pixels, not by count: 32 images of 512² (flips included).
DEFAULT_BATCH_PIXELS = 32 * 512 * 512

ErrorTuple = tuple[str, "str | None", str, str]  # (key, variant, stage, message)


@dataclass
class PreparedImage:
    """One variant of one decoded source image, resized by its policy, waiting for the encoder."""

    key: str
    variant: str
    pixels: np.ndarray  # uint8 [H, W, 3]
    label: int
    class_name: str | None
    source: str
    orig_w: int
    orig_h: int


@dataclass
class PreparedItem:
    images: list[PreparedImage] = field(default_factory=list)
    errors: list[ErrorTuple] = field(default_factory=list)
    skipped: int = 0  # variants the catalog already holds


def catalog_manifest(encoder: Encoder, policies: Iterable[ResolutionPolicy], *, flip: bool,
                     source_root: str = "", notes: dict | None = None, repa_pixels: int = 0) -> Manifest:
    return Manifest(
        repa_pixels=repa_pixels,
        encoder=encoder.info,
        encoder_weights=getattr(encoder, "weights_id", ""),
        dtype=encoder.dtype,
        policies=tuple({**p.to_dict(), "variant": p.variant} for p in policies),
        flip="store" if flip else "none",
        source_root=source_root,
        notes=notes or {},
    )


def prepare_item(item: SourceItem, policies: list[ResolutionPolicy], *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 skip: Callable[[str, str], bool] | None = None) -> PreparedItem:
    """Decode an image once and resize it for every variant the catalog does not hold yet."""
    result = PreparedItem()
    wanted = [p for p in policies if skip is None or not skip(item.key, p.variant)]
    result.skipped = len(policies) - len(wanted)
    if not wanted:
        return result
    try:
        image = decode_image(item.path, max_pixels=max_pixels, name=item.key)
    except ImageDecodeError as exc:
        result.errors.append((item.key, None, "decode", str(exc)))
        return result
    for policy in wanted:
        try:
            pixels = policy.apply(image)
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the run
            result.errors.append((item.key, policy.variant, "resize", f"{type(exc).__name__}: {exc}"))
            continue
        result.images.append(PreparedImage(item.key, policy.variant, pixels, item.label, item.class_name,
                                           item.key, image.width, image.height))
    return result


def shape_batches(images: list[PreparedImage], *, batch_pixels: int, flip: bool) -> Iterator[list[PreparedImage]]:
    """Same-shape batches whose pixels (flipped twins included) stay under the budget, at least one image each."""
    by_shape: dict[tuple[int, ...], list[PreparedImage]] = defaultdict(list)
    for image in images:
        by_shape[image.pixels.shape].append(image)
    for shape, group in by_shape.items():
        per_image = shape[0] * shape[1] * (2 if flip else 1)
        size = max(1, batch_pixels // per_image)
        for start in range(0, len(group), size):
            yield group[start:start + size]


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or (isinstance(exc, RuntimeError) and "out of memory" in str(exc))


def _release_cached_memory() -> None:
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _encode_splitting(encoder: Encoder, pixels: np.ndarray) -> list:
    """Encode a batch; on out-of-memory encode its halves instead, down to single images.

    Returns one latent (or exception) per image, so a failure is pinned on the image that caused it.
    """
    try:
        latents = encoder.encode(pixels)
        return [latents[i] for i in range(len(pixels))]
    except Exception as exc:  # noqa: BLE001
        if len(pixels) == 1:
            return [exc]
        if is_out_of_memory(exc):
            _release_cached_memory()
        # out of memory: smaller batches; any other error: find the image(s) that raise it
        half = len(pixels) // 2
        return _encode_splitting(encoder, pixels[:half]) + _encode_splitting(encoder, pixels[half:])


def encode_prepared(encoder: Encoder, images: list[PreparedImage], *, flip: bool,
                    batch_pixels: int = DEFAULT_BATCH_PIXELS,
                    repa_pixels: int = 0) -> tuple[list[LatentRow], list[ErrorTuple]]:
    """Encode prepared images in same-shape batches; with `flip` the mirrored twin rides in the same batch.

    With `repa_pixels` k > 0 each row also carries its REPA view (`nrdata.repa_images.repa_views`:
    the pixels at k per latent cell; the twin's is its mirror, not stored)."""
    rows: list[LatentRow] = []
    errors: list[ErrorTuple] = []
    for batch in shape_batches(images, batch_pixels=batch_pixels, flip=flip):
        pixels = np.stack([image.pixels for image in batch])
        encoded = np.concatenate([pixels, pixels[:, :, ::-1]]) if flip else pixels
        outputs = _encode_splitting(encoder, np.ascontiguousarray(encoded))
        n = len(batch)
        views = None
        if repa_pixels:  # one shape per batch: images of one shape have latents of one shape
            latent_hw = next((tuple(o.shape[-2:]) for o in outputs if not isinstance(o, BaseException)), None)
            views = repa_views(pixels, latent_hw, repa_pixels) if latent_hw else None
        for i, image in enumerate(batch):
            latent, twin = outputs[i], outputs[n + i] if flip else None
            failure = next((o for o in (latent, twin) if isinstance(o, BaseException)), None)
            if failure is not None:
                stage = "encode-oom" if is_out_of_memory(failure) else "encode"
                errors.append((image.key, image.variant, stage, f"{type(failure).__name__}: {failure}"))
                continue
            rows.append(LatentRow(
                key=image.key, variant=image.variant, latent=latent, latent_flip=twin, label=image.label,
                class_name=image.class_name, source=image.source, orig_w=image.orig_w, orig_h=image.orig_h,
                image_w=image.pixels.shape[1], image_h=image.pixels.shape[0],
                repa_image=None if views is None else views[i],
            ))
    return rows, errors


def write_results(writer: CatalogWriter, rows: list[LatentRow], errors: list[ErrorTuple]) -> None:
    for key, variant, stage, message in errors:
        writer.add_error(key, stage, message, variant=variant, source=key)
    for row in rows:
        writer.add(row)


def encode_locally(items: Iterable[SourceItem], writer: CatalogWriter, encoder: Encoder,
                   policies: list[ResolutionPolicy], *, flip: bool, max_pixels: int = DEFAULT_MAX_PIXELS,
                   batch_pixels: int = DEFAULT_BATCH_PIXELS, items_per_batch: int = 64,
                   on_items: Callable[[int], None] | None = None) -> WriteSummary:
    """Encode items in this process, `items_per_batch` images at a time, skipping what the catalog holds."""
    pending: list[PreparedImage] = []
    count = 0

    def flush() -> None:
        nonlocal count
        rows, errors = encode_prepared(encoder, pending, flip=flip, batch_pixels=batch_pixels,
                                       repa_pixels=writer.manifest.repa_pixels)
        write_results(writer, rows, errors)
        pending.clear()
        if on_items:
            on_items(count)
        count = 0

    for item in items:
        prepared = prepare_item(item, policies, max_pixels=max_pixels, skip=writer.has)
        write_results(writer, [], prepared.errors)
        writer.summary.skipped += prepared.skipped
        pending.extend(prepared.images)
        count += 1
        if len(pending) >= items_per_batch:
            flush()
    flush()
    return writer.summary
