"""Catalog definition files (`catalogs/*.toml`): the options of an encode run, kept as data."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path

CATALOGS_DIR = Path(__file__).resolve().parent.parent / "catalogs"


@dataclass(frozen=True)
class CatalogDefinition:
    path: Path
    source: dict
    encoder: dict
    policies: tuple[str, ...]
    flip: bool
    patch_size: int = 1  # the model's patch: native sizes are multiples of factor x patch_size


def load_definition(name_or_path: str | Path) -> CatalogDefinition:
    """Load `catalogs/<name>.toml` or a path to a definition file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CATALOGS_DIR / f"{name_or_path}.toml"
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        known = sorted(p.stem for p in CATALOGS_DIR.glob("*.toml"))
        raise FileNotFoundError(f"{path}: no such catalog definition (shipped: {', '.join(known)})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: not valid TOML ({exc})") from exc
    try:
        variants = data["variants"]
        flip = variants.get("flip", "none")
        if flip not in ("store", "none"):
            raise ValueError(f"{path}: variants.flip must be 'store' or 'none', got {flip!r}")
        return CatalogDefinition(path, dict(data["source"]), dict(data["encoder"]), tuple(variants["policies"]),
                                 flip == "store", int(variants.get("patch_size", 1)))
    except KeyError as exc:
        raise ValueError(f"{path}: missing section or key {exc}; needs [source], [encoder], [variants].policies") from exc
