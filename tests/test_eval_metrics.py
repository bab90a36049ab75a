"""nreval.metrics against computations written here from ADM's definitions, on synthetic features
(small dimensions: scipy's sqrtm of a 2048² matrix takes tens of seconds on two cores)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import pytest
import torch

from nreval.metrics import (GaussianStatistics, RunningMoments, frechet_distance, inception_score, manifold_radii,
                            pairwise_distances, precision_recall)


def fid_by_eigenvalues(a: np.ndarray, b: np.ndarray) -> float:
    # tr sqrt(S1 S2) is the sum of the square roots of S1 S2's eigenvalues (real and >= 0 for covariances)
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    eigenvalues = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eigenvalues).sum())


def test_fid_equals_the_frechet_distance_of_the_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 12)) @ rng.normal(size=(12, 12))
    b = rng.normal(0.3, 1.2, size=(150, 12)) @ rng.normal(size=(12, 12))
    ours = GaussianStatistics.of(a).frechet_distance(GaussianStatistics.of(b))
    assert ours == pytest.approx(fid_by_eigenvalues(a, b), rel=1e-9)
    assert GaussianStatistics.of(a).frechet_distance(GaussianStatistics.of(a)) == pytest.approx(0, abs=1e-8)
    assert GaussianStatistics.of(a).sigma.dtype == np.float64


def test_fid_retries_with_1e6_on_the_diagonal_when_the_square_root_is_not_finite():
    # S1 S2 = [[0, 1], [0, 0]] has no square root (sqrtm gives inf); with 1e-6 added to both diagonals the
    # product is [[a, 1 + eps], [0, a]], a = eps (1 + eps), whose square root has trace 2 sqrt(a)
    eps = 1e-6
    sigma1, sigma2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    expected = 0 + np.trace(sigma1) + np.trace(sigma2) - 2 * 2 * math.sqrt(eps * (1 + eps))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not np.isfinite(scipy.linalg.sqrtm(sigma1 @ sigma2)).all()  # the first try fails
    assert frechet_distance(np.zeros(2), sigma1, np.zeros(2), sigma2) == pytest.approx(expected, rel=1e-9)


def test_fid_refuses_statistics_of_different_dimensions():
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(2), np.eye(2))


def test_running_moments_equal_mean_and_np_cov():
    rng = np.random.default_rng(1)
    rows = rng.normal(50, 3, size=(1000, 9)).astype(np.float32)
    moments = RunningMoments()
    for start in range(0, 1000, 64):
        moments.add(rows[start:start + 64])
    statistics = moments.statistics()
    assert np.allclose(statistics.mu, rows.astype(np.float64).mean(0), rtol=0, atol=1e-10)
    assert np.allclose(statistics.sigma, np.cov(rows, rowvar=False), rtol=1e-10, atol=1e-10)


def inception_score_by_definition(logits: np.ndarray, split: int) -> float:
    scores = []
    for start in range(0, len(logits), split):
        part = logits[start:start + split].astype(np.float64)
        p = np.exp(part) / np.exp(part).sum(1, keepdims=True)
        marginal = p.mean(0)
        scores.append(math.exp(np.mean([(row * np.log(row / marginal)).sum() for row in p])))
    return float(np.mean(scores))


def test_inception_score_is_the_mean_over_contiguous_splits_of_5000():
    rng = np.random.default_rng(2)
    # three splits (5000, 5000, 1000) that differ: the first is confident, the others less so
    logits = rng.normal(size=(11_000, 10)).astype(np.float32) * np.repeat([4.0, 1.0, 2.0], [5000, 5000, 1000])[:, None]
    ours = inception_score(logits)
    assert ours == pytest.approx(inception_score_by_definition(logits, 5000), rel=1e-4)
    shuffled = logits[rng.permutation(len(logits))]
    assert abs(inception_score_by_definition(shuffled, 5000) - ours) > 0.05  # no shuffling: order matters
    assert ours != pytest.approx(inception_score_by_definition(logits, 11_000), rel=1e-3)  # not one split


def precision_recall_by_definition(reference: np.ndarray, samples: np.ndarray, k: int = 3,
                                   strict: bool = False) -> tuple[float, float]:
    def distances(u, v):
        return ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)

    def radii(x):
        return np.sort(distances(x, x), axis=1)[:, k]  # the (k+1)-th smallest: the point itself is the first

    inside = np.less if strict else np.less_equal
    d = distances(reference.astype(np.float64), samples.astype(np.float64))
    precision = inside(d, radii(reference)[:, None]).any(axis=0).mean()
    recall = inside(d, radii(samples)[None, :]).any(axis=1).mean()
    return float(precision), float(recall)


def integer_features(seed: int, n: int, scale: float = 1.0) -> np.ndarray:
    # small integers: every squared distance is an integer float16 holds exactly, ties included
    return np.random.default_rng(seed).integers(0, 3, size=(n, 8)).astype(np.float32) * scale


def test_precision_recall_equal_the_definition_with_ties_counted_by_less_or_equal():
    reference, samples = integer_features(3, 40), integer_features(4, 30) + np.float32(0.5) * (np.arange(8) % 2 == 0)
    ours = precision_recall(torch.from_numpy(reference), torch.from_numpy(samples))
    assert ours == precision_recall_by_definition(reference, samples)
    assert precision_recall_by_definition(reference, samples, strict=True) != ours  # `<=` decides ties here


def test_precision_recall_in_blocks_equal_one_block():
    reference, samples = integer_features(5, 23), integer_features(6, 17)
    whole = precision_recall(torch.from_numpy(reference), torch.from_numpy(samples))
    assert precision_recall(torch.from_numpy(reference), torch.from_numpy(samples), block=5) == whole
    radii = manifold_radii(torch.from_numpy(reference), block=4)
    assert torch.equal(radii, manifold_radii(torch.from_numpy(reference)))


def test_distances_are_float16_unless_that_overflows_then_float32():
    rng = np.random.default_rng(7)
    u = torch.from_numpy(rng.normal(size=(20, 64)).astype(np.float32))
    v = torch.from_numpy(rng.normal(size=(15, 64)).astype(np.float32))
    d = pairwise_distances(u, v)
    assert d.dtype == torch.float32 and torch.equal(d, d.half().float())  # float16 values
    exact = torch.cdist(u.double(), v.double()) ** 2
    assert torch.allclose(d.double(), exact, rtol=2e-2, atol=0.5)
    # norms of 8 x 192² = 294912 overflow float16 (max 65504): the block is computed in float32, exactly
    big_reference, big_samples = integer_features(8, 30, 192.0), integer_features(9, 25, 192.0)
    d = pairwise_distances(torch.from_numpy(big_reference), torch.from_numpy(big_samples))
    expected = ((big_reference[:, None].astype(np.float64) - big_samples[None]) ** 2).sum(-1)
    assert torch.isfinite(d).all() and np.array_equal(d.numpy(), expected)
    ours = precision_recall(torch.from_numpy(big_reference), torch.from_numpy(big_samples))
    assert ours == precision_recall_by_definition(big_reference, big_samples)


def test_identical_sets_give_precision_and_recall_one_and_fid_zero():
    features = np.random.default_rng(10).normal(size=(50, 16)).astype(np.float32)
    tensor = torch.from_numpy(features)
    assert precision_recall(tensor, tensor.clone()) == (1.0, 1.0)
    statistics = GaussianStatistics.of(features)
    assert statistics.frechet_distance(GaussianStatistics.of(features.copy())) == pytest.approx(0, abs=1e-8)


def test_too_few_rows_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="more than 3 feature rows"):
        precision_recall(torch.zeros(3, 4), torch.zeros(10, 4))
    with pytest.raises(ValueError, match="at least 2"):
        GaussianStatistics.of(np.zeros((1, 4)))
