"""The built-in demo dataset: shapes of a few classes at native sizes from tiny to a few hundred
pixels and aspect ratios from 1:3 to 3:1, plus a few broken files so that the errors table has
something to show. Generated, deterministic for a seed, nothing downloaded."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("circle", "cross", "square", "stripes", "triangle")
MIN_SIDE, MAX_SIDE = 24, 320
BAD_FILES = {
    "circle/zero_bytes.jpg": "a zero-byte file",
    "square/truncated.jpg": "a JPEG cut in half",
    "triangle/not_an_image.png": "text with an image extension",
}


@dataclass(frozen=True)
class DemoSummary:
    root: Path
    images: int
    bad_files: int
    classes: tuple[str, ...]


def _size(rng: np.random.Generator) -> tuple[int, int]:
    aspect = math.exp(rng.uniform(math.log(1 / 3), math.log(3)))  # width / height
    area = math.exp(rng.uniform(math.log(MIN_SIDE * MIN_SIDE * 2), math.log(MAX_SIDE * MAX_SIDE * 0.6)))
    width = int(np.clip(math.sqrt(area * aspect), MIN_SIDE, MAX_SIDE))
    height = int(np.clip(math.sqrt(area / aspect), MIN_SIDE, MAX_SIDE))
    return width, height


def _colour(rng: np.random.Generator, far_from: tuple[int, ...] | None = None) -> tuple[int, int, int]:
    while True:
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if far_from is None or sum(abs(a - b) for a, b in zip(colour, far_from)) > 200:
            return colour


def draw_shape(name: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    background = _colour(rng)
    ink = _colour(rng, far_from=background)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    side = min(width, height)
    r = side * rng.uniform(0.3, 0.45)
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    if name == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=ink)
    elif name == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=ink)
    elif name == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=ink)
    elif name == "cross":
        t = r * 0.35
        draw.rectangle([cx - r, cy - t, cx + r, cy + t], fill=ink)
        draw.rectangle([cx - t, cy - r, cx + t, cy + r], fill=ink)
    elif name == "stripes":
        period = max(4, int(side * rng.uniform(0.12, 0.25)))
        for x in range(-height, width + height, period):  # diagonal bands fill any aspect ratio
            draw.polygon([(x, 0), (x + period // 2, 0), (x + period // 2 + height, height), (x + height, height)],
                         fill=ink)
    else:
        raise ValueError(f"unknown demo class {name!r}; classes are {CLASSES}")
    return image


def write_demo_images(root: str | Path, *, per_class: int = 40, seed: int = 0, bad_files: bool = True) -> DemoSummary:
    """Write the demo set under `root/<class>/`. Re-running with the same arguments gives the same files."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    count = 0
    for name in CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            width, height = _size(rng)
            image = draw_shape(name, width, height, rng)
            if i % 2:
                image.save(root / name / f"{name}_{i:04d}.png")
            else:
                image.save(root / name / f"{name}_{i:04d}.jpg", quality=92)
            count += 1
    if bad_files:
        (root / "circle" / "zero_bytes.jpg").write_bytes(b"")
        whole = (root / "square" / "square_0000.jpg").read_bytes()
        (root / "square" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
        (root / "triangle" / "not_an_image.png").write_text("this is not a PNG\n")
    return DemoSummary(root, count, len(BAD_FILES) if bad_files else 0, CLASSES)
