"""What to encode: an ImageNet-style folder (`<class>/<image>`) or a CSV/Parquet file list, as labelled items."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})


@dataclass(frozen=True)
class SourceItem:
    path: Path  # absolute
    key: str  # stable row key: the path relative to the source root, with '/' separators
    label: int  # -1 when unlabelled
    class_name: str | None


def list_image_folder(root: str | Path) -> list[SourceItem]:
    """Every image under `root/<class>/...`, labelled by the class folder's position in sorted order.

    Sorted folder order is torchvision's ImageFolder order, so on ImageNet-1k the labels are the
    standard class indices. Files are picked by extension only; whether they decode is the
    encoder's business (a bad file becomes an error row, not a missing one).
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: source folder does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class folders; expected an ImageNet-style layout <class>/<image>")
    items: list[SourceItem] = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                items.append(SourceItem(path, path.relative_to(root).as_posix(), label, name))
    return items


FILE_LIST_SUFFIXES = (".csv", ".parquet")


def read_file_list(path: str | Path) -> list[SourceItem]:
    """Items from a CSV or Parquet list with columns `path` and `label` (and optionally `class_name`).

    Relative paths are taken from the list's folder. The key is the path as the list writes it, so
    the same list encoded twice gives the same keys wherever the list lives.
    """
    import polars as pl

    path = Path(path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file list does not exist")
    try:
        frame = pl.read_csv(path) if path.suffix.lower() == ".csv" else pl.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - polars raises several kinds for unreadable files
        raise ValueError(f"{path}: cannot read the file list ({type(exc).__name__}: {exc})") from exc
    missing = {"path", "label"} - set(frame.columns)
    if missing:
        raise ValueError(f"{path}: the file list needs columns path and label; missing {sorted(missing)} "
                         f"(has {frame.columns})")
    if frame["path"].null_count() or frame["label"].null_count():
        row = int(frame.with_row_index().filter(pl.col("path").is_null() | pl.col("label").is_null())["index"][0])
        raise ValueError(f"{path}: row {row} has an empty path or label")
    try:
        labels = frame["label"].cast(pl.Int64, strict=True).to_list()
    except Exception:  # noqa: BLE001
        raise ValueError(f"{path}: the label column must hold integers (found {frame['label'].dtype})") from None
    names = frame["class_name"].cast(pl.String).to_list() if "class_name" in frame.columns else [None] * len(frame)
    items, seen = [], set()
    for number, (rel, label, name) in enumerate(zip(frame["path"].cast(pl.String).to_list(), labels, names)):
        key = Path(rel).as_posix()
        if key in seen:
            raise ValueError(f"{path}: row {number} repeats path {rel!r}; every image must be listed once")
        seen.add(key)
        items.append(SourceItem((path.parent / rel).resolve(), key, int(label), name))
    return items


def list_source(source: str | Path) -> list[SourceItem]:
    """An ImageNet-style folder, or a CSV/Parquet file list."""
    source = Path(source)
    if source.suffix.lower() in FILE_LIST_SUFFIXES and not source.is_dir():
        return read_file_list(source)
    return list_image_folder(source)


def spread_limit(items: list[SourceItem], limit: int | None) -> list[SourceItem]:
    """At most `limit` items, evenly spaced over the listing so that a trial run sees every class."""
    if limit is None or limit >= len(items):
        return items
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    picks = np.linspace(0, len(items) - 1, limit).round().astype(np.int64)
    return [items[i] for i in picks]
