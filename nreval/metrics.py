"""The five numbers of OpenAI's ADM evaluator (guided-diffusion `evaluations/evaluator.py`), computed
from Inception features, in our own words and in the dtypes ADM uses.

- FID / sFID: mean and covariance (`np.cov(rowvar=False)`, float64) of pool (2048) or spatial
  (2023) features; Fréchet distance with `scipy.linalg.sqrtm`, retried with 1e-6 added to both
  diagonals when the square root is not finite.
- Inception Score: softmax of the unbiased logits in float32, contiguous splits of 5,000 in the
  order given (no shuffling), the mean of exp(mean KL) over the splits.
- Precision / recall (Kynkäänniemi et al. 2019): the radius of a feature is its squared distance to
  its 4th nearest feature of the same set, itself included (k = 3); a point is covered when its
  squared distance to some point of the other set is `<=` that point's radius. Distances are
  computed in float16 and recomputed in float32 for any block where float16 is not finite, in
  blocks of 10,000 rows by 10,000 columns, on whatever device the features are given.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

FID_EPS = 1e-6
IS_SPLIT = 5000
NEIGHBOURS = 3  # k: the radius is the distance to the k-th neighbour, the point itself not counted
DISTANCE_BLOCK = 10_000


@dataclass(frozen=True)
class GaussianStatistics:
    """Mean and covariance of a feature set (float64), what FID and sFID compare."""

    mu: np.ndarray
    sigma: np.ndarray

    @classmethod
    def of(cls, features: np.ndarray) -> GaussianStatistics:
        if len(features) < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {len(features)}")
        features = np.asarray(features, dtype=np.float64)
        return cls(features.mean(axis=0), np.cov(features, rowvar=False))

    def frechet_distance(self, other: GaussianStatistics, eps: float = FID_EPS) -> float:
        return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps)


class RunningMoments:
    """Mean and covariance of feature rows given batch by batch, in float64, without holding them
    (a reference over ImageNet's 1.28M images would need 20 GB of features). Rows are shifted by the
    first batch's mean first, which keeps the one-pass covariance as accurate as np.cov's two passes."""

    def __init__(self) -> None:
        self.count = 0
        self.shift: np.ndarray | None = None
        self.total: np.ndarray | None = None
        self.products: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> None:
        rows = np.asarray(rows, dtype=np.float64)
        if self.shift is None:
            self.shift = rows.mean(axis=0)
            self.total = np.zeros_like(self.shift)
            self.products = np.zeros((len(self.shift), len(self.shift)))
        centred = rows - self.shift
        self.count += len(rows)
        self.total += centred.sum(axis=0)
        self.products += centred.T @ centred

    def statistics(self) -> GaussianStatistics:
        if self.count < 2:
            raise ValueError(f"a covariance needs at least 2 feature rows, got {self.count}")
        mean = self.total / self.count
        sigma = (self.products - self.count * np.outer(mean, mean)) / (self.count - 1)
        return GaussianStatistics(self.shift + mean, sigma)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = FID_EPS) -> float:
    """|mu1 - mu2|² + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2))."""
    import scipy.linalg  # here: precision/recall and the features run where scipy is absent (the GPU check)

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # a singular product is the expected case the retry handles
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(len(sigma1)) * eps
            covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the square root of sigma1 @ sigma2 has an imaginary component of up to "
                             f"{np.max(np.abs(covmean.imag)):.3g}: the statistics are not covariances")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """Mean over contiguous splits of exp(E_x KL(p(y|x) || p(y))), p(y|x) = softmax(logits) in float32."""
    logits = np.asarray(logits, dtype=np.float32)
    if len(logits) == 0:
        raise ValueError("no samples to score")
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    probs = exp / exp.sum(axis=1, keepdims=True)
    scores = []
    for start in range(0, len(probs), split_size):
        part = probs[start:start + split_size]
        kl = part * (np.log(part) - np.log(part.mean(axis=0, keepdims=True)))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _squared_distances(u, v):
    norm_u = (u * u).sum(dim=1, keepdim=True)
    norm_v = (v * v).sum(dim=1).unsqueeze(0)
    return (norm_u - 2 * (u @ v.T) + norm_v).clamp_min(0)


def pairwise_distances(u, v):
    """Squared euclidean distances [len(u), len(v)] in float32, computed in float16 unless that
    overflows anywhere in the block (then in float32), as ADM's DistanceBlock does."""
    import torch

    half = _squared_distances(u.to(torch.float16), v.to(torch.float16))
    if bool(torch.isfinite(half).all()):
        return half.float()
    return _squared_distances(u.float(), v.float())


def manifold_radii(features, k: int = NEIGHBOURS, block: int = DISTANCE_BLOCK):
    """Each row's squared distance to its (k+1)-th nearest row of the same set, itself included."""
    import torch

    if len(features) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} feature rows, got {len(features)}")
    radii = torch.empty(len(features), dtype=torch.float32, device=features.device)
    for start in range(0, len(features), block):
        rows = features[start:start + block]
        distances = torch.cat([pairwise_distances(rows, features[c:c + block])
                               for c in range(0, len(features), block)], dim=1)
        radii[start:start + block] = torch.kthvalue(distances, k + 1, dim=1).values
    return radii


def precision_recall(reference, samples, k: int = NEIGHBOURS, block: int = DISTANCE_BLOCK) -> tuple[float, float]:
    """(precision, recall): the share of samples inside some reference ball, and of reference rows
    inside some sample ball. Every reference row is compared with every sample; the tensors' device
    is where the distances are computed."""
    import torch

    reference_radii = manifold_radii(reference, k, block)
    sample_radii = manifold_radii(samples, k, block)
    reference_covered = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    sample_covered = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    for r in range(0, len(reference), block):
        for s in range(0, len(samples), block):
            distances = pairwise_distances(reference[r:r + block], samples[s:s + block])
            reference_covered[r:r + block] |= (distances <= sample_radii[None, s:s + block]).any(dim=1)
            sample_covered[s:s + block] |= (distances <= reference_radii[r:r + block, None]).any(dim=0)
    return float(sample_covered.double().mean()), float(reference_covered.double().mean())
