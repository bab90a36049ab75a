"""Inception features of an image sequence: batches of one image size each, decoded by DataLoader
workers, on the Inception's device, scattered back into the sequence's order (the Inception Score's
splits are contiguous in that order)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch

from nreval.inception import Inception

Progress = Callable[[int, int], None]  # (images done, images in all)


@dataclass
class Features:
    """float32 features of N images: pool [N, 2048], spatial [N, 2023], logits [N, 1008]."""

    pool: np.ndarray
    spatial: np.ndarray
    logits: np.ndarray

    def __len__(self) -> int:
        return len(self.pool)


class _IndexedImages(torch.utils.data.Dataset):
    def __init__(self, images: Any):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        pixels = np.ascontiguousarray(self.images[index])
        if not pixels.flags.writeable:  # a view of a decoded PIL image: torch wants memory it may write
            pixels = pixels.copy()
        return index, torch.from_numpy(pixels).permute(2, 0, 1)


def size_batches(images: Any, batch_size: int) -> list[list[int]]:
    """Indices in batches of at most batch_size images of one size, in order within each size."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for index in range(len(images)):
        by_size.setdefault(tuple(images.size(index)), []).append(index)
    return [indices[start:start + batch_size] for indices in by_size.values()
            for start in range(0, len(indices), batch_size)]


def _collate(items: list[tuple[int, torch.Tensor]]) -> tuple[list[int], torch.Tensor]:
    return [index for index, _ in items], torch.stack([pixels for _, pixels in items])


def _batches(images: Any, batch_size: int, workers: int, pin: bool) -> Iterator[tuple[list[int], torch.Tensor]]:
    loader = torch.utils.data.DataLoader(_IndexedImages(images), batch_sampler=size_batches(images, batch_size),
                                         num_workers=workers, collate_fn=_collate, pin_memory=pin,
                                         persistent_workers=False)
    yield from loader


def iter_features(images: Any, inception: Inception, *, batch_size: int = 64, workers: int = 0,
                  progress: Progress | None = None) -> Iterator[tuple[list[int], torch.Tensor, dict[str, np.ndarray]]]:
    """(indices, uint8 [B, 3, H, W] pixels, float32 features by name) batch by batch."""
    if len(images) == 0:
        raise ValueError("no images to extract features from")
    done = 0
    for indices, pixels in _batches(images, batch_size, workers, inception.device.type == "cuda"):
        features = {name: values.cpu().numpy() for name, values in inception(pixels).items()}
        done += len(indices)
        yield indices, pixels, features
        if progress:
            progress(done, len(images))


def extract_features(images: Any, inception: Inception, *, batch_size: int = 64, workers: int = 0,
                     progress: Progress | None = None) -> Features:
    """Features of every image, in the sequence's order."""
    total = len(images)
    out = {"pool": np.empty((total, 2048), np.float32), "spatial": np.empty((total, 2023), np.float32),
           "logits": np.empty((total, 1008), np.float32)}
    for indices, _, batch in iter_features(images, inception, batch_size=batch_size, workers=workers,
                                           progress=progress):
        for name, values in batch.items():
            out[name][indices] = values
    return Features(**out)
