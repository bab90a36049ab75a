"""nrdata: everything about data in nr: image decoding, resolution policies, the latent catalog,
packers and exports. Works without Ray or diffusers installed."""

from nrdata.version import code_version

__all__ = ["code_version"]
