"""Tests for nrdata.images: every bad kind of file fails with a clear ImageDecodeError, and every
odd but valid kind decodes to the right 8-bit RGB pixels."""

from __future__ import annotations

import io
import pickle
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from nrdata.images import (
    DEFAULT_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    decode_image,
    image_size,
    try_decode_image,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
PALETTE = [*RED, *GREEN, *BLUE] + [0] * (256 * 3 - 9)


def encode(image: Image.Image, image_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, image_format, **options)
    return buffer.getvalue()


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def rgb_pixels(image: Image.Image) -> np.ndarray:
    """The decoded pixels, after checking the promised output type."""
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8 and pixels.shape == (image.height, image.width, 3)
    return pixels


def stored_mode(source: Path | bytes) -> str:
    """The mode Pillow reports for the file itself, to show the test exercises that mode."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return image.mode


def png_declaring_size(width: int, height: int) -> bytes:
    """A valid PNG header for a huge 8-bit grayscale image, with almost no pixel data."""

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + chunk(b"IEND", b"")
    )


def assert_refused(path_or_bytes, *expected_fragments: str, **options) -> str:
    """Both entry points refuse the input, with a message that holds every expected fragment."""
    with pytest.raises(ImageDecodeError) as raised:
        decode_image(path_or_bytes, **options)
    message = str(raised.value)
    for fragment in expected_fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert try_decode_image(path_or_bytes, **options) == (None, message)
    return message


# ---------------------------------------------------------------- bad files


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
def test_truncated_file_is_an_error(tmp_path, image_format):
    data = encode(noise_image(64, 48), image_format)
    path = write(tmp_path, f"n01/x.{image_format.lower()}", data[: len(data) // 2])
    message = assert_refused(path, str(path), "truncated file")
    assert "PIL:" in message


def test_truncated_file_is_an_error_even_if_pillow_is_told_to_pad(tmp_path, monkeypatch):
    data = encode(noise_image(64, 48), "JPEG")
    path = write(tmp_path, "x.jpg", data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with Image.open(path) as padded:
        padded.load()  # plain Pillow pads the missing part with grey and raises nothing
    assert_refused(path, "truncated file")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "the caller's setting must be restored"


def test_zero_byte_file(tmp_path):
    path = write(tmp_path, "a.png", b"")
    assert assert_refused(path) == f"{path}: zero-byte file"


def test_empty_bytes():
    assert assert_refused(b"") == "empty input (0 bytes)"


def test_random_bytes_named_jpg(tmp_path):
    noise = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    path = write(tmp_path, "b.jpg", noise)
    assert assert_refused(path) == f"{path}: not an image (cannot identify image file)"


def test_text_file_named_png(tmp_path):
    path = write(tmp_path, "c.png", b"this is a caption, not a picture\n" * 20)
    assert assert_refused(path) == f"{path}: not an image (cannot identify image file)"


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere" / "d.jpg"
    assert assert_refused(path) == f"{path}: file not found"


def test_directory_is_not_an_image(tmp_path):
    assert_refused(tmp_path, str(tmp_path), "directory")


def test_image_over_max_pixels_is_refused(tmp_path):
    path = write(tmp_path, "e.png", encode(noise_image(100, 80), "PNG"))
    message = assert_refused(path, max_pixels=7999)
    assert message == (
        f"{path}: 100x80 = 8.0e3 pixels exceeds the limit of 8.0e3 (max_pixels); "
        "raise max_pixels if this image is genuine"
    )
    assert decode_image(path, max_pixels=8000).size == (100, 80), "the limit is inclusive"


def test_bomb_is_refused_from_its_header_without_decoding_pixels(tmp_path):
    # Decoding 100000 x 100000 pixels would need 10 GB. A refusal within a fraction of a second
    # shows that only the header was read.
    path = write(tmp_path, "bomb.png", png_declaring_size(100_000, 100_000))
    started = time.perf_counter()
    message = assert_refused(path, "100000x100000 = 1.0e10 pixels", "1.8e8 (max_pixels)")
    assert time.perf_counter() - started < 1.0, message
    assert image_size(path) == (100_000, 100_000)


def test_default_limit_is_pillows_hard_limit():
    assert DEFAULT_MAX_PIXELS == 2 * 89_478_485


def test_our_limit_replaces_pillows_and_pillows_setting_is_restored(tmp_path, monkeypatch):
    path = write(tmp_path, "f.png", encode(noise_image(50, 50), "PNG"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    assert decode_image(path).size == (50, 50)
    assert Image.MAX_IMAGE_PIXELS == 100


@pytest.mark.parametrize(
    "error, expected",
    [
        (Image.DecompressionBombError("Image size (9 pixels) exceeds limit"), "too many pixels"),
        (Image.DecompressionBombWarning("Image size (9 pixels) exceeds limit"), "too many pixels"),
        (RuntimeError("something new broke"), "RuntimeError: something new broke"),
        (MemoryError(), "MemoryError"),
    ],
)
def test_any_exception_from_pillow_becomes_an_image_decode_error(
    tmp_path, monkeypatch, error, expected
):
    path = write(tmp_path, "g.png", encode(noise_image(8, 8), "PNG"))

    def failing_open(*args, **kwargs):
        raise error

    monkeypatch.setattr(Image, "open", failing_open)
    message = assert_refused(path, str(path), expected)
    assert message.startswith(f"{path}: ")


def test_failures_restore_pillows_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 12345)
    for data in (b"", b"not an image", png_declaring_size(100_000, 100_000)):
        try_decode_image(write(tmp_path, "h.png", data))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    assert Image.MAX_IMAGE_PIXELS == 12345


def test_parallel_threads_stay_strict(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = encode(noise_image(256, 256), "JPEG")
    good = write(tmp_path, "good.jpg", data)
    truncated = write(tmp_path, "cut.jpg", data[: len(data) // 2])
    outcomes: list[tuple[Path, str | None]] = []

    def decode_many() -> None:
        for path in [good, truncated] * 10:
            outcomes.append((path, try_decode_image(path)[1]))

    threads = [threading.Thread(target=decode_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 80
    assert all((error is None) == (path == good) for path, error in outcomes)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True


def test_error_names_the_file_as_told_and_survives_pickling():
    _, message = try_decode_image(b"garbage", name="n01/x.jpg")
    assert message == "n01/x.jpg: not an image (cannot identify image file)"
    assert try_decode_image(b"garbage")[1] == "not an image (cannot identify image file)"

    error = ImageDecodeError("truncated file", name="n01/x.jpg")
    copy = pickle.loads(pickle.dumps(error))
    assert str(copy) == "n01/x.jpg: truncated file"
    assert (copy.problem, copy.name) == ("truncated file", "n01/x.jpg")


@pytest.mark.parametrize(
    "options",
    [{"max_pixels": 0}, {"max_pixels": 1.5}, {"background": (256, 0, 0)}, {"background": (1, 2)}],
)
def test_invalid_arguments_raise_value_error(options):
    data = encode(noise_image(4, 4), "PNG")
    with pytest.raises(ValueError):
        decode_image(data, **options)
    with pytest.raises(ValueError):
        try_decode_image(data, **options)


# ---------------------------------------------------------------- odd but valid files


@pytest.mark.parametrize(
    "orientation, displayed_size, marker_corner",
    [
        (3, (60, 30), "bottom-right"),  # rotated 180 degrees
        (6, (30, 60), "top-right"),  # to be turned 90 degrees clockwise for display
        (8, (30, 60), "bottom-left"),  # to be turned 90 degrees anticlockwise for display
    ],
)
def test_exif_orientation_is_applied(tmp_path, orientation, displayed_size, marker_corner):
    stored = Image.new("RGB", (60, 30), BLUE)
    stored.paste(RED, (0, 0, 12, 12))  # a marker in the stored image's top-left corner
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = write(tmp_path, "rotated.jpg", encode(stored, "JPEG", quality=95, exif=exif))

    decoded = decode_image(path)
    pixels = rgb_pixels(decoded).astype(int)
    assert decoded.size == displayed_size
    assert image_size(path) == displayed_size
    width, height = displayed_size
    corners = {
        "top-left": pixels[5, 5],
        "top-right": pixels[5, width - 6],
        "bottom-left": pixels[height - 6, 5],
        "bottom-right": pixels[height - 6, width - 6],
    }
    for corner, pixel in corners.items():
        expected = RED if corner == marker_corner else BLUE
        assert np.abs(pixel - expected).max() < 40, (corner, pixel)


def test_cmyk_jpeg(tmp_path):
    cmyk_red = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    path = write(tmp_path, "cmyk.jpg", encode(cmyk_red, "JPEG", quality=95))
    assert stored_mode(path) == "CMYK"
    pixels = rgb_pixels(decode_image(path)).astype(int)
    assert np.abs(pixels - RED).max() <= 8


def test_grayscale(tmp_path):
    gray = np.tile(np.arange(256, dtype=np.uint8), (3, 1))
    path = write(tmp_path, "gray.png", encode(Image.fromarray(gray), "PNG"))
    pixels = rgb_pixels(decode_image(path))
    assert pixels.shape == (3, 256, 3)
    for channel in range(3):
        assert np.array_equal(pixels[..., channel], gray)


def test_one_bit(tmp_path):
    checkerboard = (np.indices((8, 10)).sum(axis=0) % 2).astype(bool)
    path = write(tmp_path, "bits.png", encode(Image.fromarray(checkerboard), "PNG"))
    assert stored_mode(path) == "1"
    pixels = rgb_pixels(decode_image(path))
    assert np.array_equal(pixels[..., 0], np.where(checkerboard, 255, 0))


def make_palette_image(indices: np.ndarray) -> Image.Image:
    height, width = indices.shape
    image = Image.new("P", (width, height))
    image.putpalette(PALETTE)
    image.putdata(indices.flatten().tolist())
    return image


def test_palette(tmp_path):
    indices = np.array([[0, 1, 2], [2, 1, 0]])
    path = write(tmp_path, "palette.png", encode(make_palette_image(indices), "PNG"))
    pixels = rgb_pixels(decode_image(path))
    assert np.array_equal(pixels, np.array([RED, GREEN, BLUE], dtype=np.uint8)[indices])


@pytest.mark.parametrize("image_format", ["PNG", "GIF"])
def test_palette_with_transparency_shows_the_background(tmp_path, image_format):
    indices = np.array([[0, 1, 2], [1, 1, 0]])
    data = encode(make_palette_image(indices), image_format, transparency=1)
    background = (0, 128, 255)
    pixels = rgb_pixels(decode_image(data, background=background))
    expected = np.array([RED, background, BLUE], dtype=np.uint8)[indices]
    assert np.array_equal(pixels, expected)


def test_rgba_is_composited_over_the_background(tmp_path):
    rgba = np.array([[[10, 20, 30, 0], [*RED, 255], [*RED, 128]]], dtype=np.uint8)
    path = write(tmp_path, "alpha.png", encode(Image.fromarray(rgba), "PNG"))
    background = (20, 40, 60)
    pixels = rgb_pixels(decode_image(path, background=background)).astype(float)

    assert np.array_equal(pixels[0, 0], background), "fully transparent shows the background"
    assert np.array_equal(pixels[0, 1], RED), "opaque stays as it is"
    opacity = 128 / 255
    blend = opacity * np.array(RED) + (1 - opacity) * np.array(background)
    assert np.abs(pixels[0, 2] - blend).max() <= 1, (pixels[0, 2], blend)

    default = rgb_pixels(decode_image(path))
    assert tuple(default[0, 0]) == DEFAULT_BACKGROUND == (255, 255, 255)


def test_gray_with_alpha(tmp_path):
    gray_alpha = np.array([[[0, 0], [100, 255]]], dtype=np.uint8)
    image = Image.frombytes("LA", (2, 1), gray_alpha.tobytes())
    path = write(tmp_path, "la.png", encode(image, "PNG"))
    assert stored_mode(path) == "LA"
    pixels = rgb_pixels(decode_image(path, background=(7, 8, 9)))
    assert np.array_equal(pixels[0], [[7, 8, 9], [100, 100, 100]])


SIXTEEN_BIT_VALUES = np.array([[0, 255, 256, 32768, 4660, 65535]], dtype=np.uint16)
SIXTEEN_BIT_AS_EIGHT = np.array([[0, 0, 1, 128, 18, 255]], dtype=np.uint8)


def test_sixteen_bit_grayscale_png_keeps_the_high_byte(tmp_path):
    path = write(tmp_path, "deep.png", encode(Image.fromarray(SIXTEEN_BIT_VALUES), "PNG"))
    assert stored_mode(path) == "I;16"
    pixels = rgb_pixels(decode_image(path))
    assert np.array_equal(pixels[..., 1], SIXTEEN_BIT_AS_EIGHT)


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_other_sixteen_bit_integer_modes(tmp_path, mode):
    image = Image.fromarray(SIXTEEN_BIT_VALUES.astype(np.int32)).convert(mode)
    data = encode(image, "TIFF")
    assert stored_mode(data) == mode
    assert np.array_equal(rgb_pixels(decode_image(data))[..., 0], SIXTEEN_BIT_AS_EIGHT)


def test_float_images_are_read_as_zero_to_one(tmp_path):
    values = np.array([[0.0, 0.5, 1.0, 2.0, -1.0]], dtype=np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert stored_mode(data) == "F"
    assert np.array_equal(rgb_pixels(decode_image(data))[0, :, 2], [0, 128, 255, 255, 0])


@pytest.mark.parametrize("size", [(1, 1), (10_000, 20), (20, 10_000)])
def test_extreme_but_valid_sizes(tmp_path, size):
    path = write(tmp_path, "thin.png", encode(Image.new("RGB", size, GREEN), "PNG"))
    decoded = decode_image(path)
    assert decoded.size == size == image_size(path)
    pixels = rgb_pixels(decoded)
    assert tuple(pixels[0, 0]) == tuple(pixels[-1, -1]) == GREEN


def test_multi_frame_gif_gives_the_first_frame(tmp_path):
    frames = [make_palette_image(np.full((6, 9), index)) for index in range(3)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    path = write(tmp_path, "anim.gif", data)
    with Image.open(path) as animation:
        assert animation.n_frames == 3
    pixels = rgb_pixels(decode_image(path))
    assert pixels.shape == (6, 9, 3)
    assert (pixels == RED).all()


def test_bytes_decode_like_the_file(tmp_path):
    data = encode(noise_image(33, 17), "PNG")
    path = write(tmp_path, "same.png", data)
    from_bytes, from_file = decode_image(data), decode_image(path)
    assert np.array_equal(rgb_pixels(from_bytes), rgb_pixels(from_file))
    assert np.array_equal(rgb_pixels(from_file), np.asarray(noise_image(33, 17)))
    assert image_size(data) == (33, 17)


def test_result_is_fully_loaded_and_independent_of_the_file(tmp_path):
    path = write(tmp_path, "gone.jpg", encode(noise_image(40, 30), "JPEG"))
    image, error = try_decode_image(path)
    assert error is None
    path.unlink()
    assert rgb_pixels(image).shape == (30, 40, 3)


def test_image_size_reports_failures(tmp_path):
    with pytest.raises(ImageDecodeError, match="zero-byte file"):
        image_size(write(tmp_path, "z.png", b""))
    with pytest.raises(ImageDecodeError, match="not an image"):
        image_size(b"plain text")
