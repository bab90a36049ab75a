"""VA-VAE (LightningDiT) LDM-format checkpoints converted into diffusers `AutoencoderKL`.

VA-VAE is an LDM KL autoencoder with self-attention after every resnet of its lowest level
(`attn_resolutions [16]` at resolution 256), besides the usual mid-block attention. diffusers'
own LDM converter maps only the mid attention and merely logs the rest as unused, which leaves
random attention weights in the encoder. Here every key is renamed by explicit rules, the levels
with attention become `AttnDownEncoderBlock2D` / `AttnUpDecoderBlock2D`, and the result must match
the model key for key and shape for shape before it is loaded with `strict=True`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nrdata.encoders.vae import load_diffusers_model, weights_digest

if TYPE_CHECKING:
    import torch

VAVAE_HUB_REPO = "hustvl/vavae-imagenet256-f16d32-dinov2"
VAVAE_HUB_FILE = "vavae-imagenet256-f16d32-dinov2.pt"
LDM_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors", ".bin")
_AUTOENCODER_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")
_ANCHOR = "encoder.conv_in.weight"  # present in every LDM autoencoder; what precedes it is the prefix
_HUB_FILE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+/[\w./-]+$")  # owner/name/path/in/repo
_LISTED = 12  # keys named per kind in an error message

_RESNET_LEAVES = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                  "nin_shortcut": "conv_shortcut"}
_ATTN_LEAVES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_EDGE_LEAVES = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out"}


class ConversionError(ValueError):
    """An LDM checkpoint whose keys or shapes do not match the autoencoder it should become."""


def vavae_diffusers_config(*, ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                           attn_resolutions: tuple[int, ...] = (16,), resolution: int = 256, z_channels: int = 32,
                           in_channels: int = 3, out_ch: int = 3, double_z: bool = True, dropout: float = 0.0,
                           norm_num_groups: int = 32) -> dict[str, Any]:
    """The diffusers AutoencoderKL config of an LDM autoencoder given its `ddconfig` (defaults: VA-VAE f16d32).

    LDM puts attention at every level whose nominal resolution (`resolution / 2**level`) is in
    `attn_resolutions`, whatever size the input really has. `dropout` only matters in training.
    """
    if not double_z:
        raise ConversionError("double_z false (a deterministic LDM autoencoder) has no diffusers AutoencoderKL form")
    attention = [resolution // 2 ** level in attn_resolutions for level in range(len(ch_mult))]
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": in_channels,
        "out_channels": out_ch,
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attention],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attention)],
        "block_out_channels": [ch * m for m in ch_mult],
        "layers_per_block": num_res_blocks,
        "latent_channels": z_channels,
        "norm_num_groups": norm_num_groups,
        "sample_size": resolution,
        # VA-VAE latents are normalised with per-channel mean/std (the catalog's), not a scalar
        "scaling_factor": 1.0,
    }


def ldm_to_diffusers_key(key: str, levels: int) -> str | None:
    """The diffusers name of an LDM autoencoder parameter, or None for a name no rule covers."""
    *path, param = key.split(".")
    if param not in ("weight", "bias") or not path:
        return None
    if path in (["quant_conv"], ["post_quant_conv"]):
        return key
    side, *rest = path
    if side not in ("encoder", "decoder"):
        return None
    if len(rest) == 1 and rest[0] in _EDGE_LEAVES:
        return f"{side}.{_EDGE_LEAVES[rest[0]]}.{param}"
    if len(rest) == 3 and rest[0] == "mid":
        if rest[1] in ("block_1", "block_2") and rest[2] in _RESNET_LEAVES:
            return f"{side}.mid_block.resnets.{int(rest[1][-1]) - 1}.{_RESNET_LEAVES[rest[2]]}.{param}"
        if rest[1] == "attn_1" and rest[2] in _ATTN_LEAVES:
            return f"{side}.mid_block.attentions.0.{_ATTN_LEAVES[rest[2]]}.{param}"
        return None
    stage = "down" if side == "encoder" else "up"
    if len(rest) < 4 or rest[0] != stage or not rest[1].isdigit() or int(rest[1]) >= levels:
        return None
    level = int(rest[1])
    blocks = f"{side}.{stage}_blocks.{level if stage == 'down' else levels - 1 - level}"
    kind, tail = rest[2], rest[3:]
    if kind == "block" and len(tail) == 2 and tail[0].isdigit() and tail[1] in _RESNET_LEAVES:
        return f"{blocks}.resnets.{int(tail[0])}.{_RESNET_LEAVES[tail[1]]}.{param}"
    if kind == "attn" and len(tail) == 2 and tail[0].isdigit() and tail[1] in _ATTN_LEAVES:
        return f"{blocks}.attentions.{int(tail[0])}.{_ATTN_LEAVES[tail[1]]}.{param}"
    if kind == f"{stage}sample" and tail == ["conv"]:
        return f"{blocks}.{stage}samplers.0.conv.{param}"
    return None


def diffusers_to_ldm_key(key: str, levels: int) -> str | None:
    """The inverse of `ldm_to_diffusers_key`, used to name missing keys the way the checkpoint does."""
    resnet = {v: k for k, v in _RESNET_LEAVES.items()}
    attn = {v: k for k, v in _ATTN_LEAVES.items()}
    edge = {v: k for k, v in _EDGE_LEAVES.items()}
    parts = key.split(".")
    path, param = parts[:-1], parts[-1]
    if path in (["quant_conv"], ["post_quant_conv"]):
        return key
    side, *rest = path
    leaf = ".".join(rest[3:])
    if len(rest) == 1 and rest[0] in edge:
        return f"{side}.{edge[rest[0]]}.{param}"
    if rest[:2] == ["mid_block", "resnets"] and leaf in resnet:
        return f"{side}.mid.block_{int(rest[2]) + 1}.{resnet[leaf]}.{param}"
    if rest[:2] == ["mid_block", "attentions"] and leaf in attn:
        return f"{side}.mid.attn_1.{attn[leaf]}.{param}"
    stage = "down" if side == "encoder" else "up"
    if len(rest) < 4 or rest[0] != f"{stage}_blocks":
        return None
    level = int(rest[1]) if stage == "down" else levels - 1 - int(rest[1])
    if rest[2] == "resnets" and ".".join(rest[4:]) in resnet:
        return f"{side}.{stage}.{level}.block.{rest[3]}.{resnet['.'.join(rest[4:])]}.{param}"
    if rest[2] == "attentions" and ".".join(rest[4:]) in attn:
        return f"{side}.{stage}.{level}.attn.{rest[3]}.{attn['.'.join(rest[4:])]}.{param}"
    if rest[2] == f"{stage}samplers" and rest[3:] == ["0", "conv"]:
        return f"{side}.{stage}.{level}.{stage}sample.conv.{param}"
    return None


def autoencoder_state_dict(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The autoencoder's own tensors, unwrapped from `state_dict` nesting and any key prefix.

    Training-only parts (`loss.*`, the DINOv2 `foundation_model.*`, `linear_proj.*`) are dropped:
    inference does not use them.
    """
    while isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    prefixes = {k[: -len(_ANCHOR)] for k in checkpoint if isinstance(k, str) and k.endswith(_ANCHOR)}
    prefixes = {p for p in prefixes if p == "" or p.endswith(".")}  # not "xencoder.conv_in.weight"
    if len(prefixes) != 1:
        found = "none" if not prefixes else ", ".join(repr(p) for p in sorted(prefixes))
        raise ConversionError(f"expected one LDM autoencoder ('{_ANCHOR}' under one prefix) in the checkpoint, "
                              f"found {found}")
    prefix = prefixes.pop()
    return {k[len(prefix):]: v for k, v in checkpoint.items()
            if k.startswith(prefix) and k[len(prefix):].startswith(_AUTOENCODER_PARTS)}


def ldm_geometry(ldm_sd: dict[str, Any]) -> dict[str, Any]:
    """The `ddconfig` of an LDM KL autoencoder read off its weights (widths, levels, attention, z)."""
    sd = autoencoder_state_dict(ldm_sd)
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        levels = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.down."))
        blocks = {int(k.split(".")[4]) for k in sd if k.startswith("encoder.down.0.block.")}
        widths = [sd[f"encoder.down.{level}.block.0.conv2.weight"].shape[0] for level in range(levels)]
        z_channels = sd["decoder.conv_in.weight"].shape[1]
        double_z = sd["encoder.conv_out.weight"].shape[0] == 2 * z_channels
        out_ch = sd["decoder.conv_out.weight"].shape[0]
    except (KeyError, ValueError, IndexError) as exc:
        raise ConversionError(f"not an LDM KL autoencoder checkpoint: cannot read its geometry ({exc!r})") from exc
    resolution = 16 * 2 ** (levels - 1)  # nominal: puts the lowest level at 16, as in VA-VAE
    attention = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.down.") and ".attn." in k})
    return {"ch": ch, "ch_mult": tuple(w // ch for w in widths), "num_res_blocks": len(blocks),
            "attn_resolutions": tuple(resolution // 2 ** level for level in attention), "resolution": resolution,
            "z_channels": z_channels, "in_channels": sd["encoder.conv_in.weight"].shape[1], "out_ch": out_ch,
            "double_z": double_z}


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    import torch
    from diffusers import AutoencoderKL

    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = AutoencoderKL.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _listing(title: str, keys: list[str]) -> str:
    shown = keys[:_LISTED]
    more = f", … and {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return f"\n  {title} ({len(keys)}): " + ", ".join(shown) + more


def convert_ldm_vae_state_dict(ldm_sd: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """LDM autoencoder weights renamed (and attention 1×1 convs squeezed) for diffusers AutoencoderKL.

    Raises ConversionError naming every key that no rule covers, that the model does not have,
    that the checkpoint lacks, or whose shape differs; what it returns loads with `strict=True`.
    """
    levels = len(config["block_out_channels"])
    expected = _expected_shapes(config)
    converted, origin, unknown = {}, {}, []
    for key, tensor in autoencoder_state_dict(ldm_sd).items():
        new = ldm_to_diffusers_key(key, levels)
        if new is None:
            unknown.append(key)
            continue
        if ".attentions." in new and tensor.ndim == 4 and tuple(tensor.shape[2:]) == (1, 1):
            tensor = tensor[:, :, 0, 0]
        converted[new], origin[new] = tensor, key
    unexpected = unknown + [f"{origin[k]} (as {k})" for k in converted if k not in expected]
    missing = [f"{diffusers_to_ldm_key(k, levels) or '?'} (as {k})" for k in expected if k not in converted]
    mismatched = [f"{origin[k]}: {tuple(t.shape)} vs model {expected[k]}" for k, t in converted.items()
                  if k in expected and tuple(t.shape) != expected[k]]
    if unexpected or missing or mismatched:
        message = "the LDM checkpoint does not match the AutoencoderKL it converts into"
        for title, keys in (("unexpected keys", unexpected), ("missing keys", missing),
                            ("shape mismatches", mismatched)):
            if keys:
                message += _listing(title, keys)
        raise ConversionError(message)
    return converted


def read_ldm_checkpoint(path: Path) -> dict[str, Any]:
    """The raw state dict of an LDM-format .pt/.ckpt/.pth/.bin (tensors only) or .safetensors file."""
    path = Path(path)
    if path.suffix not in LDM_SUFFIXES:
        raise ConversionError(f"{path}: not an LDM checkpoint file (expected one of {LDM_SUFFIXES})")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises several kinds for a bad or pickled file
        raise ConversionError(f"{path}: cannot read as a tensors-only torch checkpoint ({exc})") from exc


def load_ldm_vae(ldm_sd: dict[str, Any], config: dict[str, Any] | None = None, *,
                 dtype: torch.dtype | None = None) -> Any:
    """A diffusers AutoencoderKL (eval mode; `dtype`, else the checkpoint's) holding these LDM weights.

    `config` defaults to the geometry read off the weights (`ldm_geometry`).
    """
    import torch
    from diffusers import AutoencoderKL

    config = config or vavae_diffusers_config(**ldm_geometry(ldm_sd))
    weights = convert_ldm_vae_state_dict(ldm_sd, config)
    with torch.device("meta"):
        model = AutoencoderKL.from_config(config)
    weights = {k: (v if dtype is None else v.to(dtype)).contiguous() for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


def convert_vavae_checkpoint(ldm_path: str | Path, out_dir: str | Path) -> Path:
    """Write an LDM checkpoint as a diffusers model folder (config.json + safetensors)."""
    model = load_ldm_vae(read_ldm_checkpoint(Path(ldm_path)))
    model.save_pretrained(str(out_dir))
    return Path(out_dir)


def _fetch_hub_checkpoint(repo: str, filename: str, revision: str | None) -> tuple[Path, str | None]:
    from diffusers.utils.hub_utils import extract_commit_hash
    from huggingface_hub import hf_hub_download

    try:
        path = hf_hub_download(repo, filename, revision=revision)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many kinds; all mean "not available"
        raise OSError(f"{repo}/{filename} is not a local path and could not be fetched from the hub "
                      f"(offline? pass the local checkpoint path): {exc}") from exc
    return Path(path), extract_commit_hash(path) or revision


def load_vavae_model(source: str, *, revision: str | None = None,
                     torch_dtype: torch.dtype | None = None) -> tuple[Any, str, str | None]:
    """VA-VAE as a diffusers AutoencoderKL from an LDM checkpoint file, a diffusers folder, or the hub.

    `source` is a local .pt/.ckpt/.safetensors file, a local diffusers folder, a hub repo holding a
    diffusers model, `owner/name/path/file.pt` on the hub, or the VA-VAE repo id itself (its .pt).
    Returns (model in eval mode, source as recorded, revision: hub commit or a hash of the local file).
    """
    local = Path(source).expanduser()
    if local.is_file():
        local = local.resolve()
        checkpoint, recorded, commit = local, str(local), weights_digest([local])
    elif source == VAVAE_HUB_REPO:
        (checkpoint, commit), recorded = _fetch_hub_checkpoint(VAVAE_HUB_REPO, VAVAE_HUB_FILE, revision), source
    elif not local.exists() and _HUB_FILE.match(source) and source.endswith(LDM_SUFFIXES):
        owner, name, filename = source.split("/", 2)
        (checkpoint, commit), recorded = _fetch_hub_checkpoint(f"{owner}/{name}", filename, revision), source
    else:  # a diffusers folder, here or on the hub (a missing path fails there with a clear error)
        return load_diffusers_model("AutoencoderKL", source, revision=revision, torch_dtype=torch_dtype)
    ldm_sd = read_ldm_checkpoint(checkpoint)
    try:
        model = load_ldm_vae(ldm_sd, dtype=torch_dtype)
    except ConversionError as exc:
        raise ConversionError(f"{checkpoint}: {exc}") from exc
    return model, recorded, commit
