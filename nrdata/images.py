"""Decode image files into fully loaded 8-bit RGB PIL images.

Every failure, whatever its cause, comes out as one exception type, `ImageDecodeError`, whose
message names the file and says what is wrong in words a user can act on; the encode job records
it as an error row and moves on.

Pillow keeps two settings that matter here as module globals: `ImageFile.LOAD_TRUNCATED_IMAGES`
(which silently pads truncated files) and `Image.MAX_IMAGE_PIXELS` (its decompression-bomb limit).
While any decode from this module is running, they are switched to strict loading and to "no
Pillow limit", because the size limit is enforced here, per call, from `max_pixels`. Our own calls
may run in parallel threads. Code elsewhere in the process that loads images at the same moment
sees the same settings. When the last call ends, the settings go back to what they were.
"""

from __future__ import annotations

import io
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import BinaryIO, TypeVar

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Pillow refuses outright images above 2 * Image.MAX_IMAGE_PIXELS (2 * 89_478_485 by default).
# Using the same number keeps our default as permissive as Pillow's own hard limit. That is about a
# 13k x 13k image, or 537 MB as 8-bit RGB.
DEFAULT_MAX_PIXELS = 178_956_970
DEFAULT_BACKGROUND = (255, 255, 255)

_ORIENTATION_TAG = 0x0112
# EXIF orientations 5-8 include a quarter turn, so the displayed image has width and height swapped.
_QUARTER_TURN_ORIENTATIONS = frozenset({5, 6, 7, 8})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

Source = str | os.PathLike | bytes
_Result = TypeVar("_Result")


class ImageDecodeError(Exception):
    """An image that cannot be used, with the file's name and what is wrong with it."""

    def __init__(self, problem: str, name: str | None = None) -> None:
        super().__init__(f"{name}: {problem}" if name else problem)
        self.problem = problem
        self.name = name


class _StrictPillowSettings:
    """Holds Pillow's globals at strict values while at least one decode is running.

    Each call needs the same values, so a count of active calls is enough to share them. Holding
    a lock for the whole decode would do as well, but it would make threads decode one at a time.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active_calls = 0
        self._saved: tuple[bool, int | None] = (False, None)

    def __enter__(self) -> None:
        with self._lock:
            if self._active_calls == 0:
                self._saved = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
                ImageFile.LOAD_TRUNCATED_IMAGES = False
                Image.MAX_IMAGE_PIXELS = None
            self._active_calls += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._lock:
            self._active_calls -= 1
            if self._active_calls == 0:
                ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = self._saved


_STRICT_PILLOW = _StrictPillowSettings()


def decode_image(
    source: Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    name: str | None = None,
) -> Image.Image:
    """Decode a file path or encoded bytes into a fully loaded 8-bit RGB image.

    The EXIF orientation is applied. Transparent pixels are composited over `background`. Of a
    multi-frame file (GIF, TIFF, APNG), only the first frame is decoded. High-bit-depth images are
    reduced to 8 bits: 16-bit integer modes (I;16*, and I, read as 16-bit) keep their top byte
    (value >> 8, after clipping I to 0..65535). Float images (F) are read as 0..1 and scaled by 255.
    The declared size is checked against `max_pixels` before any pixel is decoded.
    `name` replaces the path in error messages. Raises ImageDecodeError for every failure of the
    image, and ValueError for invalid arguments.
    """
    _check_decode_arguments(max_pixels, background)
    label = _label(source, name)

    def decode_opened(image: ImageFile.ImageFile) -> Image.Image:
        _refuse_oversized(image.size, max_pixels, label)
        image.load()
        ImageOps.exif_transpose(image, in_place=True)
        return _to_rgb(image, background)

    return _read_image(source, label, decode_opened)


def try_decode_image(
    source: Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    name: str | None = None,
) -> tuple[Image.Image | None, str | None]:
    """Like `decode_image`, but returns (image, None) or (None, message) instead of raising.

    Invalid arguments still raise ValueError: they are a bug in the caller, not a bad image.
    """
    try:
        image = decode_image(source, max_pixels=max_pixels, background=background, name=name)
    except ImageDecodeError as error:
        return None, str(error)
    return image, None


def image_size(source: Source, *, name: str | None = None) -> tuple[int, int]:
    """(width, height) as `decode_image` would return it, after EXIF orientation.

    Reads only the header: no pixels are decoded and no size limit applies. An EXIF block that a
    PNG stores after its pixel data is not seen. `decode_image` does see it.
    """

    def displayed_size(image: ImageFile.ImageFile) -> tuple[int, int]:
        width, height = image.size
        # The base-class getexif reads only what the header parse found. PngImageFile.getexif would
        # decode the whole image to look for an EXIF chunk after the pixel data.
        orientation = Image.Image.getexif(image).get(_ORIENTATION_TAG, 1)
        if orientation in _QUARTER_TURN_ORIENTATIONS:
            return height, width
        return width, height

    return _read_image(source, _label(source, name), displayed_size)


def _read_image(
    source: Source, label: str | None, read: Callable[[ImageFile.ImageFile], _Result]
) -> _Result:
    """Open `source` with Pillow set strict; turn every failure of `read` into ImageDecodeError."""
    try:
        with _open_stream(source, label) as stream, _STRICT_PILLOW:
            return read(Image.open(stream))
    except ImageDecodeError:
        raise
    except Exception as error:
        raise ImageDecodeError(_describe(error), name=label) from error


@contextmanager
def _open_stream(source: Source, label: str | None) -> Iterator[BinaryIO]:
    # Pillow gets a stream that we opened, never a path. So paths and bytes take the same code path,
    # and Pillow never memory-maps a file that might be truncated.
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageDecodeError("empty input (0 bytes)", name=label)
        yield io.BytesIO(source)
        return
    with open(source, "rb") as stream:
        if os.fstat(stream.fileno()).st_size == 0:
            raise ImageDecodeError("zero-byte file", name=label)
        yield stream


def _label(source: Source, name: str | None) -> str | None:
    if name is not None:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return None
    return os.fspath(source)


def _check_decode_arguments(max_pixels: int, background: tuple[int, int, int]) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if (
        not isinstance(background, tuple)
        or len(background) != 3
        or not all(isinstance(v, int) and 0 <= v <= 255 for v in background)
    ):
        raise ValueError(
            f"background must be an (r, g, b) tuple of ints in 0..255, got {background!r}"
        )


def _refuse_oversized(size: tuple[int, int], max_pixels: int, label: str | None) -> None:
    width, height = size
    pixels = width * height
    if pixels > max_pixels:
        raise ImageDecodeError(
            f"{width}x{height} = {_scientific(pixels)} pixels exceeds the limit of "
            f"{_scientific(max_pixels)} (max_pixels); raise max_pixels if this image is genuine",
            name=label,
        )


def _scientific(number: int) -> str:
    mantissa, exponent = f"{number:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def _describe(error: Exception) -> str:
    """Words a user can act on for an exception raised while opening or decoding an image."""
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, IsADirectoryError):
        return "is a directory, not an image file"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, Image.UnidentifiedImageError):
        return "not an image (cannot identify image file)"
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"too many pixels for Pillow's own limit (PIL: {error})"
    if isinstance(error, OSError) and error.errno is not None:
        return f"cannot read file ({error.strerror})"
    if isinstance(error, OSError) and "truncated" in str(error).lower():
        return f"truncated file (PIL: {error})"
    return f"corrupt or unsupported image ({type(error).__name__}: {error})"


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        gray = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
        return Image.fromarray(gray.astype(np.uint8)).convert("RGB")
    if image.mode == "F":
        gray = np.rint(np.clip(np.asarray(image, dtype=np.float64), 0.0, 1.0) * 255)
        return Image.fromarray(gray.astype(np.uint8)).convert("RGB")
    if image.has_transparency_data:  # an alpha channel, a palette with alpha, or PNG/GIF tRNS
        # Dropping alpha would expose whatever colour the transparent pixels happen to store. Often
        # that is black, and it differs from one encoder to another.
        backdrop = Image.new("RGBA", image.size, (*background, 255))
        return Image.alpha_composite(backdrop, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")
