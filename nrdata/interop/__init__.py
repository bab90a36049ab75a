"""Interop with the peers' codebases: export a catalog into the layout a peer's loader reads, and
import NiT's released latents into a catalog.

| format         | peer (reads it)            | what the catalog must hold                               |
|----------------|----------------------------|----------------------------------------------------------|
| `nit`          | NiT                        | DC-AE f32c32, native and/or center-crop variants, flips  |
| `fit`          | FiT / FiTv2                | SD-VAE, a fit variant of unit 16 (+ its crop), flips      |
| `lightningdit` | LightningDiT               | VA-VAE f16d32, one center-crop variant, flips            |
| `fastdit`      | fast-DiT, U-DiT            | SD-VAE, one center-crop variant (flips for a random one) |
| `uvit`         | U-ViT, DiMR                | SD-VAE moments, one center-crop variant, flips           |

Every export streams the catalog one index part at a time, publishes each file whole, resumes by
skipping the files already written, reports progress through `progress(done, total)`, and refuses
with UnsupportedCatalogError a catalog the format cannot express (the message names the encode
command that makes one it can). The scaling convention all of them share is stated in
`catalog_rows`.
"""

from nrdata.interop.catalog_rows import UnsupportedCatalogError
from nrdata.interop.export_dir import ExportMismatchError, ExportSummary
from nrdata.interop.fastdit import export_fastdit
from nrdata.interop.fit import export_fit
from nrdata.interop.lightningdit import export_lightningdit
from nrdata.interop.nit import export_nit
from nrdata.interop.nit_import import NIT_ENCODER, import_nit
from nrdata.interop.uvit import export_uvit

EXPORTERS = {
    "nit": export_nit,
    "fit": export_fit,
    "lightningdit": export_lightningdit,
    "fastdit": export_fastdit,
    "uvit": export_uvit,
}

__all__ = [
    "EXPORTERS", "ExportMismatchError", "ExportSummary", "NIT_ENCODER", "UnsupportedCatalogError", "export_fastdit",
    "export_fit", "export_lightningdit", "export_nit", "export_uvit", "import_nit",
]
