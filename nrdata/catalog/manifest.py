"""The catalog manifest: what the latents are and how they were made.

`manifest.json` is plain JSON so that a person, jq or any language can read it. Its `fingerprint`
hashes the fields that decide what latent an image turns into: the encoder (its geometry, stored
quantity and the content hash of its weights), the dtype, the policies of its variants, the
flip mode and, when REPA images are stored, their pixels per latent cell; two catalogs with one
fingerprint hold interchangeable latents. Counts, normalisation
statistics, paths, where the weights were read from and the code version are recorded but left
out of the hash: they change as a run goes on, the folder moves or the weights are copied, the
latents do not.

A catalog grows: `Manifest.extended_with` accepts a later run that adds variants (or only rows)
and refuses, naming the field, one whose latents would come out differently.

Schema 1 (before catalogs could grow) hashed the encoder's source and revision instead of its
weights. Such manifests are still read, and keep their fingerprint, until a writer appends to
them and records them as schema 2.
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

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"

STORED_QUANTITIES = ("mode", "moments", "sample")
FLIP_MODES = ("none", "store")
# numpy has no bfloat16: such latents are stored as raw 2-byte words and read back as torch.bfloat16.
LATENT_DTYPES = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}
NORM_CONVENTION = "z_norm = (z - mean) / std"


class ManifestError(ValueError):
    """The manifest is missing, unreadable, or does not match what the caller asked for."""


def _policy_identity(policy: dict[str, Any]) -> dict[str, Any]:
    # a parameter a policy kind does not use may be written as null or left out: the same policy
    return {k: v for k, v in sorted(policy.items()) if v is not None}


@dataclass(frozen=True)
class EncoderInfo:
    """Which encoder produced the latents and what one latent looks like."""

    name: str  # registry name: "dc-ae-f32c32", "sd-vae-ft-ema", "va-vae-f16d32", "pixel"
    source: str  # hub id or local folder the weights were first read from ("" for weight-free encoders)
    revision: str | None  # hub revision or a hash of the local weight files (provenance, not identity)
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
    # content hash of the encoder's weights and architecture config ("sha256:..."), where it came
    # from does not matter; "" for weight-free encoders and for schema 1, which did not record it
    encoder_weights: str = ""
    schema_version: int = SCHEMA_VERSION
    # pixels per latent cell of the REPA encoder's input view stored beside each latent (uint8, see
    # nrdata.catalog.layout); 0: none stored, training with REPA needs them
    repa_pixels: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in LATENT_DTYPES:
            raise ManifestError(f"latent dtype {self.dtype!r} is not one of {sorted(LATENT_DTYPES)}")
        if self.flip not in FLIP_MODES:
            raise ManifestError(f"flip mode {self.flip!r} is not one of {FLIP_MODES}")
        variants = [p.get("variant") for p in self.policies]
        if len(set(variants)) != len(variants):
            raise ManifestError(f"two policies share a variant name: {variants}")
        if isinstance(self.repa_pixels, bool) or not isinstance(self.repa_pixels, int) or self.repa_pixels < 0:
            raise ManifestError(f"repa_pixels must be an int >= 0, got {self.repa_pixels!r}")

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(p["variant"] for p in self.policies)

    @property
    def itemsize(self) -> int:
        return LATENT_DTYPES[self.dtype]

    def identity(self) -> dict[str, Any]:
        """The fields the fingerprint covers."""
        if self.schema_version == 1:  # as schema 1 hashed it, so that its recorded fingerprints still hold
            return {
                "schema_version": 1,
                "encoder": dataclasses.asdict(self.encoder),
                "dtype": self.dtype,
                "policies": [dict(sorted(p.items())) for p in self.policies],
                "flip": self.flip,
                "normalization_convention": self.normalization.convention,
            }
        encoder = dataclasses.asdict(self.encoder)
        del encoder["source"], encoder["revision"]  # where the weights were read from is not what they are
        identity = {
            "schema_version": self.schema_version,
            "encoder": encoder,
            "encoder_weights": self.encoder_weights,
            "dtype": self.dtype,
            "policies": [_policy_identity(p) for p in self.policies],
            "flip": self.flip,
            "normalization_convention": self.normalization.convention,
        }
        if self.repa_pixels:  # only when stored, so that catalogs without them keep their fingerprint
            identity["repa_pixels"] = self.repa_pixels
        return identity

    @property
    def fingerprint(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["policies"] = [dict(p) for p in self.policies]
        out["normalization"]["mean"] = list(self.normalization.mean)
        out["normalization"]["std"] = list(self.normalization.std)
        if self.schema_version == 1:  # written back as it was read
            del out["encoder_weights"]
        if not self.repa_pixels:
            del out["repa_pixels"]
        out["fingerprint"] = self.fingerprint
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        version = data.get("schema_version")
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ManifestError(
                f"catalog schema version {version} is not supported by this nr (reads "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}); upgrade nr or re-encode"
            )
        if version == 1 and "encoder_weights" in data:
            raise ManifestError("manifest of schema 1 has a field of schema 2 (encoder_weights): the file was "
                                "edited by hand")
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

    def extended_with(self, run: Manifest) -> Manifest:
        """This catalog's manifest grown by what `run` (a later encode into it) adds.

        New variants are appended and a weights hash this manifest lacks is recorded; everything
        that would make the same image come out as another latent (encoder, its weights, dtype,
        flip mode, the parameters of a variant both have) must match, else ManifestError naming
        the first field that differs, both values, and what to do.
        """
        mine, theirs = self.encoder, run.encoder
        for label, old, new in (("encoder", mine.name, theirs.name), ("encoder factor", mine.factor, theirs.factor),
                                ("encoder channels", mine.channels, theirs.channels),
                                ("stored quantity", mine.quantity, theirs.quantity),
                                ("encoder scaling factor", mine.scaling_factor, theirs.scaling_factor)):
            if old != new:
                raise ManifestError(f"{label} differs: the catalog has {old!r}, this run {new!r}; "
                                    "encode into a new output folder")
        self._check_same_weights(run)
        for label, old, new, fix in (("latent dtype", self.dtype, run.dtype, f"pass --dtype {self.dtype}"),
                                     ("flip mode", self.flip, run.flip,
                                      "pass --flip" if self.flip == "store" else "pass --no-flip"),
                                     ("REPA pixels per latent cell", self.repa_pixels, run.repa_pixels,
                                      f"pass --repa-pixels {self.repa_pixels}" if self.repa_pixels
                                      else "leave out --repa-pixels"),
                                     ("normalisation convention", self.normalization.convention,
                                      run.normalization.convention, "use the nr that made the catalog")):
            if old != new:
                raise ManifestError(f"{label} differs: the catalog has {old!r}, this run {new!r}; {fix}, "
                                    "or encode into a new output folder")
        known = {p["variant"]: p for p in self.policies}
        for policy in run.policies:
            old = known.get(policy["variant"])
            if old is None or _policy_identity(old) == _policy_identity(policy):
                continue
            a, b = _policy_identity(old), _policy_identity(policy)
            keys = [k for k in sorted(set(a) | set(b)) if k != "variant" and a.get(k) != b.get(k)]
            raise ManifestError(
                f"variant {policy['variant']!r} differs: the catalog made it with "
                f"{', '.join(f'{k}={a.get(k)}' for k in keys)}, this run with {', '.join(f'{k}={b.get(k)}' for k in keys)} "
                "(unit = encoder factor x --patch-size); use the catalog's parameters, or encode into a new output "
                "folder")
        added = tuple(p for p in run.policies if p["variant"] not in known)
        return dataclasses.replace(self, policies=self.policies + added, schema_version=SCHEMA_VERSION,
                                   encoder_weights=self.encoder_weights or run.encoder_weights)

    def _check_same_weights(self, run: Manifest) -> None:
        mine, theirs = self.encoder, run.encoder
        if self.encoder_weights and run.encoder_weights:
            if self.encoder_weights != run.encoder_weights:
                raise ManifestError(
                    f"encoder weights differ: the catalog was encoded with weights {self.encoder_weights} "
                    f"(read from {mine.source}), this run loads {run.encoder_weights} (from {theirs.source}); "
                    "point --encoder-source at the weights the catalog was made with, or encode into a new "
                    "output folder")
            return
        # one side has no content hash (schema 1, or a manifest made by hand): where the weights came
        # from is all there is to compare
        if (mine.source, mine.revision) != (theirs.source, theirs.revision):
            raise ManifestError(
                f"encoder weights cannot be compared: the catalog records no content hash of its weights, only "
                f"that they came from {mine.source or '-'} @ {mine.revision}, and this run reads "
                f"{theirs.source or '-'} @ {theirs.revision}; run once with --encoder-source {mine.source} "
                "(which records the hash), or encode into a new output folder")


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
