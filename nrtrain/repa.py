"""REPA: a frozen vision encoder's per-patch features, one target per token of a pack.

    encoder = load_vision_encoder("radio.pt", device="cuda", normalization="clip")
    targets = repa_targets(encoder, batch.images, batch.sizes, device)    # [T, encoder.dim]
    terms = loss_fn(model, batch, generator, repa_targets=targets)

Each image of a pack is resized to `patch_size` pixels per token (NiT feeds RADIO 16 px per latent
token), so the encoder yields exactly h*w patch features for an image of h x w tokens, row-major like
the tokens. The model's projector (after block `repa_depth`) is pulled towards them by cosine
similarity per token (`FlowMatchingLoss(repa_weight=...)`).

Where the pixels come from. `nr encode --repa-pixels k` (k = the encoder's patch size / the
model's patch size) stores each latent's REPA image beside it in the catalog's shards: its encoded
pixels resized to k px per latent cell (`nrdata.repa_images`), uint8. `PackedLoader(...,
repa_images="stored")`, what `nr train` uses, hands them over memory-mapped and mirrored where the
flipped twin was drawn, so the features always describe the latents they are paired with and no
image is decoded during training (`stored_repa_rows` finds them, and refuses a catalog without them
with the `nr encode` command that stores them). `repa_images="source"` is the slower path for
catalogs without them: each row's source image decoded and resized by its policy at every step
(`SourcePixels`). Both give the same targets up to the stored image's rounding to uint8 (within
0.5/255 per pixel; tests/test_repa_store.py). NiT instead resizes the source JPEG straight to 16 px
per token at every step; here the encoder sees a downscaled view of the very pixels that were
encoded. Why stored images and not features precomputed at encode time or JPEGs decoded on the GPU:
BENCHMARKS.md, "REPA data path".

What an encoder is (`load_vision_encoder`):

- A TorchScript file (`torch.jit.script(model).save(path)`, or `torch.jit.trace`). Its `forward`
  takes float images [N, 3, H, W], normalised as `normalization` says (H, W multiples of the patch
  size), and returns either patch tokens [N, P + (H/ps)*(W/ps), D], the P leading prefix tokens (cls,
  registers) being dropped here, or a feature map [N, D, H/ps, W/ps]. The module carries an int
  attribute `patch_size` (or pass `patch_size=`) and, when P > 0, an int `num_prefix_tokens`.
- `hub:<local repo dir>:<entry>`: `torch.hub.load(dir, entry, source="local")`, for a checkout of a
  hub repo (DINOv2, RADIO, a timm wrapper). Nothing is downloaded by nr: the entry must find its
  weights locally (e.g. in the torch hub cache, $TORCH_HOME). `forward_features` is used when the
  module has one, else `forward`; their output may also be DINOv2's dict (`x_norm_patchtokens`) or
  RADIO's (summary, features) pair. The patch size is read from `patch_size` or
  `patch_embed.patch_size`.

The feature width `dim` is measured with one probe image at load time, which also checks the token
count, so a module that breaks the contract fails when it is loaded, not in the middle of a run.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from nrdata.catalog import Catalog, CatalogIntegrityError, layout
from nrdata.catalog.reader import ShardView, rows_by_shard
from nrdata.images import ImageDecodeError, decode_image
from nrdata.policies import NATIVE_MAX_AREA, ResolutionPolicy
from nrdata.repa_images import resize_pixels

# Per-channel (mean, std) of [0, 1] RGB the encoder's network expects. DINOv2 and most ViTs use
# ImageNet's; RADIO's and CLIP's hub models use CLIP's, and RADIO normalises inside its own forward
# (then "none").
NORMALIZATIONS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]] | None] = {
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "none": None,
}

HUB_PREFIX = "hub:"


class VisionEncoder:
    """A frozen encoder in eval mode: [0, 1] images in, per-patch features out."""

    def __init__(self, module: torch.nn.Module, *, patch_size: int, prefix_tokens: int, normalization: str,
                 spec: str, use_forward_features: bool) -> None:
        if normalization not in NORMALIZATIONS:
            raise ValueError(f"unknown REPA input normalization {normalization!r}; choose one of "
                             f"{', '.join(NORMALIZATIONS)}")
        self.module = module
        self.patch_size = int(patch_size)
        self.prefix_tokens = int(prefix_tokens)
        self.normalization = normalization
        self.spec = spec
        self._forward_features = use_forward_features
        self.dim = 0  # set by `load_vision_encoder` from a probe image

    def describe(self) -> dict[str, Any]:
        """What a run records about its REPA encoder (the encoder itself is never checkpointed)."""
        return {"encoder": self.spec, "patch_size": self.patch_size, "dim": self.dim,
                "prefix_tokens": self.prefix_tokens, "normalization": self.normalization}

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """float [N, 3, H, W] in [0, 1], H and W multiples of patch_size → [N, (H/ps)*(W/ps), dim], row-major."""
        n, channels, height, width = images.shape
        ps = self.patch_size
        if channels != 3 or height % ps or width % ps:
            raise ValueError(f"the REPA encoder takes [N, 3, H, W] with H and W multiples of its patch size {ps}, "
                             f"got {tuple(images.shape)}")
        stats = NORMALIZATIONS[self.normalization]
        if stats is not None:
            mean = torch.tensor(stats[0], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
            std = torch.tensor(stats[1], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
            images = (images - mean) / std
        output = self.module.forward_features(images) if self._forward_features else self.module(images)
        return self._patch_tokens(output, n, height // ps, width // ps)

    def _patch_tokens(self, output: Any, n: int, h: int, w: int) -> torch.Tensor:
        if isinstance(output, dict):
            if "x_norm_patchtokens" not in output:
                raise ValueError(f"REPA encoder {self.spec}: its output is a dict without 'x_norm_patchtokens' "
                                 f"(keys {sorted(output)}); it must give patch tokens")
            output = output["x_norm_patchtokens"]
        elif isinstance(output, (tuple, list)):  # RADIO: (summary, spatial features)
            output = output[-1]
        if not isinstance(output, torch.Tensor):
            raise ValueError(f"REPA encoder {self.spec}: returned {type(output).__name__}, not a tensor of patch "
                             "tokens")
        if output.dim() == 4 and output.shape[0] == n and tuple(output.shape[2:]) == (h, w):
            return output.flatten(2).transpose(1, 2)
        expected = self.prefix_tokens + h * w
        if output.dim() != 3 or output.shape[0] != n or output.shape[1] != expected:
            raise ValueError(f"REPA encoder {self.spec}: for {n} image(s) of {h}x{w} patches it returned "
                             f"{tuple(output.shape)}; expected [N, {self.prefix_tokens} prefix + {h * w} patch "
                             f"tokens, dim] or [N, dim, {h}, {w}]. Check patch_size and num_prefix_tokens")
        return output[:, self.prefix_tokens:]


def load_vision_encoder(spec: str, *, device: str | torch.device = "cpu", normalization: str = "imagenet",
                        patch_size: int | None = None) -> VisionEncoder:
    """A TorchScript file or `hub:<local repo dir>:<entry>` (see the module docstring), frozen, in eval mode.

    `normalization` names the mean/std the network expects of its input (NORMALIZATIONS);
    `patch_size` overrides the module's own attribute. Raises FileNotFoundError or ValueError naming
    the spec and what to change.
    """
    spec = str(spec).strip()
    if not spec:
        raise ValueError("the REPA encoder spec is empty; give a TorchScript file or hub:<local repo dir>:<entry>")
    if spec.startswith(HUB_PREFIX):
        module = _load_hub(spec)
        use_forward_features = hasattr(module, "forward_features")
    else:
        module = _load_torchscript(spec)
        use_forward_features = False
    module = module.to(device).eval()
    for parameter in module.parameters():  # ScriptModules have no requires_grad_()
        parameter.requires_grad_(False)
    ps = patch_size if patch_size is not None else _patch_size_of(module, spec)
    if isinstance(ps, bool) or not isinstance(ps, int) or ps < 1:
        raise ValueError(f"REPA encoder {spec}: patch size must be a positive int, got {ps!r}")
    prefix = getattr(module, "num_prefix_tokens", 0)
    encoder = VisionEncoder(module, patch_size=ps, prefix_tokens=int(prefix), normalization=normalization,
                            spec=spec, use_forward_features=use_forward_features)
    probe = torch.full((1, 3, 2 * ps, 2 * ps), 0.5, device=device)
    try:
        with torch.no_grad():
            output = encoder.module.forward_features(probe) if use_forward_features else encoder.module(probe)
    except Exception as exc:  # noqa: BLE001 - any failure of a foreign module on a plain image
        raise ValueError(f"REPA encoder {spec}: a probe image [1, 3, {2 * ps}, {2 * ps}] failed "
                         f"({type(exc).__name__}: {exc}); its forward must take [N, 3, H, W] images") from exc
    encoder.dim = int(encoder._patch_tokens(output, 1, 2, 2).shape[-1])
    return encoder


def _load_torchscript(spec: str) -> torch.nn.Module:
    path = Path(spec).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"REPA encoder {spec}: no such file. Give a TorchScript file "
                                f"(torch.jit.script(model).save(path)) or {HUB_PREFIX}<local repo dir>:<entry>")
    try:
        return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError or ValueError for non-archives
        raise ValueError(f"REPA encoder {spec}: not a TorchScript archive ({type(exc).__name__}). A state dict or "
                         "a pickled module cannot be loaded without its code: export it with "
                         "torch.jit.script(model).save(path), or load its hub repo with "
                         f"{HUB_PREFIX}<local repo dir>:<entry>") from exc


def _load_hub(spec: str) -> torch.nn.Module:
    folder, _, entry = spec[len(HUB_PREFIX):].rpartition(":")
    if not folder or not entry:
        raise ValueError(f"REPA encoder {spec}: expected {HUB_PREFIX}<local repo dir>:<entry>, e.g. "
                         f"{HUB_PREFIX}/models/dinov2:dinov2_vitb14")
    if not (Path(folder) / "hubconf.py").is_file():
        raise FileNotFoundError(f"REPA encoder {spec}: {folder} has no hubconf.py; give a local checkout of a "
                                "torch.hub repository (nr never downloads one)")
    try:
        module = torch.hub.load(folder, entry, source="local", trust_repo=True)
    except Exception as exc:  # noqa: BLE001 - a hub entry can raise anything
        raise ValueError(f"REPA encoder {spec}: torch.hub.load({folder!r}, {entry!r}, source='local') failed "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"REPA encoder {spec}: the hub entry returned {type(module).__name__}, not a torch module")
    return module


def _patch_size_of(module: torch.nn.Module, spec: str) -> int:
    for owner in (module, getattr(module, "patch_embed", None)):
        value = getattr(owner, "patch_size", None) if owner is not None else None
        if isinstance(value, (tuple, list)) and len(set(value)) == 1:
            value = value[0]
        if isinstance(value, int):
            return value
    raise ValueError(f"REPA encoder {spec}: the module has no int attribute patch_size (nor patch_embed.patch_size);"
                     " set one before exporting, or pass patch_size")


@torch.no_grad()
def repa_targets(encoder: VisionEncoder, images: Sequence[np.ndarray | torch.Tensor], sizes: torch.Tensor,
                 device: str | torch.device) -> torch.Tensor:
    """float32 [T, encoder.dim]: the features of every token of a pack, in pack order.

    `images` are uint8 [H, W, 3], one per image of the pack; `sizes` [B, 2] are (h, w) in tokens.
    Each image is resized (bicubic, antialiased) to (h * ps, w * ps) pixels, scaled to [0, 1] and
    normalised by the encoder; images of one token size go through the encoder in one call.
    """
    sizes_list = [(int(h), int(w)) for h, w in sizes.tolist()]
    if len(images) != len(sizes_list):
        raise ValueError(f"a pack of {len(sizes_list)} images came with {len(images)} REPA images; build the "
                         "loader with repa_images ('stored' or 'source')")
    lengths = [h * w for h, w in sizes_list]
    starts = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    ps = encoder.patch_size
    out = torch.empty(starts[-1], encoder.dim, device=device, dtype=torch.float32)
    by_size: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, size in enumerate(sizes_list):
        by_size[size].append(i)
    for (h, w), members in by_size.items():
        groups = _by_shape(images, members)
        pixels = torch.cat([_resized(images, same, (h * ps, w * ps), device) for same in groups])
        order = [i for same in groups for i in same]
        features = encoder.features(pixels).float()
        rows = torch.cat([torch.arange(starts[i], starts[i + 1], device=device) for i in order])
        out[rows] = features.reshape(-1, features.shape[-1])
    return out


def _by_shape(images: Sequence[np.ndarray | torch.Tensor], members: list[int]) -> list[list[int]]:
    """`members` grouped by their pixel shape, so each group is resized in one call."""
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i in members:
        groups[tuple(images[i].shape)].append(i)
    return list(groups.values())


def _resized(images: Sequence[np.ndarray | torch.Tensor], members: list[int], size_hw: tuple[int, int],
             device: str | torch.device) -> torch.Tensor:
    """float [n, 3, H, W] in [0, 1] of same-shape uint8 [h, w, 3] images, resized to size_hw."""
    stacked = torch.stack([torch.as_tensor(np.ascontiguousarray(images[i])) for i in members]).to(device)
    if stacked.dtype != torch.uint8 or stacked.dim() != 4 or stacked.shape[-1] != 3:
        raise ValueError(f"REPA images must be uint8 [H, W, 3], got {stacked.dtype} {tuple(stacked.shape[1:])}")
    return resize_pixels(stacked.permute(0, 3, 1, 2).float() / 255, size_hw)


class SourcePixels:
    """The pixels each catalog row was encoded from, rebuilt from its source image: for the loader's REPA images.

    A row's image is `<root>/<source>` decoded and resized by the row's own policy (its variant's
    in the manifest), so it is exactly what the encoder saw. `root` is `image_root` when given,
    else the manifest's source_root (the folder of a CSV/Parquet file list when that is what was
    encoded). Rows are merged row ids: catalogs in the given order, rows in row-id order.
    """

    def __init__(self, catalogs: list[Catalog], image_root: str | Path | None = None) -> None:
        self._roots, self._policies, self._sources, self._keys, self._variants = [], [], [], [], []
        self._expected_hw = []
        lengths = []
        for cat in catalogs:
            root = Path(image_root) if image_root else Path(cat.manifest.source_root)
            if not image_root and not cat.manifest.source_root:
                raise ValueError(f"catalog {cat.root} records no source_root, so REPA cannot find its images; "
                                 "give the image folder (repa_image_root)")
            if root.is_file():  # a file list: its paths are relative to its folder
                root = root.parent
            if not root.is_dir():
                raise FileNotFoundError(f"REPA needs the source images of catalog {cat.root}, but {root} is not a "
                                        "folder; give the folder the catalog was encoded from (repa_image_root)")
            index = cat.index
            sources = index["source"].combine_chunks()
            if sources.null_count:
                raise ValueError(f"catalog {cat.root}: {sources.null_count} index rows have no source path, so "
                                 "their images cannot be found for REPA")
            policies = {p["variant"]: ResolutionPolicy.from_dict({k: v for k, v in p.items() if k != "variant"})
                        for p in cat.manifest.policies}
            variants = index["variant"].combine_chunks()
            unknown = sorted(set(variants.unique().to_pylist()) - set(policies))
            if unknown:
                raise ValueError(f"catalog {cat.root}: variants {unknown} have no policy in the manifest, so their "
                                 "images cannot be resized as they were encoded")
            factor = cat.manifest.encoder.factor
            self._roots.append(root)
            self._policies.append(policies)
            self._sources.append(sources)
            self._keys.append(index["key"].combine_chunks())
            self._variants.append(variants)
            self._expected_hw.append(np.stack([index["latent_h"].to_numpy(), index["latent_w"].to_numpy()], 1) * factor)
            lengths.append(len(index))
        self._offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)

    def pixels(self, row_id: int, *, flip: bool = False) -> np.ndarray:
        """uint8 [H, W, 3] of a merged row, mirrored left-right with `flip` (its flipped twin's pixels)."""
        k = int(np.searchsorted(self._offsets, row_id, side="right")) - 1
        row = int(row_id) - int(self._offsets[k])
        path = self._roots[k] / self._sources[k][row].as_py()
        key = self._keys[k][row].as_py()
        try:
            image = decode_image(path, name=str(path))
        except ImageDecodeError as exc:
            raise ImageDecodeError(f"{exc.problem} (the REPA image of catalog row {row}, key {key!r}; is "
                                   f"{self._roots[k]} the folder the catalog was encoded from?)", exc.name) from exc
        variant = self._variants[k][row].as_py()
        pixels = self._policies[k][variant].apply(image)
        expected = tuple(self._expected_hw[k][row].tolist())
        if pixels.shape[:2] != expected:
            raise ValueError(f"{path}: policy {variant!r} resizes it to {pixels.shape[0]}x{pixels.shape[1]} pixels "
                             f"but catalog row {row} (key {key!r}) holds a latent of {expected[0]}x{expected[1]} "
                             "pixels; the image changed since it was encoded, or the image root points elsewhere")
        return np.ascontiguousarray(pixels[:, ::-1]) if flip else pixels


class MissingRepaImages(ValueError):
    """A catalog does not store the REPA images a run needs; the message holds the `nr encode` command."""


def encode_command(catalog: Catalog, repa_pixels: int | str) -> str:
    """The `nr encode` command that makes a copy of `catalog` storing REPA images at `repa_pixels` per
    latent cell: same source, encoder, variants, dtype and flip mode, into a new folder."""
    m = catalog.manifest
    out = f"{catalog.root.name}-repa{repa_pixels}"
    definition = m.notes.get("definition")
    if definition:
        settings = [f"--definition {definition}"]
    else:
        settings = [f"--encoder {m.encoder.name}"]
        if m.encoder.source:
            settings.append(f"--encoder-source {m.encoder.source}")
        if m.encoder.name == "pixel":
            settings.append(f"--factor {m.encoder.factor}")
        settings += [f"--variant {_variant_spec(p)}" for p in m.policies]
        patch = m.policies[0]["unit"] // m.encoder.factor if m.policies else 1
        if patch != 1:
            settings.append(f"--patch-size {patch}")
        settings += [f"--dtype {m.dtype}", "--flip" if m.flip == "store" else "--no-flip"]
    return (f"nr encode {m.source_root or '<the source images>'} {catalog.root.parent / out} "
            f"{' '.join(settings)} --repa-pixels {repa_pixels}")


def _variant_spec(policy: dict) -> str:
    """The --variant spec (`nrdata.policies.parse_policy`) of a manifest's policy."""
    kind = policy.get("kind")
    if kind == "native":
        return "native" if policy.get("max_area") == NATIVE_MAX_AREA else f"native:max_area={policy['max_area']}"
    return f"fit:{policy['target']}" if kind == "fit" else str(policy["target"])


def stored_repa_rows(catalogs: list[Catalog], patch_size: int, repa_patch_size: int | None) -> dict[str, np.ndarray]:
    """Where each merged row's stored REPA image is: byte `offset` in the REPA column of its shard,
    its height `h` and width `w` in pixels, `nbytes`, and the `crc` (CRC-32) the writer recorded.

    Every catalog must store them, at repa_patch_size / patch_size pixels per latent cell when
    `repa_patch_size` (the REPA encoder's patch size) is given, so that the encoder yields one feature
    per token; MissingRepaImages otherwise, with the `nr encode` command that stores them."""
    wanted: int | str = "<REPA encoder patch size / model patch size>"
    if repa_patch_size is not None:
        if repa_patch_size % patch_size:
            raise ValueError(f"the REPA encoder's patch size {repa_patch_size} is not a multiple of the model's "
                             f"patch size {patch_size}: stored REPA images hold a whole number of pixels per "
                             "latent cell; pick an encoder and patch size that divide")
        wanted = repa_patch_size // patch_size
    parts = {name: [] for name in ("offset", "h", "w", "crc")}
    for cat in catalogs:
        k = cat.manifest.repa_pixels
        if not k or (isinstance(wanted, int) and k != wanted):
            have = "stores no REPA images" if not k else f"stores REPA images at {k} px per latent cell"
            need = f"{wanted} px per latent cell" if isinstance(wanted, int) else "REPA images"
            raise MissingRepaImages(
                f"catalog {cat.root} {have}; REPA training reads them from the catalog (no image is decoded per "
                f"step) and needs {need}. Store them with `{encode_command(cat, wanted)}` and pack the new "
                f"catalog, or decode the source images at every step (slow) with --set repa_image_root=<source "
                "folder>")
        index = cat.index
        h = index["latent_h"].to_numpy().astype(np.int64) * k
        w = index["latent_w"].to_numpy().astype(np.int64) * k
        offset = np.empty(len(index), np.int64)
        crc = np.empty(len(index), np.uint32)
        shard_rows = index["shard_row"].to_numpy()
        names, _, shard_rows_of = rows_by_shard(index)
        for name, rows in zip(names, shard_rows_of):
            path = cat.root / layout.SHARD_DIR / name
            view = ShardView(path)
            if view.repa is None:
                raise CatalogIntegrityError(f"shard {path} holds no REPA images though {cat.root}'s manifest says "
                                            f"they are stored; run `nr catalog validate {cat.root}`, then re-encode")
            starts, data = view.repa
            begin, end = starts[shard_rows[rows]], starts[shard_rows[rows] + 1]
            wrong = np.flatnonzero((end - begin != h[rows] * w[rows] * 3) | (end > data.size))
            if wrong.size:
                row = int(rows[wrong[0]])
                raise CatalogIntegrityError(f"shard {path}: the REPA image of catalog row {row} (key "
                                            f"{cat.index['key'][row].as_py()}) holds {int(end[wrong[0]] - begin[wrong[0]])} "
                                            f"bytes, not {int(h[row] * w[row] * 3)}; run `nr catalog validate "
                                            f"{cat.root}`, then re-encode")
            offset[rows] = begin
            crc[rows] = view.repa_crcs[shard_rows[rows]]
        parts["offset"].append(offset)
        parts["crc"].append(crc)
        parts["h"].append(h)
        parts["w"].append(w)
    table = {name: np.concatenate(values) for name, values in parts.items()}
    table["nbytes"] = table["h"] * table["w"] * 3
    return table
