"""Which numbers normalise a run's latents, in one of two modes recorded in every run:

- per-channel (nr's default): the statistics of the manifests, `z_norm = (z - mean) / std` (for
  moments these are statistics of the mean);
- scalar (NiT's, FiT's and SD's): `z_norm = z * scaling_factor`, no shift, the factor from the
  encoder's config (recorded in the manifest) or given. NiT's released weights expect it.

Both are per-channel vectors to the compiled code that applies them to stored bytes
(`nrtrain.latent_kernels`): scalar mode is mean 0 and std 1 / scaling_factor in every channel. The
mode and the factor are still recorded, because the vectors alone do not say which rule a run
follows, and a run of one mode must refuse checkpoints and catalogs of the other.

When a run reads several catalogs (NiT's merge of native, 256 and 512 variants), one model has to
see one latent space, and the sampler has to map it back with one set of numbers: the statistics
of all catalogs are pooled, weighted by how many latent pixels each was taken over.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nrdata.catalog import Catalog, Normalization
from nrdata.catalog.stats import ChannelStats

NORMALIZATION_MODES = ("per-channel", "scalar")


class NormalizationNotReadyError(ValueError):
    """A catalog's manifest has no per-channel statistics to normalise with."""


def catalog_normalization(catalog: Catalog) -> Normalization:
    """The manifest's statistics, or a NormalizationNotReadyError that says how to get them.

    They must be the statistics the shards carry (CatalogIntegrityError otherwise): the manifest is a
    hand-editable copy of them, outside the fingerprint."""
    manifest = catalog.manifest
    norm = manifest.normalization
    channels = manifest.encoder.channels
    if not norm.ready or norm.count <= 0:
        raise NormalizationNotReadyError(
            f"{catalog.root}: the manifest has no normalisation statistics (mean/std per channel), so its latents "
            "cannot be normalised. The encode that wrote it did not finish; re-run the same `nr encode` command on "
            "this output: it skips the committed rows and writes the statistics when it closes the catalog"
        )
    if len(norm.mean) != channels:
        raise NormalizationNotReadyError(
            f"{catalog.root}: the manifest's normalisation has {len(norm.mean)} channels but the encoder has "
            f"{channels}; the manifest was edited or written by another tool: re-encode the catalog"
        )
    if min(norm.std) <= 0:
        raise NormalizationNotReadyError(
            f"{catalog.root}: channel {int(np.argmin(norm.std))} has std {min(norm.std)}; a constant channel "
            "cannot be normalised (is the catalog a handful of identical latents?)"
        )
    catalog.check_normalization()
    return norm


def pooled_normalization(catalogs: Sequence[Catalog]) -> Normalization:
    """One set of statistics for the latents of every catalog (count-weighted, exact)."""
    if not catalogs:
        raise ValueError("no catalogs given")
    channels = {c.manifest.encoder.channels for c in catalogs}
    if len(channels) != 1:
        raise ValueError(f"the catalogs hold latents of {sorted(channels)} channels; one model reads one kind")
    norms = [catalog_normalization(c) for c in catalogs]
    if len(norms) == 1:
        return norms[0]
    pooled = ChannelStats.empty(channels.pop())
    for norm in norms:
        std = np.asarray(norm.std, np.float64)
        pooled = pooled.merge(ChannelStats(norm.count, np.asarray(norm.mean, np.float64), std**2 * norm.count))
    return Normalization(mean=tuple(pooled.mean.tolist()), std=tuple(pooled.std.tolist()), count=pooled.count)



@dataclass(frozen=True)
class LatentScaling:
    """How a run maps stored latents z to what the model sees (`normalize`) and back (`denormalize`).

    `mean`/`std` are the per-channel vectors the loader applies in either mode; `count` is the
    latent pixels the statistics were taken over (0 in scalar mode, which takes none)."""

    mode: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    count: int = 0
    scaling_factor: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in NORMALIZATION_MODES:
            raise ValueError(f"unknown normalization {self.mode!r}; choose one of {', '.join(NORMALIZATION_MODES)}")
        if self.mode == "scalar" and not (self.scaling_factor and self.scaling_factor > 0):
            raise ValueError(f"scalar normalisation needs a scaling factor > 0, got {self.scaling_factor}")

    @classmethod
    def scalar(cls, scaling_factor: float, channels: int) -> LatentScaling:
        factor = float(scaling_factor)
        if not factor > 0:
            raise ValueError(f"scaling factor must be > 0, got {scaling_factor}")
        return cls("scalar", (0.0,) * channels, (1.0 / factor,) * channels, 0, factor)

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LatentScaling:
        """From a run's data identity; runs written before the modes existed are per-channel."""
        mode = record.get("mode", "per-channel")
        if mode == "scalar":
            return cls.scalar(record["scaling_factor"], len(record["mean"]))
        return cls("per-channel", tuple(record["mean"]), tuple(record["std"]), int(record.get("count", 0)))

    def record(self) -> dict[str, Any]:
        return {"mode": self.mode, "scaling_factor": self.scaling_factor, "mean": list(self.mean),
                "std": list(self.std), "count": self.count}

    def describe(self) -> str:
        if self.mode == "scalar":
            return f"scalar (z_norm = z * {self.scaling_factor:g})"
        return "per-channel (z_norm = (z - mean) / std, the catalogs' statistics)"

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """What the model sees of latents z [N, C, h, w] (the loader applies the same rule to bytes)."""
        if self.mode == "scalar":
            return z * self.scaling_factor
        return (z - self._vector(self.mean, z)) / self._vector(self.std, z)

    def denormalize(self, z_norm: torch.Tensor) -> torch.Tensor:
        """Latents [N, C, h, w] for the decoder; scalar mode divides by the factor, as NiT decodes."""
        if self.mode == "scalar":
            return z_norm / self.scaling_factor
        return z_norm * self._vector(self.std, z_norm) + self._vector(self.mean, z_norm)

    @staticmethod
    def _vector(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
        return torch.tensor(values, dtype=like.dtype, device=like.device)[:, None, None]


def run_normalization(catalogs: Sequence[Catalog], mode: str = "per-channel",
                      scaling_factor: float | None = None) -> LatentScaling:
    """The normalisation of a run on `catalogs`: their pooled statistics (per-channel), or scalar with
    `scaling_factor`, by default the one the catalogs' encoder config records."""
    if mode not in NORMALIZATION_MODES:
        raise ValueError(f"unknown normalization {mode!r}; choose one of {', '.join(NORMALIZATION_MODES)}")
    if mode == "per-channel":
        norm = pooled_normalization(catalogs)
        return LatentScaling("per-channel", tuple(norm.mean), tuple(norm.std), int(norm.count))
    channels = {c.manifest.encoder.channels for c in catalogs}
    if len(channels) != 1:
        raise ValueError(f"the catalogs hold latents of {sorted(channels)} channels; one model reads one kind")
    if scaling_factor is None:
        recorded = {c.manifest.encoder.scaling_factor for c in catalogs}
        if len(recorded) != 1 or None in recorded:
            where = ", ".join(f"{c.root}: {c.manifest.encoder.scaling_factor}" for c in catalogs)
            raise ValueError(f"scalar normalisation takes the encoder's scaling factor, but the catalogs record "
                             f"{'none' if recorded == {None} else 'different ones'} ({where}); set "
                             f"scaling_factor in the config")
        scaling_factor = recorded.pop()
    return LatentScaling.scalar(scaling_factor, channels.pop())
