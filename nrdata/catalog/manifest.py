"""The catalog manifest: what the latents are and how they were made.

`manifest.json` is plain JSON so that a person, jq or any language can read it. Its `fingerprint`
hashes the fields that decide what latent an image turns into (encoder, stored quantity, dtype,
policies, flip mode); two catalogs with one fingerprint hold interchangeable latents. Counts,
normalisation statistics, paths and the code version are recorded but left out of the hash: they
change as a run goes on or the folder moves, the latents do not.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nrdata.catalog.atomic import atomic_write_bytes
from nrdata.version import code_version

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

STORED_QUANTITIES = ("mode", "moments", "sample")
FLIP_MODES = ("none", "store")
# numpy has no bfloat16: such latents are stored as raw 2-byte words and read back as torch.bfloat16.
LATENT_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}
NORM_CONVENTION = "z_norm = (z - mean) / std"


class ManifestError(ValueError):
    """The manifest is missing, unreadable, or does not match what the caller asked for."""


@dataclass(frozen=True)
class EncoderInfo:
    """Which encoder produced the latents and what one latent looks like."""

    name: str  # registry name: "dc-ae-f32c32", "sd-vae-ft-ema", "va-vae-f16d32", "pixel"
    source: str  # hub id or local folder the weights came from ("" for weight-free encoders)
    revision: str | None  # hub revision or a hash of the local weights
    factor: int  # spatial downsample factor
    channels: int  # latent channels of one latent (moments store 2 * channels: mean then logvar)
    quantity: str  # "mode" | "moments" | "sample"
    scaling_factor: float | None = None  # the encoder's own config value, kept for exports

    def __post_init__(self) -> None:
        if self.quantity not in STORED_QUANTITIES:
            raise ManifestError(f"stored quantity {self.quantity!r} is not one of {STORED_QUANTITIES}")
        if self.factor < 1 or self.channels < 1:
            raise ManifestError(f"encoder factor and channels must be >= 1, got {self.factor}, {self.channels}")

    @property
    def stored_channels(self) -> int:
        return 2 * self.channels if self.quantity == "moments" else self.channels


@dataclass(frozen=True)
class Normalization:
    """Per-channel statistics of the stored latents, computed over the encode run.

    Train and sample normalise with `(z - mean) / std` using these numbers and never a constant
    in code. Empty lists mean the statistics were not computed yet.
    """

    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    count: int = 0  # latent pixels the statistics were taken over
    convention: str = NORM_CONVENTION

    @property
    def ready(self) -> bool:
        return bool(self.mean) and len(self.mean) == len(self.std)


@dataclass(frozen=True)
class Manifest:
    encoder: EncoderInfo
    dtype: str
    policies: tuple[dict[str, Any], ...]  # ResolutionPolicy.to_dict() of every variant
    flip: str
    source_root: str = ""
    normalization: Normalization = field(default_factory=Normalization)
    code_version: str = field(default_factory=code_version)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    notes: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.dtype not in LATENT_DTYPES:
            raise ManifestError(f"latent dtype {self.dtype!r} is not one of {sorted(LATENT_DTYPES)}")
        if self.flip not in FLIP_MODES:
            raise ManifestError(f"flip mode {self.flip!r} is not one of {FLIP_MODES}")
        variants = [p.get("variant") for p in self.policies]
        if len(set(variants)) != len(variants):
            raise ManifestError(f"two policies share a variant name: {variants}")

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(p["variant"] for p in self.policies)

    @property
    def itemsize(self) -> int:
        return LATENT_DTYPES[self.dtype]

    def identity(self) -> dict[str, Any]:
        """The fields the fingerprint covers."""
        return {
            "schema_version": self.schema_version,
            "encoder": dataclasses.asdict(self.encoder),
            "dtype": self.dtype,
            "policies": [dict(sorted(p.items())) for p in self.policies],
            "flip": self.flip,
            "normalization_convention": self.normalization.convention,
        }

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["policies"] = [dict(p) for p in self.policies]
        out["normalization"]["mean"] = list(self.normalization.mean)
        out["normalization"]["std"] = list(self.normalization.std)
        out["fingerprint"] = self.fingerprint
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(
                f"catalog schema version {version} is not supported by this nr (expects {SCHEMA_VERSION}); "
                "upgrade nr or re-encode"
            )
        recorded = data.pop("fingerprint", None)
        try:
            norm = data.pop("normalization", {}) or {}
            manifest = cls(
                encoder=EncoderInfo(**data.pop("encoder")),
                policies=tuple(data.pop("policies")),
                normalization=Normalization(
                    mean=tuple(norm.get("mean", ())), std=tuple(norm.get("std", ())),
                    count=norm.get("count", 0), convention=norm.get("convention", NORM_CONVENTION),
                ),
                **data,
            )
        except (KeyError, TypeError) as exc:
            raise ManifestError(f"manifest is missing or has unexpected fields: {exc}") from exc
        if recorded is not None and recorded != manifest.fingerprint:
            raise ManifestError(
                f"manifest fingerprint {recorded} does not match its contents ({manifest.fingerprint}): "
                "the file was edited by hand"
            )
        return manifest

    def with_normalization(self, normalization: Normalization) -> Manifest:
        return dataclasses.replace(self, normalization=normalization)

    def compatible_with(self, other: Manifest) -> bool:
        return self.fingerprint == other.fingerprint


def write_manifest(root: Path, manifest: Manifest) -> None:
    text = json.dumps(manifest.to_dict(), indent=2, sort_keys=False) + "\n"
    atomic_write_bytes(Path(root) / MANIFEST_NAME, text.encode())


def read_manifest(root: Path) -> Manifest:
    path = Path(root) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest; is {root} an nr catalog?") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ManifestError(f"{path}: unreadable manifest ({exc})") from exc
    return Manifest.from_dict(data)
