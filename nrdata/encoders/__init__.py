"""Encoders behind one interface: pixels in, stored latents out, and back.

`load_encoder(name, source)` is the entry point; the VAE modules import torch and diffusers only
when a VAE is loaded.
"""

from nrdata.encoders.base import Encoder
from nrdata.encoders.pixel import PixelEncoder
from nrdata.encoders.registry import ENCODER_NAMES, VAE_SPECS, load_encoder
from nrdata.encoders.vae import STORAGE_DTYPES, VAEEncoder

__all__ = ["ENCODER_NAMES", "Encoder", "PixelEncoder", "STORAGE_DTYPES", "VAEEncoder", "VAE_SPECS", "load_encoder"]
