"""The built-in demo dataset: two-colour textures of five classes at native sizes from tiny to a few
hundred pixels and aspect ratios from 1:3 to 3:1, plus a few broken files so that the errors table
has something to show. Generated, deterministic for a seed, nothing downloaded.

Textures rather than centred shapes: a class is then visible in every crop and at every size and
aspect ratio, which is what a native-resolution model trained for minutes on a CPU can learn, and
what makes samples at sizes never seen in training recognisable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = ("checks", "diagonal", "dots", "hbands", "vbands")
MIN_SIDE, MAX_SIDE = 24, 320
BAD_FILES = {
    "checks/zero_bytes.jpg": "a zero-byte file",
    "dots/truncated.jpg": "a JPEG cut in half",
    "vbands/not_an_image.png": "text with an image extension",
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


def draw_texture(name: str, width: int, height: int, rng: np.random.Generator) -> Image.Image:
    background = _colour(rng)
    ink = _colour(rng, far_from=background)
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    period = max(6.0, min(width, height) * rng.uniform(0.15, 0.3))  # a few periods in every image
    half = period / 2
    dx, dy = rng.uniform(0, period, 2)  # phase
    columns = range(-1, int(width / period) + 2)
    rows = range(-1, int(height / period) + 2)
    if name == "hbands":
        for j in rows:
            y = j * period + dy
            draw.rectangle([0, y, width, y + half], fill=ink)
    elif name == "vbands":
        for i in columns:
            x = i * period + dx
            draw.rectangle([x, 0, x + half, height], fill=ink)
    elif name == "checks":
        for j in rows:
            for i in columns:
                if (i + j) % 2 == 0:
                    x, y = i * period + dx, j * period + dy
                    draw.rectangle([x, y, x + period, y + period], fill=ink)
    elif name == "dots":
        r = period * 0.3
        for j in rows:
            for i in columns:
                x, y = i * period + dx, j * period + dy
                draw.ellipse([x - r, y - r, x + r, y + r], fill=ink)
    elif name == "diagonal":
        for k in range(-int((width + height) / period) - 2, int((width + height) / period) + 2):
            x = k * period + dx  # bands at 45°, across any aspect ratio
            draw.polygon([(x, 0), (x + half, 0), (x + half + height, height), (x + height, height)], fill=ink)
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
            image = draw_texture(name, width, height, rng)
            if i % 2:
                image.save(root / name / f"{name}_{i:04d}.png")
            else:
                image.save(root / name / f"{name}_{i:04d}.jpg", quality=92)
            count += 1
    if bad_files:
        (root / "checks" / "zero_bytes.jpg").write_bytes(b"")
        whole = (root / "dots" / "dots_0000.jpg").read_bytes()
        (root / "dots" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
        (root / "vbands" / "not_an_image.png").write_text("this is not a PNG\n")
    return DemoSummary(root, count, len(BAD_FILES) if bad_files else 0, CLASSES)
