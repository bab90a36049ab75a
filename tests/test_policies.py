"""Tests for nrdata.policies: NiT, FiT and ADM sizes, hand-computed or checked against independent
re-implementations of the published rules."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from nrdata.policies import (
    NATIVE_MAX_AREA,
    ResolutionPolicy,
    center_crop_arr,
    fit_size,
    legal_size,
    native_size,
    parse_policy,
    resize_to,
)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


# ---------------------------------------------------------------- native (NiT)


def test_native_matches_nits_readme_example():
    assert native_size(580, 403) == (576, 384)
    width, height = native_size(580, 403)
    assert (width // 32, height // 32) == (18, 12)


def test_native_gives_at_least_one_unit():
    assert native_size(10, 5) == (32, 32)
    assert native_size(1, 1, unit=16) == (16, 16)


def test_native_caps_the_area_and_keeps_the_aspect():
    # Area 12e6 >= 2048²: scale to area 2048² first.
    # new_w = sqrt(4000/3000) * 2048 = 2364.83 -> 73 units = 2336
    # new_h = 2364.83 * 3000/4000 = 1773.62 -> 55 units = 1760
    width, height = native_size(4000, 3000, unit=32, max_area=2048**2)
    assert (width, height) == (2336, 1760)
    assert width * height <= 2048**2
    assert width % 32 == 0 and height % 32 == 0


def test_native_area_exactly_at_the_cap_takes_the_scaling_branch():
    assert native_size(2048, 2048) == (2048, 2048)
    assert native_size(8192, 2048) == (4096, 1024)
    # In the scaling branch, sqrt(32/96) * sqrt(3072) comes out as 31.999999999999996. So NiT's
    # float arithmetic loses a unit on the long side (95.99... -> 64) that the floor branch keeps.
    assert native_size(32, 96, max_area=3072) == (32, 64)
    assert native_size(32, 96, max_area=3073) == (32, 96)


def test_native_extreme_aspect_never_gives_a_zero_side():
    # NiT's own rule floors the short side to 0 here: 10_000_000 x 1 is above the area cap and
    # sqrt(1e7) * 2048 * 1 / 1e7 = 0.65 px.
    width, height = native_size(10_000_000, 1)
    assert height == 32
    assert width == int(math.sqrt(10_000_000) * 2048 / 32) * 32
    assert native_size(1, 10_000_000)[0] == 32
    assert native_size(100_000, 3) == (100_000, 32)


def nit_native_resize(width: int, height: int) -> tuple[int, int]:
    """NiT's native_resolution_resize, as reported in reference/nit.md §1.4."""
    if width * height < 2048**2:
        return max(1, int(width / 32)) * 32, max(1, int(height / 32)) * 32
    new_w = math.sqrt(width / height) * 2048
    new_h = new_w * height / width
    return int(new_w / 32) * 32, int(new_h / 32) * 32


def test_native_agrees_with_nit_on_ordinary_sizes():
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6000, size=(2000, 2))
    for width, height in sizes.tolist():
        assert native_size(width, height) == nit_native_resize(width, height), (width, height)


@pytest.mark.parametrize(
    "arguments",
    [(0, 10), (10, -1), (10.5, 10), (True, 10), ("640", 480)],
)
def test_native_rejects_bad_sizes(arguments):
    with pytest.raises(ValueError, match="positive int"):
        native_size(*arguments)


# ---------------------------------------------------------------- fit (FiT)


def test_fit_scales_down_to_the_target_area():
    # 512 x 384 = 196608 >= 256²:
    # new_w = sqrt(512/384) * 256 = 295.60 -> 18 units = 288
    # new_h = 295.60 * 384/512 = 221.70 -> 13 units = 208
    assert fit_size(512, 384, target=256, unit=16) == (288, 208)
    assert fit_size(256, 256) == (256, 256)
    # 1024 x 1024 with target 512: exactly 512².
    assert fit_size(1024, 1024, target=512) == (512, 512)


def test_fit_area_exactly_at_the_target_takes_the_scaling_branch():
    # 961 x 144 = 372². FiT's float arithmetic gives 960.99... x 143.99..., which floors to
    # 960 x 128. Keeping the size would give 960 x 144.
    assert fit_size(961, 144, target=372) == (960, 128)


def test_fit_keeps_small_images_and_floors_to_the_unit():
    assert fit_size(200, 100) == (192, 96)
    assert fit_size(255, 255) == (240, 240)


def test_fit_scales_a_side_below_one_unit_up_to_one_unit():
    # Width 10 < 16: width -> 16, height 40 * 16/10 = 64.
    assert fit_size(10, 40) == (16, 64)
    # Width 8 < 16: height 100 * 2 = 200 -> 12 units = 192.
    assert fit_size(8, 100) == (16, 192)
    # Height 4 < 16: width 100 * 4 = 400.
    assert fit_size(100, 4) == (400, 16)
    # Both below one unit: width -> 16, height 3 * 16/5 = 9.6 -> at least one unit.
    assert fit_size(5, 3) == (16, 16)


def test_fit_rejects_bad_input():
    with pytest.raises(ValueError, match="target"):
        fit_size(100, 100, target=0)


# ---------------------------------------------------------------- legal sizes


@pytest.mark.parametrize(
    "requested, factor, patch, expected",
    [
        ((256, 256), 32, 1, (256, 256)),
        ((250, 270), 32, 1, (256, 256)),  # 7.8 and 8.4 units round to 8
        ((272, 304), 32, 1, (288, 320)),  # exactly 8.5 and 9.5 units: ties go up
        ((24, 40), 8, 2, (32, 48)),  # unit 16: 1.5 and 2.5 units go up
        ((1, 1), 32, 1, (32, 32)),  # tiny: one unit
        ((15, 17), 32, 1, (32, 32)),  # below half a unit is still one unit
        ((4, 5), 3, 1, (3, 6)),  # odd unit: no ties, just nearest
        ((1000, 700), 8, 2, (1008, 704)),
    ],
)
def test_legal_size(requested, factor, patch, expected):
    assert legal_size(*requested, factor=factor, patch=patch) == expected


@pytest.mark.parametrize(
    "arguments",
    [
        dict(width=0, height=10, factor=8),
        dict(width=10, height=-3, factor=8),
        dict(width=10.0, height=10, factor=8),
        dict(width=10, height=10, factor=0),
        dict(width=10, height=10, factor=8, patch=-2),
        dict(width=10, height=10, factor="8"),
    ],
)
def test_legal_size_rejects_bad_input(arguments):
    with pytest.raises(ValueError, match="must be a positive int"):
        legal_size(**arguments)


# ---------------------------------------------------------------- center crop (ADM)


def adm_reference(image: Image.Image, size: int) -> np.ndarray:
    """ADM's center_crop_arr, written out step by step from its description."""
    while True:
        width, height = image.size
        if min(width, height) < 2 * size:
            break
        image = image.resize((width // 2, height // 2), resample=Image.BOX)
    width, height = image.size
    scale = size / min(width, height)
    image = image.resize((round(width * scale), round(height * scale)), resample=Image.BICUBIC)
    array = np.asarray(image)
    rows, cols = array.shape[0], array.shape[1]
    first_row = (rows - size) // 2
    first_col = (cols - size) // 2
    return array[first_row : first_row + size, first_col : first_col + size]


@pytest.mark.parametrize(
    "width, height, size",
    [
        (601, 403, 256),
        (403, 601, 256),
        (1031, 517, 256),  # one BOX halving; an odd number of spare columns
        (517, 1031, 256),  # an odd number of spare rows
        (700, 512, 256),  # short side exactly 2 x 256: halved
        (1200, 1100, 256),  # two BOX halvings: 600 x 550, then 300 x 275
        (300, 257, 128),
        (256, 256, 256),
        (100, 60, 256),  # smaller than the crop: scaled up
    ],
)
def test_center_crop_is_pixel_exact_against_adm(width, height, size):
    image = noise_image(width, height, seed=width + height)
    cropped = center_crop_arr(image, size)
    assert cropped.shape == (size, size, 3)
    assert cropped.dtype == np.uint8
    assert np.array_equal(cropped, adm_reference(image, size))


def test_center_crop_halving_changes_the_result():
    # Skipping the BOX halvings would still give 256 x 256, but different pixels.
    image = noise_image(1200, 1100, seed=3)
    without_halving = image.resize((279, 256), resample=Image.BICUBIC)
    direct = np.asarray(without_halving)[:, 11:267]
    assert not np.array_equal(center_crop_arr(image, 256), direct)


def test_center_crop_needs_rgb():
    with pytest.raises(ValueError, match="RGB"):
        center_crop_arr(Image.new("L", (300, 300)), 256)


def test_resize_to_uses_bicubic():
    image = noise_image(50, 40)
    resized = resize_to(image, (37, 23))
    assert resized.size == (37, 23)
    expected = image.resize((37, 23), Image.BICUBIC)
    assert np.array_equal(np.asarray(resized), np.asarray(expected))


# ---------------------------------------------------------------- ResolutionPolicy and specs


@pytest.mark.parametrize(
    "spec, unit, expected, variant",
    [
        ("native", 32, ResolutionPolicy("native", 32, max_area=NATIVE_MAX_AREA), "native"),
        ("native:max_area=1048576", 32, ResolutionPolicy("native", 32, max_area=1024**2), "native"),
        ("256", 32, ResolutionPolicy("center-crop", 32, target=256), "256"),
        ("512", 16, ResolutionPolicy("center-crop", 16, target=512), "512"),
        ("center-crop:256", 32, ResolutionPolicy("center-crop", 32, target=256), "256"),
        ("fit:256", 16, ResolutionPolicy("fit", 16, target=256), "fit-256"),
        ("fit:512", 16, ResolutionPolicy("fit", 16, target=512), "fit-512"),
    ],
)
def test_parse_policy_and_variant(spec, unit, expected, variant):
    policy = parse_policy(spec, unit=unit)
    assert policy == expected
    assert policy.variant == variant


@pytest.mark.parametrize(
    "spec",
    ["", "native:256", "native:max_area=", "native:area=4", "fit", "fit:", "crop:256",
     "center-crop:abc", "256:fit", "²", "fit:²", "fit:-16", "1e3"],
)
def test_parse_policy_rejects_unknown_specs(spec):
    with pytest.raises(ValueError, match="accepted forms") as raised:
        parse_policy(spec, unit=16)
    assert "fit:<size>" in str(raised.value)


def test_parse_policy_checks_the_parameters():
    with pytest.raises(ValueError, match="multiple of unit 32"):
        parse_policy("300", unit=32)


@pytest.mark.parametrize(
    "policy",
    [
        ResolutionPolicy("native", 32, max_area=2048**2),
        ResolutionPolicy("fit", 16, target=256),
        ResolutionPolicy("center-crop", 8, target=512),
    ],
)
def test_policy_round_trips_through_json(policy):
    as_json = json.dumps(policy.to_dict())
    assert ResolutionPolicy.from_dict(json.loads(as_json)) == policy


def test_to_dict_holds_only_the_parameters_the_kind_uses():
    fit = ResolutionPolicy("fit", 16, target=256)
    assert fit.to_dict() == {"kind": "fit", "unit": 16, "target": 256}
    assert ResolutionPolicy("native", 32, max_area=64**2).to_dict() == {
        "kind": "native",
        "unit": 32,
        "max_area": 4096,
    }


@pytest.mark.parametrize(
    "data", [{"kind": "fit", "unit": 16, "target": 256, "size": 3}, {"kind": "fit", "target": 256}]
)
def test_from_dict_rejects_unknown_or_missing_keys(data):
    with pytest.raises(ValueError, match="resolution policy"):
        ResolutionPolicy.from_dict(data)


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(kind="crop", unit=16, target=256), "kind must be one of"),
        (dict(kind="native", unit=0, max_area=4096), "unit must be a positive int"),
        (dict(kind="native", unit=32), "needs max_area"),
        (dict(kind="native", unit=32, max_area=4096, target=256), "not target"),
        (dict(kind="native", unit=32, max_area=1000), "below one unit"),
        (dict(kind="center-crop", unit=32, target=250), "multiple of unit"),
        (dict(kind="center-crop", unit=32), "needs target"),
        (dict(kind="fit", unit=16, target=256, max_area=4096), "not max_area"),
        (dict(kind="fit", unit=16, target=8), "smaller than one unit"),
    ],
)
def test_policy_validation(arguments, message):
    with pytest.raises(ValueError, match=message):
        ResolutionPolicy(**arguments)


def test_output_size_per_kind():
    assert ResolutionPolicy("native", 32, max_area=2048**2).output_size(580, 403) == (576, 384)
    assert ResolutionPolicy("fit", 16, target=256).output_size(512, 384) == (288, 208)
    assert ResolutionPolicy("center-crop", 32, target=512).output_size(580, 403) == (512, 512)


def test_apply_output_shapes_and_pixels():
    image = noise_image(300, 200)

    native = ResolutionPolicy("native", 32, max_area=2048**2).apply(image)
    assert native.shape == (192, 288, 3) and native.dtype == np.uint8
    assert np.array_equal(native, np.asarray(image.resize((288, 192), Image.BICUBIC)))

    # 300 x 200 >= 128²: new_w = sqrt(1.5) * 128 = 156.77 -> 144; new_h = 104.51 -> 96.
    fit = ResolutionPolicy("fit", 16, target=128).apply(image)
    assert fit.shape == (96, 144, 3) and fit.dtype == np.uint8

    crop = ResolutionPolicy("center-crop", 32, target=128).apply(image)
    assert crop.shape == (128, 128, 3)
    assert np.array_equal(crop, adm_reference(image, 128))


def test_apply_needs_rgb():
    with pytest.raises(ValueError, match="RGB"):
        ResolutionPolicy("native", 32, max_area=2048**2).apply(Image.new("RGBA", (64, 64)))
