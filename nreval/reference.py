"""Reference batches in ADM's .npz format, read and written.

ADM's files (e.g. VIRTUAL_imagenet256_labeled.npz) hold `arr_0` (uint8 [N, H, W, 3], the images
precision/recall compares against) and `mu, sigma, mu_s, sigma_s` (pool and spatial statistics over
the whole dataset), which the evaluator uses when present and computes from arr_0 when absent.

Files nr writes add `pool` (float32 [N, 2048], the arr_0 images' pool features, so nr eval need not
run Inception over them again) and `inception_sha256` (the weights those features and statistics
came from; nr eval refuses other weights). When the images of a reference differ in size (the
native and fit policies) there is no arr_0: ADM's evaluator cannot read such a file, nr eval can.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from nrdata.catalog.atomic import publish, temp_path_for
from nreval.inputs import NpzImages
from nreval.metrics import GaussianStatistics

STATISTICS_KEYS = ("mu", "sigma", "mu_s", "sigma_s")


@dataclass
class Reference:
    path: Path
    images: NpzImages | None  # arr_0
    pool: np.ndarray | None  # nr's precomputed pool features of arr_0's images
    statistics: GaussianStatistics | None  # mu, sigma
    spatial_statistics: GaussianStatistics | None  # mu_s, sigma_s
    inception_sha256: str | None

    @property
    def count(self) -> int:
        return len(self.pool) if self.pool is not None else len(self.images)


def read_reference(path: str | Path) -> Reference:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such reference file; give an ADM reference batch (e.g. "
                         f"VIRTUAL_imagenet256_labeled.npz) or one made by `nr eval reference`")
    try:
        with zipfile.ZipFile(path) as archive:
            names = {Path(n).stem for n in archive.namelist()}
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not a readable .npz ({exc})") from exc
    present = [k for k in STATISTICS_KEYS if k in names]
    if present and len(present) != len(STATISTICS_KEYS):
        raise ValueError(f"{path}: holds {', '.join(present)} but not "
                         f"{', '.join(k for k in STATISTICS_KEYS if k not in names)}; a reference holds all four "
                         f"statistics or none")
    if "arr_0" not in names and "pool" not in names:
        raise ValueError(f"{path}: holds neither arr_0 (reference images) nor pool (their features): not a "
                         f"reference batch")
    if "arr_0" not in names and not present:
        raise ValueError(f"{path}: holds pool features but neither arr_0 nor statistics: not a reference batch")
    with np.load(path) as data:
        statistics = spatial = None
        if present:
            statistics = GaussianStatistics(data["mu"].astype(np.float64), data["sigma"].astype(np.float64))
            spatial = GaussianStatistics(data["mu_s"].astype(np.float64), data["sigma_s"].astype(np.float64))
        pool = data["pool"].astype(np.float32) if "pool" in names else None
        sha = str(data["inception_sha256"]) if "inception_sha256" in names else None
    images = NpzImages(path) if "arr_0" in names else None
    if images is not None and pool is not None and len(pool) != len(images):
        raise ValueError(f"{path}: pool has {len(pool)} rows for {len(images)} images in arr_0")
    return Reference(path, images, pool, statistics, spatial, sha)


def write_reference(path: str | Path, *, images: np.ndarray | None, pool: np.ndarray | None,
                    statistics: GaussianStatistics | None, spatial_statistics: GaussianStatistics | None,
                    inception_sha256: str | None = None) -> Path:
    """An ADM-format reference .npz (uncompressed, so its arr_0 can be memory-mapped), written
    under a temporary name and renamed into place."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: a reference batch is an .npz file")
    if (statistics is None) != (spatial_statistics is None):
        raise ValueError("write both the pool and the spatial statistics, or neither")
    arrays: dict[str, np.ndarray] = {}
    if images is not None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
            raise ValueError(f"reference images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        arrays["arr_0"] = images
    if statistics is not None:
        arrays.update(mu=statistics.mu, sigma=statistics.sigma, mu_s=spatial_statistics.mu,
                      sigma_s=spatial_statistics.sigma)
    if pool is not None:
        arrays["pool"] = np.asarray(pool, np.float32)
    if inception_sha256:
        arrays["inception_sha256"] = np.array(inception_sha256)
    if "arr_0" not in arrays and "pool" not in arrays:
        raise ValueError("a reference needs its images (arr_0) or their pool features")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(path)
    with open(tmp, "wb") as handle:
        np.savez(handle, **arrays)
    publish(tmp, path)
    return path
