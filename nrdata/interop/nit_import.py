"""Import NiT's released layout (data-meta JSONL + one safetensors per image) into an nr catalog.

Every JSONL line becomes one row: key = `image_file`, variant from `type` (`native`, `256`, `512`),
latent and flipped latent from `latent[0]` and `latent[1]`, label from `label` (NiT's preprocessing
stores it as float32; it must hold a whole number). The manifest names DC-AE f32c32 with the
`mode` quantity and its scaling factor, the native and center-crop policies NiT used, and flips
stored; the writer computes the normalisation statistics on close. A file that is missing,
unreadable or disagrees with its JSONL line becomes an error row. Re-running skips the keys
already committed, without reading their files.

NiT's files hold `latent * s` in float32 and a catalog holds the latent itself (see
`catalog_rows`), so the import divides by s (in float64, rounded once to the catalog dtype).
Exporting the imported catalog gives NiT's bytes back exactly: the nearest float32 to y / s is
always one that float32 multiplication by s takes back to y. The other way, a float32 latent z
comes back from export and import to within one unit in the last place: multiplying by s < 1
in float32 sends some neighbouring floats to the same value, which no import can tell apart.
bfloat16 and float16 latents, imported with their own dtype, come back exactly.

A run trains on the imported latents as NiT does with `normalization = "scalar"`: the model then sees
z * s again (s from this manifest), where nr's default would normalise each channel by its statistics.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Callable

from nrdata.catalog import CatalogWriter, EncoderInfo, LatentRow, Manifest, WriteSummary
from nrdata.interop.nit import NATIVE_TYPE
from nrdata.policies import NATIVE_MAX_AREA, ResolutionPolicy

# NiT encodes with mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers and multiplies by the scaling factor
# of its diffusers config (0.41407, the value the Sana configs pair with this autoencoder).
NIT_ENCODER = EncoderInfo(name="dc-ae-f32c32", source="mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers", revision=None,
                          factor=32, channels=32, quantity="mode", scaling_factor=0.41407)
# safetensors dtype names (as a file header spells them) of the dtypes a catalog stores
CATALOG_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def nit_policy(data_type: str, unit: int) -> ResolutionPolicy:
    if data_type == NATIVE_TYPE:
        return ResolutionPolicy("native", unit, max_area=NATIVE_MAX_AREA)
    size = data_type.removeprefix("fixed-").split("x")
    if not data_type.startswith("fixed-") or len(size) != 2 or size[0] != size[1] or not size[0].isdigit():
        raise ValueError(f"unknown NiT data type {data_type!r}: expected {NATIVE_TYPE!r} or 'fixed-<S>x<S>'")
    return ResolutionPolicy("center-crop", unit, target=int(size[0]))


def find_data_meta(nit_dir: Path) -> Path:
    """The JSONL of a NiT data folder: the only one in data_meta/, else the merged one."""
    found = sorted((nit_dir / "data_meta").glob("*_meta.jsonl"))
    merged = [p for p in found if p.name.endswith("_merge_meta.jsonl")]
    if len(found) == 1 or len(merged) == 1:
        return found[0] if len(found) == 1 else merged[0]
    raise FileNotFoundError(f"{nit_dir}/data_meta holds {[p.name for p in found] or 'no *_meta.jsonl'}; "
                            "name the JSONL to import with data_meta=")


def find_latent_dir(nit_dir: Path, data_type: str) -> Path:
    """The folder of one data type: the only folder of nit_dir named `*-<native-resolution | SxS>`."""
    suffix = "-" + data_type.removeprefix("fixed-")
    found = [p for p in sorted(nit_dir.iterdir()) if p.is_dir() and p.name.endswith(suffix)]
    if len(found) != 1:
        raise FileNotFoundError(f"{nit_dir}: {len(found)} folders named *{suffix} for data type {data_type!r}; "
                                "name it with latent_dirs={type: folder}")
    return found[0]


def _lines(path: Path):
    with open(path) as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield number, json.loads(line)


def import_nit(nit_dir: str | Path, out_catalog: str | Path, *, data_meta: str | Path | None = None,
               latent_dirs: dict[str, str | Path] | None = None, encoder: EncoderInfo = NIT_ENCODER,
               dtype: str | None = None, image_root: str = "",
               progress: Callable[[int, int], None] | None = None) -> WriteSummary:
    """Import a NiT data folder (data_meta/ and the latent folders, as NiT's release and `export_nit`
    lay it out) into `out_catalog`, creating or resuming it.

    `dtype`: the catalog's latent dtype (default: the files' own). `image_root`: NiT's `image_dir`,
    recorded as the catalog's source root.
    """
    import safetensors.torch  # torch reads the bfloat16 files numpy cannot

    if dtype not in (None, *CATALOG_DTYPES.values()):
        raise ValueError(f"dtype must be one of {sorted(CATALOG_DTYPES.values())}, got {dtype!r}")
    if encoder.scaling_factor is None:
        raise ValueError(f"encoder {encoder.name} records no scaling factor; NiT's latents carry one")
    nit_dir = Path(nit_dir)
    jsonl = Path(data_meta) if data_meta is not None else find_data_meta(nit_dir)
    folders: dict[str, Path] = {}
    policies: dict[str, ResolutionPolicy] = {}
    total = 0
    for _, meta in _lines(jsonl):  # first pass: the data types, and the dtype of the first file found
        data_type = meta["type"]
        if data_type not in folders:
            policies[data_type] = nit_policy(data_type, encoder.factor)
            folders[data_type] = Path((latent_dirs or {}).get(data_type) or find_latent_dir(nit_dir, data_type))
        path = folders[data_type] / meta["latent_file"]
        if dtype is None and path.exists():  # NiT's release is float32
            with safetensors.safe_open(path, "pt") as f:
                dtype = _catalog_dtype(f.get_slice("latent").get_dtype(), path)
        total += 1
    if dtype is None:
        raise FileNotFoundError(f"{jsonl}: none of its latent files exists under {sorted(map(str, folders.values()))}")
    ordered = sorted(policies.values(), key=lambda p: (p.kind != "native", p.target or 0))
    manifest = Manifest(encoder=encoder, dtype=dtype, flip="store", source_root=image_root,
                        policies=tuple({**p.to_dict(), "variant": p.variant} for p in ordered),
                        notes={"imported_from": str(jsonl.resolve())})

    with CatalogWriter(out_catalog, manifest) as writer:
        for done, (number, meta) in enumerate(_lines(jsonl), 1):
            variant = policies[meta["type"]].variant
            key = meta["image_file"]
            if writer.has(key, variant):
                writer.summary.skipped += 1
            else:
                path = folders[meta["type"]] / meta["latent_file"]
                try:
                    row = _read_row(safetensors.torch.load_file(path), meta, variant, encoder, dtype)
                except (OSError, ValueError, KeyError, safetensors.SafetensorError) as exc:
                    writer.add_error(key, "import", f"{jsonl.name} line {number}, {path}: {exc}", variant=variant,
                                     source=key)
                else:
                    writer.add(row)
            if progress:
                progress(done, total)
    return writer.summary


def _catalog_dtype(dtype: str, path: Path) -> str:
    if dtype not in CATALOG_DTYPES:
        raise ValueError(f"{path}: latent dtype {dtype} is not one a catalog stores ({sorted(CATALOG_DTYPES)})")
    return CATALOG_DTYPES[dtype]


def _read_row(tensors: dict, meta: dict, variant: str, encoder: EncoderInfo, dtype: str) -> LatentRow:
    import torch

    latent, label = tensors["latent"], tensors["label"]
    want = (2, encoder.channels, meta["latent_h"], meta["latent_w"])
    if tuple(latent.shape) != want:
        raise ValueError(f"latent shape {tuple(latent.shape)} is not {want} ([orig, flip], C, latent_h, latent_w)")
    if label.numel() != 1 or float(label) != int(label) or int(label) < 0:
        raise ValueError(f"label {label.tolist()} is not one whole non-negative class index")
    # NiT multiplied in float32, by the factor rounded to float32
    scale = float(torch.tensor(encoder.scaling_factor, dtype=torch.float32))
    latent = (latent.double() / scale).to(getattr(torch, dtype))
    return LatentRow(
        key=meta["image_file"], variant=variant, latent=latent[0], latent_flip=latent[1], label=int(label),
        class_name=PurePosixPath(meta["latent_file"]).parent.name or None, source=meta["image_file"],
        orig_w=meta.get("ori_w"), orig_h=meta.get("ori_h"), image_w=meta.get("image_w"),
        image_h=meta.get("image_h"))
