"""The files a sampling run leaves, each written so that an interrupted run never leaves a partial one
under its final name:

    out/
      {H}x{W}/{j:06d}.png    one per sample (renamed into place when complete; resume skips them)
      samples.npz            arr_0 uint8 [N, H, W, 3] (ADM evaluator), arr_1 int64 [N] labels
                             (samples-{H}x{W}.npz, one per size, when a run has several sizes)
      grid.png               the first samples side by side (grid-{H}x{W}.png with several sizes)
      provenance.json        every setting that decided the pixels, see `nrtrain.sample`

The npz is streamed image by image into an uncompressed zip, so 50,000 samples at 512² (39 GB)
never sit in memory at once; `numpy.load` reads it as it reads `numpy.savez` output.
"""

from __future__ import annotations

import json
import math
import os
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from nrdata.catalog.atomic import is_temp, publish, temp_path_for

PROVENANCE_NAME = "provenance.json"


def sample_path(out_dir: Path, size_name: str, j: int) -> Path:
    return Path(out_dir) / size_name / f"{j:06d}.png"


def sample_done(path: Path) -> bool:
    # a rename makes a PNG visible only when complete; an empty one can only come from a crash of
    # the machine before the data reached the disk, and is made again
    return path.is_file() and path.stat().st_size > 0


def write_png(path: Path, image: np.ndarray) -> None:
    """Write uint8 [H, W, 3] under a temporary name and rename it into place.

    No fsync per image: a killed process leaves no partial PNG under the final name either way,
    and 50,000 fsyncs cost more than the rare machine crash they guard against (see sample_done).
    """
    tmp = temp_path_for(path)
    Image.fromarray(image).save(tmp, format="PNG")
    os.replace(tmp, path)


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def write_npz(path: Path, images: Sequence[Path], labels: Sequence[int], size: tuple[int, int]) -> None:
    """samples.npz from PNG files of one size: arr_0 uint8 [N, H, W, 3], arr_1 int64 [N] (as ADM's
    sampler writes it; its evaluator reads arr_0)."""
    height, width = size
    tmp = temp_path_for(Path(path))
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                                                          "fortran_order": False,
                                                          "shape": (len(images), height, width, 3)})
            for image_path in images:
                pixels = read_png(image_path)
                if pixels.shape != (height, width, 3):
                    raise ValueError(f"{image_path}: {pixels.shape[0]}x{pixels.shape[1]} pixels in the "
                                     f"{height}x{width} folder; remove it and resume the run to make it again")
                member.write(np.ascontiguousarray(pixels).tobytes())
        with archive.open("arr_1.npy", "w") as member:
            np.lib.format.write_array(member, np.asarray(labels, dtype=np.int64))
    publish(tmp, Path(path))


def write_grid(path: Path, images: Sequence[Path], columns: int | None = None) -> None:
    """The images side by side, `columns` per row (the nearest square by default)."""
    first = read_png(images[0])
    height, width = first.shape[:2]
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    canvas = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for k, image_path in enumerate(images):
        r, c = divmod(k, columns)
        canvas[r * height:(r + 1) * height, c * width:(c + 1) * width] = first if k == 0 else read_png(image_path)
    tmp = temp_path_for(Path(path))
    Image.fromarray(canvas).save(tmp, format="PNG")
    publish(tmp, Path(path))


def write_provenance(out_dir: Path, record: dict[str, Any]) -> Path:
    path = Path(out_dir) / PROVENANCE_NAME
    tmp = temp_path_for(path)
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    publish(tmp, path)
    return path


def read_provenance(out_dir: Path) -> dict[str, Any] | None:
    path = Path(out_dir) / PROVENANCE_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: unreadable ({exc}); it records how the samples here were made, so remove "
                         f"the folder or choose another --out") from exc


def remove_temporaries(folder: Path) -> int:
    """Delete what interrupted writes left behind (`.tmp-*` files); returns how many."""
    removed = 0
    for path in Path(folder).iterdir():
        if path.is_file() and is_temp(path):
            path.unlink(missing_ok=True)
            removed += 1
    return removed
