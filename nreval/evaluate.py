"""`nr eval SAMPLES --ref REF`: the five numbers of ADM's evaluator, and a JSON record of them.

As ADM: the reference's precomputed statistics when it has them (else those of its arr_0), the
reference images' pool features for precision/recall (nr's references carry them precomputed),
the samples' features for everything else.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nrdata.catalog.atomic import publish, temp_path_for
from nrdata.version import code_version
from nreval.features import Progress, extract_features
from nreval.inception import Inception
from nreval.inputs import SampleSet, open_samples
from nreval.metrics import GaussianStatistics, frechet_distance, inception_score, precision_recall
from nreval.reference import Reference, read_reference

METRIC_LINES = (("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"),
                ("precision", "Precision"), ("recall", "Recall"))


@dataclass
class EvalResult:
    metrics: dict[str, float]
    record: dict[str, Any]
    json_path: Path

    def lines(self) -> list[str]:
        """The lines ADM's evaluator prints."""
        return [f"{label}: {self.metrics[key]}" for key, label in METRIC_LINES]


def result_path(samples: SampleSet, reference: Path) -> Path:
    """eval-<reference>.json inside a sample folder, <samples>.eval-<reference>.json beside an .npz."""
    name = f"eval-{reference.stem}.json"
    if samples.path.is_dir():
        return samples.path / name
    return samples.path.with_name(f"{samples.path.stem}.{name}")


def check_weights(reference: Reference, inception: Inception) -> None:
    if reference.inception_sha256 and reference.inception_sha256 != inception.weights_sha256:
        raise ValueError(f"{reference.path} was made with Inception weights sha256 {reference.inception_sha256[:12]}…, "
                         f"these are {inception.weights_sha256[:12]}… ({inception.weights_path}); its statistics "
                         f"and features would not compare: load the same weights, or rebuild the reference")


@dataclass
class ReferenceSide:
    """What the samples are compared with: pool features (precision/recall) and the statistics (FID, sFID)."""

    pool: np.ndarray
    statistics: GaussianStatistics
    spatial_statistics: GaussianStatistics
    statistics_from: str


def reference_side(reference: Reference, inception: Inception, *, batch_size: int = 64, workers: int = 0,
                   progress: Progress | None = None) -> ReferenceSide:
    """As ADM: precomputed statistics when the file has them, else those of arr_0's features; pool
    features from the file when nr stored them, else from arr_0."""
    features = None
    if reference.pool is None or reference.statistics is None:
        features = extract_features(reference.images, inception, batch_size=batch_size, workers=workers,
                                    progress=progress)
    pool = reference.pool if reference.pool is not None else features.pool
    if reference.statistics is not None:
        return ReferenceSide(pool, reference.statistics, reference.spatial_statistics,
                             "precomputed (mu, sigma, mu_s, sigma_s)")
    return ReferenceSide(pool, GaussianStatistics.of(features.pool), GaussianStatistics.of(features.spatial), "arr_0")


def evaluate(samples_path: str | Path, reference_path: str | Path, inception: Inception, *, batch_size: int = 64,
             workers: int = 0, progress: Progress | None = None,
             reference_progress: Progress | None = None) -> EvalResult:
    started = time.perf_counter()
    samples = open_samples(samples_path)
    reference = read_reference(reference_path)
    check_weights(reference, inception)
    if len(samples.images) < 2:
        raise ValueError(f"{samples.path}: {len(samples.images)} image; FID needs at least 2 (ADM scores 50,000)")
    sample_features = extract_features(samples.images, inception, batch_size=batch_size, workers=workers,
                                       progress=progress)
    side = reference_side(reference, inception, batch_size=batch_size, workers=workers, progress=reference_progress)
    reference_pool, pool_statistics, spatial_statistics = side.pool, side.statistics, side.spatial_statistics
    sample_pool = GaussianStatistics.of(sample_features.pool)
    sample_spatial = GaussianStatistics.of(sample_features.spatial)
    device = inception.device
    precision, recall = precision_recall(torch.from_numpy(reference_pool).to(device),
                                         torch.from_numpy(sample_features.pool).to(device))
    metrics = {
        "inception_score": inception_score(sample_features.logits),
        "fid": sample_pool.frechet_distance(pool_statistics),
        "sfid": sample_spatial.frechet_distance(spatial_statistics),
        "precision": precision,
        "recall": recall,
    }
    json_path = result_path(samples, Path(reference_path))
    record = {
        "metrics": metrics,
        "samples": {"path": str(samples.path.resolve()), "kind": samples.kind, "count": len(samples.images),
                    "sizes": samples.sizes(), "files": samples.files, "provenance": samples.provenance},
        "reference": {"path": str(reference.path.resolve()), "images": reference.count,
                      "statistics": side.statistics_from, "pool_features": "precomputed" if reference.pool is not None
                      else "arr_0", "provenance": _reference_provenance(reference.path)},
        "inception": {"weights": str(inception.weights_path), "sha256": inception.weights_sha256,
                      "device": str(device)},
        "settings": {"batch_size": batch_size, "workers": workers, "is_split": 5000, "nearest_k": 3,
                     "fid_eps": 1e-6},
        "nr_version": code_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": time.perf_counter() - started,
    }
    tmp = temp_path_for(json_path)
    tmp.write_text(json.dumps(record, indent=2, default=_plain) + "\n")
    publish(tmp, json_path)
    return EvalResult(metrics, record, json_path)


def _reference_provenance(path: Path) -> dict | None:
    beside = path.with_suffix(".json")
    try:
        return json.loads(beside.read_text()) if beside.is_file() else None
    except json.JSONDecodeError:
        return None  # a reference's own notes are not needed to score against it


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return str(value)
