"""From stored bytes to the normalised latent a model trains on.

A catalog stores latents in its own dtype (bfloat16 as raw 16-bit words) and quantity: the mode of
the posterior, a sample, or its moments (mean then log-variance). Training draws a latent from the
moments and normalises every latent with the per-channel statistics of the manifest,
`z_norm = (z - mean) / std`; for moments these are statistics of the mean.

When a run reads several catalogs (NiT's merge of native, 256 and 512 variants), one model has to
see one latent space, and the sampler has to map it back with one set of numbers: the statistics
of all catalogs are pooled, weighted by how many latent pixels each was taken over.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from nrdata.catalog import Catalog, Normalization
from nrdata.catalog.stats import ChannelStats

# diffusers' DiagonalGaussianDistribution clamps the log-variance the same way: a corrupt or
# extreme value must not turn one latent into inf.
LOGVAR_RANGE = (-30.0, 20.0)


class NormalizationNotReadyError(ValueError):
    """A catalog's manifest has no per-channel statistics to normalise with."""


def catalog_normalization(catalog: Catalog) -> Normalization:
    """The manifest's statistics, or a NormalizationNotReadyError that says how to get them."""
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


def stored_to_float32(stored: np.ndarray, dtype: str) -> np.ndarray:
    """A stored latent (a catalog's numpy view) as float32; bfloat16 words become their float values."""
    if dtype == "bfloat16":
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)


def latent_from_moments(moments: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """z = mean + exp(logvar / 2) * noise for moments [2C, h, w] (mean first) and noise [C, h, w]."""
    channels = moments.shape[0] // 2
    mean, logvar = moments[:channels], moments[channels:]
    return mean + np.exp(0.5 * np.clip(logvar, *LOGVAR_RANGE)) * noise
