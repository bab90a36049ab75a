"""What to encode: an ImageNet-style folder (`<class>/<image>`) as a list of labelled items."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
