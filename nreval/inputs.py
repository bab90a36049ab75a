"""The images nr eval reads, as uint8 [H, W, 3] arrays whose sizes are known before any is decoded
(batches group images of one size; Inception resizes each batch to 299x299):

- an ADM-style `.npz` (`arr_0` uint8 NHWC); an uncompressed one (what `numpy.savez` and nr sample
  write) is memory-mapped, so 50,000 samples never sit in memory and DataLoader workers read
  their own slices;
- an nr sample folder (it holds provenance.json): its `samples*.npz`, else its PNGs;
- any folder of images, searched recursively, sorted by path, sizes free to differ.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from nrdata.images import ImageDecodeError, decode_image, image_size
from nrdata.sources import IMAGE_EXTENSIONS

PROVENANCE_NAME = "provenance.json"  # what nr sample writes beside its samples (nrtrain.sample_outputs)


class NpzImages:
    """`key` (default arr_0) of an .npz as a sequence of uint8 [H, W, 3] images."""

    def __init__(self, path: str | Path, key: str = "arr_0"):
        self.path = Path(path)
        self.key = key
        self._array: np.ndarray | None = None
        try:
            with zipfile.ZipFile(self.path) as archive:
                info = archive.getinfo(f"{key}.npy")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, fortran, dtype = read_header(member)
                    header_length = member.tell()
        except (zipfile.BadZipFile, OSError) as exc:
            raise ValueError(f"{self.path}: not a readable .npz ({exc})") from exc
        except KeyError:
            raise ValueError(f"{self.path}: holds no {key} (ADM's sample and reference batches keep their "
                             f"images in {key}, uint8 [N, H, W, 3])") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran:
            raise ValueError(f"{self.path}: {key} is {dtype} {shape}; expected uint8 [N, H, W, 3] (NHWC RGB)")
        self.shape = tuple(shape)
        # a stored member is a plain byte range of the file: map it instead of reading it
        self._offset = self._data_offset(info) + header_length if info.compress_type == zipfile.ZIP_STORED else None

    def _data_offset(self, info: zipfile.ZipInfo) -> int:
        with open(self.path, "rb") as handle:
            handle.seek(info.header_offset)
            local = handle.read(30)
        name_length = int.from_bytes(local[26:28], "little")
        extra_length = int.from_bytes(local[28:30], "little")
        return info.header_offset + 30 + name_length + extra_length

    @property
    def array(self) -> np.ndarray:
        if self._array is None:  # opened lazily: a DataLoader worker pickles the path, not the data
            if self._offset is not None:
                self._array = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._offset, shape=self.shape)
            else:
                with np.load(self.path) as data:
                    self._array = data[self.key]
        return self._array

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_array": None}

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        return np.array(self.array[index])  # a copy: the map is read-only, and torch wants writable memory

    def size(self, index: int) -> tuple[int, int]:
        return self.shape[1], self.shape[2]


class FileImages:
    """Image files as uint8 [H, W, 3] (EXIF orientation applied, as nr encode decodes them)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = [Path(p) for p in paths]
        self._sizes: list[tuple[int, int]] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        try:
            return np.array(decode_image(self.paths[index]))
        except ImageDecodeError as exc:
            raise ValueError(f"{exc}; remove the file or replace it, then run again") from exc

    def size(self, index: int) -> tuple[int, int]:
        if self._sizes is None:
            self._sizes = []
            for path in self.paths:
                try:
                    width, height = image_size(path)
                except ImageDecodeError as exc:
                    raise ValueError(f"{exc}; remove the file or replace it, then run again") from exc
                self._sizes.append((height, width))
        return self._sizes[index]


class ConcatImages:
    """Several image sequences read as one, in order."""

    def __init__(self, parts: Sequence[Any]):
        self.parts = list(parts)
        self._starts = np.cumsum([0] + [len(p) for p in self.parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, index: int) -> tuple[Any, int]:
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self.parts[part], index - int(self._starts[part])

    def __getitem__(self, index: int) -> np.ndarray:
        part, local = self._locate(index)
        return part[local]

    def size(self, index: int) -> tuple[int, int]:
        part, local = self._locate(index)
        return part.size(local)


@dataclass
class SampleSet:
    """What nr eval scores: the images, what they were read from, and how they were made when known."""

    images: Any  # NpzImages | FileImages | ConcatImages
    path: Path
    kind: str  # "npz", "nr-samples" or "image-folder"
    files: list[str] = field(default_factory=list)  # the .npz files read (image folders: none listed)
    provenance: dict | None = None

    def sizes(self) -> dict[str, int]:
        """"HxW" -> how many images have that size."""
        counts: dict[str, int] = {}
        for index in range(len(self.images)):
            height, width = self.images.size(index)
            counts[f"{height}x{width}"] = counts.get(f"{height}x{width}", 0) + 1
        return counts


def image_files(folder: Path) -> list[Path]:
    """Every image under folder, recursively, sorted by path."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _read_provenance(folder: Path) -> dict | None:
    path = folder / PROVENANCE_NAME
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: unreadable ({exc}); restore it or remove it to score the folder as plain "
                         f"images") from exc


def open_samples(path: str | Path) -> SampleSet:
    """An .npz (arr_0), an nr sample folder or a folder of images, as a SampleSet."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file or folder; give an .npz (arr_0 uint8 NHWC), an nr sample folder "
                         f"or a folder of images")
    if path.is_file():
        if path.suffix != ".npz":
            raise ValueError(f"{path}: not an .npz; give an .npz (arr_0 uint8 NHWC), an nr sample folder or a "
                             f"folder of images")
        return SampleSet(NpzImages(path), path, "npz", [path.name], _read_provenance(path.parent))
    provenance = _read_provenance(path)
    if provenance is not None:
        npz = sorted(path.glob("samples*.npz"))
        if npz:
            return SampleSet(ConcatImages([NpzImages(p) for p in npz]), path, "nr-samples",
                             [p.name for p in npz], provenance)
    files = image_files(path)
    if not files:
        raise ValueError(f"{path}: holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) and no samples*.npz")
    return SampleSet(FileImages(files), path, "nr-samples" if provenance else "image-folder", [], provenance)
