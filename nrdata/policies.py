"""Resolution policies: pure functions from an image size to the size that gets encoded.

encode, pack and sample share these functions, so a size computed in one stage is the size every
other stage computes. Convention: every function takes and returns sizes as (width, height), in
the same order as PIL's `Image.size`. Numpy arrays are the one exception: they are indexed
(height, width, channel).

- native (NiT): keep the aspect ratio, cap the area, floor each side to a multiple of the unit.
- fit (FiT): cap the area at target² and floor each side to a multiple of the unit. A side shorter
  than one unit is scaled up to one unit.
- center-crop (ADM `center_crop_arr`): a target x target centre crop, bit-compatible with ADM.

A "unit" is the number of pixels per token side: the encoder's downsample factor times the model's
patch size.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

NATIVE_MAX_AREA = 2048**2
KINDS = ("native", "fit", "center-crop")
_POLICY_SPECS = (
    '"native", "native:max_area=<pixels>", "<size>" (e.g. "256", "512"), '
    '"center-crop:<size>", "fit:<size>"'
)


def native_size(
    width: int, height: int, *, unit: int = 32, max_area: int = NATIVE_MAX_AREA
) -> tuple[int, int]:
    """NiT's native-resolution size: each side floored to a multiple of `unit`, area capped.

    If the area is at least `max_area`, the image is first scaled to area `max_area` with its aspect
    ratio kept. NiT can return a side of 0 for aspect ratios above max_area/unit² : 1. Here every
    side is at least one unit. That minimum means a very thin image can come out larger than
    max_area: 10_000_000 x 1 becomes 6_476_320 x 32 at the defaults. Refuse such aspect ratios
    before this call if that matters.
    """
    _require_positive_ints(width=width, height=height, unit=unit, max_area=max_area)
    if width * height < max_area:
        return _floor_to_unit(width, unit), _floor_to_unit(height, unit)
    # Same arithmetic, in the same order, as NiT, so that float rounding matches theirs too.
    new_width = math.sqrt(width / height) * math.sqrt(max_area)
    new_height = new_width * height / width
    return _floor_to_unit(new_width, unit), _floor_to_unit(new_height, unit)


def fit_size(width: int, height: int, *, target: int = 256, unit: int = 16) -> tuple[int, int]:
    """FiT's size: area capped at target², a side shorter than `unit` scaled up to `unit`.

    The aspect ratio is kept, and then both sides are floored to multiples of `unit`, each at least
    one unit.
    """
    _require_positive_ints(width=width, height=height, target=target, unit=unit)
    new_width: float = width
    new_height: float = height
    if width * height >= target**2:
        new_width = math.sqrt(width / height) * target
        new_height = new_width * height / width
    elif width < unit:
        new_width, new_height = unit, unit * height / width
    elif height < unit:
        new_width, new_height = unit * width / height, unit
    return _floor_to_unit(new_width, unit), _floor_to_unit(new_height, unit)


def legal_size(width: int, height: int, *, factor: int, patch: int = 1) -> tuple[int, int]:
    """The size nearest to (width, height) that an encoder with this downsample `factor` and a model
    with this `patch` size can take.

    Each side is rounded to the nearest multiple of factor * patch (ties go up), with a minimum of
    one multiple.
    """
    _require_positive_ints(width=width, height=height, factor=factor, patch=patch)
    unit = factor * patch
    return _round_to_unit(width, unit), _round_to_unit(height, unit)


def resize_to(image: Image.Image, size_wh: tuple[int, int]) -> Image.Image:
    """Resize to exactly `size_wh` (width, height). This is the one place where the native and fit
    policies choose their resampling filter: BICUBIC, as NiT and FiT use."""
    return image.resize(size_wh, resample=Image.Resampling.BICUBIC)


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """A size x size centre crop as an (H, W, 3) uint8 array, bit-compatible with ADM's
    center_crop_arr.

    While the short side is at least 2 * size, the image is halved with BOX. BOX halving is cheap
    and anti-aliased. Then one BICUBIC resize makes the short side `size`, rounding each side with
    Python's round(), as ADM does. Last, the centre is cropped.
    """
    _require_rgb(image)
    _require_positive_ints(size=size)
    while min(image.size) >= 2 * size:
        image = image.resize(
            (image.width // 2, image.height // 2), resample=Image.Resampling.BOX
        )
    scale = size / min(image.size)
    image = image.resize(
        (round(image.width * scale), round(image.height * scale)),
        resample=Image.Resampling.BICUBIC,
    )
    pixels = np.array(image)
    top = (pixels.shape[0] - size) // 2
    left = (pixels.shape[1] - size) // 2
    # A copy, because a view would keep the whole resized image alive.
    return np.ascontiguousarray(pixels[top : top + size, left : left + size])


@dataclass(frozen=True)
class ResolutionPolicy:
    """How source images become encoder inputs. It is recorded in a catalog's manifest.

    kind: "native" (needs max_area), "fit" (needs target) or "center-crop" (needs target, a
    multiple of unit). unit: pixels per token side (encoder factor x patch size).
    """

    kind: str
    unit: int
    max_area: int | None = None
    target: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"policy kind must be one of {KINDS}, got {self.kind!r}")
        _require_positive_ints(unit=self.unit)
        if self.kind == "native":
            if self.target is not None:
                raise ValueError("a native policy takes max_area, not target")
            if self.max_area is None:
                raise ValueError("a native policy needs max_area (NiT uses 2048**2)")
            _require_positive_ints(max_area=self.max_area)
            if self.max_area < self.unit**2:
                raise ValueError(
                    f"max_area={self.max_area} is below one unit² ({self.unit}² = {self.unit**2})"
                )
            return
        if self.max_area is not None:
            raise ValueError(f"a {self.kind} policy takes target, not max_area")
        if self.target is None:
            raise ValueError(f"a {self.kind} policy needs target (e.g. 256)")
        _require_positive_ints(target=self.target)
        if self.kind == "center-crop" and self.target % self.unit:
            raise ValueError(
                f"center-crop target {self.target} must be a multiple of unit {self.unit}, "
                "or the latent would not have a whole number of tokens"
            )
        if self.kind == "fit" and self.target < self.unit:
            raise ValueError(f"fit target {self.target} is smaller than one unit ({self.unit})")

    @property
    def variant(self) -> str:
        """The variant name used in catalogs: "native", "256", "512", "fit-256", ..."""
        if self.kind == "native":
            return "native"
        if self.kind == "fit":
            return f"fit-{self.target}"
        return str(self.target)

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) that an image of this size has after `apply`."""
        if self.kind == "native":
            return native_size(width, height, unit=self.unit, max_area=self.max_area)
        if self.kind == "fit":
            return fit_size(width, height, target=self.target, unit=self.unit)
        return self.target, self.target

    def apply(self, image: Image.Image) -> np.ndarray:
        """Resize or crop an RGB image into an (H, W, 3) uint8 array."""
        _require_rgb(image)
        if self.kind == "center-crop":
            return center_crop_arr(image, self.target)
        return np.array(resize_to(image, self.output_size(*image.size)))

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict. Parameters the kind does not use are left out."""
        params = {"max_area": self.max_area, "target": self.target}
        return {
            "kind": self.kind,
            "unit": self.unit,
            **{key: value for key, value in params.items() if value is not None},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResolutionPolicy:
        """Inverse of `to_dict`."""
        known = {"kind", "unit", "max_area", "target"}
        unknown = set(data) - known
        missing = {"kind", "unit"} - set(data)
        if unknown or missing:
            raise ValueError(
                f"bad resolution policy {data!r}: needs kind and unit, may have max_area and "
                f"target; unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
            )
        return cls(**data)


def parse_policy(spec: str, *, unit: int) -> ResolutionPolicy:
    """Parse a command-line policy spec, e.g. "native", "native:max_area=4194304", "256",
    "center-crop:512", "fit:256"."""
    kind, _, argument = spec.strip().partition(":")
    if kind == "native" and not argument:
        return ResolutionPolicy("native", unit, max_area=NATIVE_MAX_AREA)
    key, _, value = argument.partition("=")
    if kind == "native" and key == "max_area" and _is_number(value):
        return ResolutionPolicy("native", unit, max_area=int(value))
    if _is_number(kind) and not argument:
        return ResolutionPolicy("center-crop", unit, target=int(kind))
    if kind in ("center-crop", "fit") and _is_number(argument):
        return ResolutionPolicy(kind, unit, target=int(argument))
    raise ValueError(f"unknown resolution policy {spec!r}; accepted forms: {_POLICY_SPECS}")


def _is_number(text: str) -> bool:
    # str.isdigit also accepts characters such as "²" that int() rejects.
    return re.fullmatch(r"[0-9]+", text) is not None


def _floor_to_unit(length: float, unit: int) -> int:
    return max(1, int(length / unit)) * unit


def _round_to_unit(length: int, unit: int) -> int:
    # Adding half a unit before the floor division sends exact ties upwards.
    return max(1, (length + unit // 2) // unit) * unit


def _require_positive_ints(**values: object) -> None:
    for name, value in values.items():
        # bool is an int subclass, but True is never a meaningful size.
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _require_rgb(image: Image.Image) -> None:
    if image.mode != "RGB":
        raise ValueError(
            f"expected an RGB image, got mode {image.mode!r}; "
            "decode it with nrdata.images.decode_image"
        )
