"""`nr eval reference`: a reference batch at any size, from a catalog's source images or any image
folder, so that a native-resolution FID can be computed and reproduced.

Every source image is brought to the reference size by one policy, its Inception features go into
the statistics (mu, sigma, mu_s, sigma_s over all images), and a seeded subset of `count` images
(ADM's batches hold 10,000) is kept as arr_0 with its pool features. Policies, for --size HxW:

- center-crop: ADM's `center_crop_arr` (BOX halving, BICUBIC, centre crop), bit-compatible for
  H = W; for H != W the same steps with the image scaled to cover H x W;
- resize: squashed to exactly H x W (BICUBIC);
- native: NiT's native size with the area capped at H*W, sides floored to multiples of `unit`;
- fit: FiT's size for target sqrt(H*W), sides floored to multiples of `unit`.
native and fit give sizes that differ between images: no arr_0 then (see nreval.reference).
A provenance JSON beside the .npz records the source, policy, size, counts and weights.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from nrdata.catalog.atomic import publish, temp_path_for
from nrdata.images import ImageDecodeError, decode_image, image_size
from nrdata.policies import center_crop_arr, fit_size, native_size, resize_to
from nrdata.version import code_version
from nreval.features import Progress, iter_features
from nreval.inception import Inception
from nreval.inputs import image_files
from nreval.metrics import RunningMoments
from nreval.reference import write_reference

POLICIES = ("center-crop", "resize", "native", "fit")
DEFAULT_COUNT = 10_000


def parse_size(text: str) -> tuple[int, int]:
    """"HxW" (or "S" for S x S) -> (H, W)."""
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"size {text!r}: expected HxW in pixels, e.g. 256x256 or 432x768")
    return int(parts[0]), int(parts[1])


def policy_size(policy: str, width: int, height: int, size: tuple[int, int], unit: int) -> tuple[int, int]:
    """(H, W) of a width x height image under the policy."""
    target_h, target_w = size
    if policy in ("center-crop", "resize"):
        return target_h, target_w
    if policy == "native":
        new_w, new_h = native_size(width, height, unit=unit, max_area=target_h * target_w)
    elif policy == "fit":
        new_w, new_h = fit_size(width, height, target=math.isqrt(target_h * target_w), unit=unit)
    else:
        raise ValueError(f"policy {policy!r}: choose one of {', '.join(POLICIES)}")
    return new_h, new_w


def cover_crop(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    """ADM's centre crop generalised to H x W: BOX halving while both sides stay >= twice the
    target's, BICUBIC until the image covers H x W (sides rounded with round(), as ADM), centre crop."""
    height, width = size
    if height == width:
        return center_crop_arr(image, height)
    while image.width >= 2 * width and image.height >= 2 * height:
        image = image.resize((image.width // 2, image.height // 2), resample=Image.Resampling.BOX)
    scale = max(width / image.width, height / image.height)
    image = image.resize((max(width, round(image.width * scale)), max(height, round(image.height * scale))),
                         resample=Image.Resampling.BICUBIC)
    pixels = np.asarray(image)
    top, left = (pixels.shape[0] - height) // 2, (pixels.shape[1] - width) // 2
    return np.ascontiguousarray(pixels[top:top + height, left:left + width])


def apply_policy(image: Image.Image, policy: str, size: tuple[int, int], unit: int) -> np.ndarray:
    """uint8 [H, W, 3] of an RGB image under the policy."""
    if policy == "center-crop":
        return cover_crop(image, size)
    height, width = policy_size(policy, image.width, image.height, size, unit)
    if (width, height) == image.size:
        return np.asarray(image)
    return np.asarray(resize_to(image, (width, height)))


class PolicyImages:
    """Source images brought to the reference size, as a sequence nreval.features reads."""

    def __init__(self, paths: Sequence[Path], policy: str, size: tuple[int, int], unit: int,
                 source_sizes: Sequence[tuple[int, int]] | None = None):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: choose one of {', '.join(POLICIES)}")
        self.paths, self.policy, self.reference_size, self.unit = list(paths), policy, size, unit
        self._source_sizes = list(source_sizes) if source_sizes is not None else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        try:
            image = decode_image(self.paths[index])
        except ImageDecodeError as exc:
            raise ValueError(f"{exc}; remove the file from the source (or the catalog) and run again") from exc
        return apply_policy(image, self.policy, self.reference_size, self.unit)

    def size(self, index: int) -> tuple[int, int]:
        if self.policy in ("center-crop", "resize"):
            return self.reference_size
        if self._source_sizes is None:  # (width, height) from the headers; no pixel decoded
            self._source_sizes = []
            for path in self.paths:
                try:
                    self._source_sizes.append(image_size(path))
                except ImageDecodeError as exc:
                    raise ValueError(f"{exc}; remove the file from the source and run again") from exc
        width, height = self._source_sizes[index]
        return policy_size(self.policy, width, height, self.reference_size, self.unit)


def source_images(source: str | Path) -> tuple[list[Path], list[tuple[int, int]] | None, str]:
    """(image paths, their (width, height) when a catalog records them, "catalog" or "image-folder")."""
    source = Path(source)
    if (source / "manifest.json").is_file():
        from nrdata.catalog import Catalog

        catalog = Catalog(source)
        index = catalog.index.select(["source", "orig_w", "orig_h"]).to_pylist()
        root = Path(catalog.manifest.source_root)
        seen: dict[str, tuple[int, int]] = {}
        for row in index:  # one row per variant and image: one entry per source image
            if row["source"] and row["source"] not in seen:
                seen[row["source"]] = (row["orig_w"], row["orig_h"])
        if not seen:
            raise ValueError(f"{source}: the catalog's index records no source paths")
        paths = [root / name for name in sorted(seen)]
        if not paths[0].is_file():
            raise ValueError(f"{source}: its source images are not where the manifest says (source_root "
                             f"{root}; {paths[0]} is missing); give the image folder itself as SOURCE")
        return paths, [seen[name] for name in sorted(seen)], "catalog"
    if not source.is_dir():
        raise ValueError(f"{source}: not a catalog (no manifest.json) nor a folder of images")
    paths = image_files(source)
    if not paths:
        raise ValueError(f"{source}: holds no images")
    return paths, None, "image-folder"


@dataclass
class ReferenceSummary:
    path: Path
    provenance_path: Path
    images: int  # statistics over these
    kept: int  # in arr_0 / pool
    sizes: dict[str, int]  # "HxW" -> images at that size


def build_reference(source: str | Path, out: str | Path, *, size: tuple[int, int], policy: str,
                    inception: Inception, count: int = DEFAULT_COUNT, unit: int = 32, seed: int = 0,
                    batch_size: int = 64, workers: int = 0, progress: Progress | None = None) -> ReferenceSummary:
    out = Path(out)
    if out.suffix != ".npz":
        raise ValueError(f"--out {out}: a reference batch is an .npz file")
    if count < 1:
        raise ValueError(f"count {count}: keep at least one image")
    paths, source_sizes, kind = source_images(source)
    images = PolicyImages(paths, policy, size, unit, source_sizes)
    chosen = np.random.default_rng(seed).choice(len(paths), size=min(count, len(paths)), replace=False)
    keep = {int(i): position for position, i in enumerate(np.sort(chosen))}
    pool_moments, spatial_moments = RunningMoments(), RunningMoments()
    kept_pool = np.empty((len(keep), 2048), np.float32)
    kept_images: dict[int, np.ndarray] = {}
    sizes: dict[str, int] = {}
    for indices, pixels, features in iter_features(images, inception, batch_size=batch_size, workers=workers,
                                                   progress=progress):
        pool_moments.add(features["pool"])
        spatial_moments.add(features["spatial"])
        name = f"{pixels.shape[2]}x{pixels.shape[3]}"
        sizes[name] = sizes.get(name, 0) + len(indices)
        for position, index in enumerate(indices):
            if index in keep:
                kept_pool[keep[index]] = features["pool"][position]
                kept_images[index] = pixels[position].permute(1, 2, 0).numpy()
    one_size = len({image.shape for image in kept_images.values()}) == 1
    arr_0 = np.stack([kept_images[i] for i in sorted(keep)]) if one_size else None
    write_reference(out, images=arr_0, pool=kept_pool, statistics=pool_moments.statistics(),
                    spatial_statistics=spatial_moments.statistics(), inception_sha256=inception.weights_sha256)
    provenance = {
        "made_by": "nr eval reference", "nr_version": code_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": str(Path(source).resolve()), "source_kind": kind, "policy": policy,
        "size": f"{size[0]}x{size[1]}", "unit": unit if policy in ("native", "fit") else None,
        "images": len(paths), "statistics_over": len(paths), "kept": len(keep), "kept_seed": seed,
        "arr_0": None if arr_0 is None else list(arr_0.shape), "sizes": sizes,
        "inception_weights": str(inception.weights_path), "inception_sha256": inception.weights_sha256,
    }
    provenance_path = out.with_suffix(".json")
    tmp = temp_path_for(provenance_path)
    tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    publish(tmp, provenance_path)
    return ReferenceSummary(out, provenance_path, len(paths), len(keep), sizes)
