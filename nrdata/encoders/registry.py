"""Encoders by name: `load_encoder("dc-ae-f32c32", source)` for the CLI, the Ray actors and the sampler."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from nrdata.catalog.manifest import EncoderInfo
from nrdata.encoders.base import Encoder
from nrdata.encoders.pixel import PixelEncoder
from nrdata.encoders.vae import VAEEncoder, load_diffusers_model, weights_identity


@dataclass(frozen=True)
class VAESpec:
    """What a registered VAE name promises: where its weights live by default and its geometry."""

    name: str
    model: str  # "AutoencoderDC" | "AutoencoderKL" | "va-vae" (LDM checkpoint or converted folder)
    default_source: str
    factor: int
    channels: int
    quantity: str  # what the catalog stores: "mode" (DC-AE latent) or "moments" (KL mean and logvar)
    cuda_compute_dtype: str  # the dtype it encodes in on CUDA unless asked otherwise
    records_scaling: bool  # whether the config's scaling_factor means anything (VA-VAE uses mean/std)


VAE_SPECS = {spec.name: spec for spec in (
    VAESpec("dc-ae-f32c32", "AutoencoderDC", "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", 32, 32, "mode",
            "bfloat16", True),
    VAESpec("sd-vae-ft-ema", "AutoencoderKL", "stabilityai/sd-vae-ft-ema", 8, 4, "moments", "float32", True),
    VAESpec("va-vae-f16d32", "va-vae", "hustvl/vavae-imagenet256-f16d32-dinov2", 16, 32, "moments", "float32",
            False),
)}
ENCODER_NAMES = ("pixel", *VAE_SPECS)
_PIXEL_NAME = re.compile(r"^pixel(?:-f(\d+))?$")


def _pixel_encoder(name: str, factor: int | None, dtype: str | None) -> PixelEncoder:
    named = _PIXEL_NAME.match(name).group(1)
    if named is not None and factor is not None and int(named) != factor:
        raise ValueError(f"encoder {name!r} says factor {named} but factor={factor} was passed")
    if dtype not in (None, "uint8"):
        raise ValueError(f"the pixel encoder stores uint8, not {dtype!r}")
    return PixelEncoder(int(named) if named is not None else (factor or 1))


def _geometry(spec: VAESpec, model: Any) -> tuple[int, int]:
    config = model.config
    widths = config["encoder_block_out_channels"] if spec.model == "AutoencoderDC" else config["block_out_channels"]
    return 2 ** (len(widths) - 1), config["latent_channels"]


def load_encoder(name: str, source: str | None = None, *, device: Any = "cpu", dtype: str | None = None,
                 compute_dtype: Any = None, revision: str | None = None, factor: int | None = None) -> Encoder:
    """The encoder registered as `name`, with weights from `source` (hub id or local path).

    - `pixel` or `pixel-f8`: the weight-free space-to-depth encoder (`factor` or the name's suffix;
      `source` is ignored).
    - `dc-ae-f32c32`, `sd-vae-ft-ema`: diffusers folders, on the hub or local.
    - `va-vae-f16d32`: an LDM checkpoint file (.pt/.ckpt/.safetensors, nesting and prefixes allowed),
      a folder saved from a previous conversion, or the hub.

    `dtype` is the storage dtype (VAEs: bfloat16 by default, float16 or float32 allowed);
    `compute_dtype` the network's (float32 on CPU; on CUDA bfloat16 for DC-AE, float32 otherwise).
    The weights must have the geometry the name promises, else ValueError.
    """
    if _PIXEL_NAME.match(name):
        return _pixel_encoder(name, factor, dtype)
    spec = VAE_SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODER_NAMES)} (pixel also as pixel-f<N>)")
    if factor not in (None, spec.factor):
        raise ValueError(f"{name} has factor {spec.factor}, not {factor}")
    source = source or spec.default_source
    # loaded as stored, not in the compute dtype: the weights hash is taken before VAEEncoder casts
    if spec.model == "va-vae":
        from nrdata.encoders.vavae import load_vavae_model

        model, recorded, commit = load_vavae_model(source, revision=revision)
    else:
        model, recorded, commit = load_diffusers_model(spec.model, source, revision=revision)
    found = _geometry(spec, model)
    if found != (spec.factor, spec.channels):
        raise ValueError(f"{recorded}: holds an f{found[0]} c{found[1]} autoencoder, but {name} is "
                         f"f{spec.factor} c{spec.channels}; pick the encoder name that matches the weights")
    info = EncoderInfo(name=name, source=recorded, revision=commit, factor=spec.factor, channels=spec.channels,
                       quantity=spec.quantity,
                       scaling_factor=float(model.config["scaling_factor"]) if spec.records_scaling else None)
    return VAEEncoder(model, info, dtype=dtype or "bfloat16", device=device, compute_dtype=compute_dtype,
                      cuda_compute_dtype=spec.cuda_compute_dtype, weights_id=weights_identity(model))
