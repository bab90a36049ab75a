"""Encoders behind one interface: pixels in, stored latents out, and back."""

from nrdata.encoders.base import Encoder
from nrdata.encoders.pixel import PixelEncoder

__all__ = ["Encoder", "PixelEncoder"]
