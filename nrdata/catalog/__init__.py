"""The latent catalog: a folder with a manifest, a Parquet index, Arrow IPC latent shards and an
errors table. See `layout` for the files and `writer` for the commit protocol."""

from nrdata.catalog.manifest import EncoderInfo, Manifest, ManifestError, Normalization, read_manifest
from nrdata.catalog.reader import Catalog, CatalogIntegrityError, CorruptLatentError
from nrdata.catalog.validate import ValidationReport, validate_catalog
from nrdata.catalog.writer import CatalogLockedError, CatalogWriter, LatentRow, WriteSummary, stored_array

__all__ = [
    "Catalog", "CatalogIntegrityError", "CatalogLockedError", "CatalogWriter", "CorruptLatentError", "EncoderInfo",
    "LatentRow", "Manifest", "ManifestError", "Normalization", "ValidationReport", "WriteSummary", "read_manifest",
    "stored_array", "validate_catalog",
]
