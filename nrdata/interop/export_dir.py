"""An export's output folder: claimed with a record of what it holds, files published whole, and
resumed by skipping the files already there.

Every file is written into a staging folder inside the output and renamed into place, so a file
under its final name is always complete, and a killed export leaves nothing half-written where a
peer's loader lists files (fast-DiT and U-DiT list folders, LightningDiT globs). Files are not
fsynced one by one (that would cost more than the export): a re-run recovers from a killed
process; after a power failure, delete the output and export again.

`nr_export.json` records what the folder holds (format, catalog fingerprints, variants, options).
Exporting anything else into it is refused, so a resumed export never mixes two catalogs.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from nrdata.catalog.atomic import atomic_write_bytes
from nrdata.interop.catalog_rows import CatalogRows
from nrdata.version import code_version

RECORD_NAME = "nr_export.json"
STAGING_NAME = ".nr-staging"
LOCK_NAME = ".nr-export.lock"


class ExportMismatchError(RuntimeError):
    """The output folder holds an export of another catalog, format or options."""


@dataclass
class ExportSummary:
    format: str
    out_dir: Path
    rows: int = 0  # catalog rows in the export
    written: int = 0  # rows whose files this run wrote
    skipped: int = 0  # rows whose files an earlier run had already written
    outputs: dict[str, Path] = field(default_factory=dict)  # the files a peer's config names


class ExportDir:
    """The output folder of one export; use as a context manager."""

    def __init__(self, root: str | Path, fmt: str, rows: CatalogRows, options: dict) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = open(self.root / LOCK_NAME, "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock.close()
            raise ExportMismatchError(f"{self.root} is being written by another export; wait for it") from None
        try:
            self._claim(fmt, rows, options)
        except BaseException:
            self._lock.close()
            raise
        self.staging = self.root / STAGING_NAME
        shutil.rmtree(self.staging, ignore_errors=True)  # what a killed run left half-written
        self.staging.mkdir()
        self._made: set[Path] = set()
        self.summary = ExportSummary(format=fmt, out_dir=self.root)

    def _claim(self, fmt: str, rows: CatalogRows, options: dict) -> None:
        identity = {"format": fmt, "fingerprint": rows.manifest.fingerprint,
                    "content_fingerprint": rows.catalog.content_fingerprint(), "options": options}
        path = self.root / RECORD_NAME
        if path.exists():
            recorded = json.loads(path.read_text()).get("identity") or {}
            differing = [k for k in identity if recorded.get(k) != identity[k]]
            if differing:
                raise ExportMismatchError(
                    f"{self.root} holds another export: its {', '.join(differing)} differ from this one's "
                    f"(recorded in {path.name}: {json.dumps({k: recorded.get(k) for k in differing})}); a changed "
                    "catalog shows as a new content_fingerprint; export into a new folder or delete this one")
            return
        if any(p.name not in (LOCK_NAME, STAGING_NAME) for p in self.root.iterdir()):
            raise ExportMismatchError(f"{self.root} is not empty and holds no {RECORD_NAME}; export into a new folder")
        record = {"identity": identity, "catalog": str(rows.path.resolve()), "code_version": code_version()}
        atomic_write_bytes(path, (json.dumps(record, indent=2) + "\n").encode())

    def has(self, relative: str) -> bool:
        return (self.root / relative).exists()

    def stage(self) -> Path:
        """A fresh path in the staging folder, for a file to `publish` once written."""
        return self.staging / uuid.uuid4().hex

    def publish(self, staged: Path, relative: str) -> Path:
        final = self.root / relative
        if final.parent not in self._made:
            final.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(final.parent)
        os.replace(staged, final)
        return final

    def write_with(self, relative: str, write: Callable[[Path], None]) -> Path:
        """Publish the file that `write(path)` makes at a staging path."""
        staged = self.stage()
        write(staged)
        return self.publish(staged, relative)

    def write_bytes(self, relative: str, data: bytes) -> Path:
        return self.write_with(relative, lambda tmp: tmp.write_bytes(data))

    def close(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self._lock.close()  # the lock file stays: removing it would let two later runs lock two files

    def __enter__(self) -> ExportDir:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
