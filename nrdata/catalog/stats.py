"""Exact streaming per-channel mean and standard deviation.

Each shard carries the (count, mean, M2) of the latents it holds; merging them (Chan et al.)
gives the statistics of exactly the committed rows, whatever order they were written in and
however many runs it took.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class ChannelStats:
    count: int
    mean: np.ndarray  # float64 [C]
    m2: np.ndarray  # float64 [C], sum of squared deviations

    @classmethod
    def empty(cls, channels: int) -> ChannelStats:
        return cls(0, np.zeros(channels), np.zeros(channels))

    @classmethod
    def of(cls, latent: np.ndarray) -> ChannelStats:
        """Statistics of one latent [C, h, w]."""
        flat = latent.reshape(latent.shape[0], -1).astype(np.float64)
        mean = flat.mean(axis=1)
        return cls(flat.shape[1], mean, ((flat - mean[:, None]) ** 2).sum(axis=1))

    def merge(self, other: ChannelStats) -> ChannelStats:
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        n = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / n)
        m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / n)
        return ChannelStats(n, mean, m2)

    @property
    def std(self) -> np.ndarray:
        # population std: the convention used for latent normalisation in LightningDiT and MAR
        return np.sqrt(self.m2 / max(self.count, 1))

    def to_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> ChannelStats:
        return cls(int(data["count"]), np.asarray(data["mean"], np.float64), np.asarray(data["m2"], np.float64))
