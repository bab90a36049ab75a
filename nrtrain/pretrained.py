"""Weights trained elsewhere, brought into nr: NiT's released checkpoint as an nr run folder
(`nr import nit-model`), and any run's weights as the start of another (`init_from`).

Why an import rather than `nr sample` reading NiT's file directly: a run folder is what every nr
command already trusts. It records what NiT's file cannot say about itself (the model config, NiT's
RoPE grid, the scalar normalisation and its factor, the decoder's identity by the content of its
weights, the training size RoPE extrapolation starts from), its weights are checksummed once, and
sampling, `--catalog` checks, provenance and `init_from` all read it through one code path.

    RUN/checkpoints/step-00000000/
        model.safetensors   NiT's tensors under nr's names (the Conv2d patch embedding as a Linear)
        run.json            model config, data identity, where the weights came from and their sha256
    RUN/checkpoints/latest

No state.pt: an imported run is sampled or started from (`init_from`), never resumed.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from nrdata.version import code_version
from nrtrain.checkpoint import (CheckpointMismatchError, LoadReport, check_encoder, check_normalization_mode,
                                file_sha256, load_state, load_weights, resolve_checkpoint, save_checkpoint,
                                verify_checkpoint, weights_file)
from nrtrain.model import PRESETS, NiT, NiTConfig, read_state_dict
from nrtrain.normalization import LatentScaling

NIT_ENCODER = "dc-ae-f32c32"
# NiT trains on ImageNet at native resolution (images of about 500 px) and at 256 and 512 px: 512 x 512
# is where its positions stop being seen often; NiT's own sampler extrapolates from a size it is told
NIT_TRAIN_SIZE = (512, 512)
_BLOCK = re.compile(r"^blocks\.(\d+)\.")
# settings of the model that the weights do not fix: they may differ between a run and its init_from
RUNTIME_FIELDS = ("attention", "repa_depth", "repa_dim", "repa_hidden")


@dataclass
class ImportSummary:
    run_dir: Path
    checkpoint: Path
    config: NiTConfig
    scaling: LatentScaling
    report: LoadReport
    source_sha256: str


def nit_config(state: dict[str, torch.Tensor], *, preset: str | None = None, origin: str = "checkpoint") -> NiTConfig:
    """The NiTConfig NiT's tensors were trained with, read from their shapes (shared/reference/nit.md
    §4.1). `preset` (S, B, L, XL) is checked against them, and gives the heads when the blocks have
    no qk-norm to read them from. Raises ValueError naming what does not fit."""
    embed = state.get("x_embedder.proj.weight")
    if embed is None or embed.dim() != 4 or embed.shape[2] != embed.shape[3]:
        raise ValueError(f"{origin}: no NiT patch embedding x_embedder.proj.weight [D, C, p, p] "
                         f"(found {None if embed is None else tuple(embed.shape)}); is this NiT's checkpoint?")
    hidden, channels, patch = int(embed.shape[0]), int(embed.shape[1]), int(embed.shape[2])
    depth = 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)
    if depth == 0:
        raise ValueError(f"{origin}: no transformer blocks (blocks.N.*); is this NiT's checkpoint?")
    if "blocks.0.adaLN_modulation.2.weight" in state:
        raise ValueError(f"{origin}: its blocks use adaLN-LoRA (NiT-XXL), which nr's model does not have")
    q_norm = state.get("blocks.0.attn.q_norm.weight")
    chosen = PRESETS.get(preset) if preset else None
    if preset and chosen is None:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {[p for p in PRESETS if p[0].isupper()]}")
    if q_norm is not None:
        heads = hidden // int(q_norm.shape[0])
    elif chosen:
        heads = chosen["heads"]
    else:
        raise ValueError(f"{origin}: the blocks have no qk-norm to read the number of heads from; name the "
                         f"model size with --preset")
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    table = state.get("y_embedder.embedding_table.weight")
    if fc1 is None or table is None:
        raise ValueError(f"{origin}: lacks {'blocks.0.mlp.fc1.weight' if fc1 is None else 'y_embedder'}; "
                         "is this NiT's checkpoint?")
    config = NiTConfig(in_channels=channels, patch_size=patch, hidden=hidden, depth=depth, heads=heads,
                       mlp_ratio=int(fc1.shape[0]) / hidden, num_classes=int(table.shape[0]) - 1,
                       qk_norm=q_norm is not None, rope_grid="nit")
    if chosen and (chosen["depth"], chosen["hidden"], chosen["heads"]) != (depth, hidden, heads):
        raise ValueError(f"{origin}: holds depth {depth}, hidden {hidden}, heads {heads}, but preset {preset} is "
                         f"depth {chosen['depth']}, hidden {chosen['hidden']}, heads {chosen['heads']}; drop "
                         f"--preset or name the size the file holds")
    return config


def import_nit_model(checkpoint: str | Path, out: str | Path, *, encoder: str = NIT_ENCODER,
                     encoder_source: str | None = None, preset: str | None = None,
                     scaling_factor: float | None = None, train_size: tuple[int, int] = NIT_TRAIN_SIZE,
                     ignore_extra: Sequence[str] = ("projector.",)) -> ImportSummary:
    """Write NiT's checkpoint (.safetensors or .pt, a state dict or one under ema/model/state_dict)
    as the nr run folder `out`.

    The decoder is loaded once (`encoder` by name, its weights from `encoder_source`: a hub id or a
    local folder, the same code path) for its identity and scaling factor; `scaling_factor` overrides
    the one its config holds. `train_size` (H, W pixels) is recorded as the size RoPE extrapolation
    starts from. `ignore_extra`: prefixes of checkpoint keys nr's model has no place for that may be
    skipped (NiT's REPA projector by default); any other unknown key is refused."""
    from nrdata.encoders import load_encoder

    path, out = Path(checkpoint), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; import into a new folder")
    state, origin = read_state_dict(path)
    config = nit_config(state, preset=preset, origin=origin)
    embed = state["x_embedder.proj.weight"]
    state = {**state, "x_embedder.proj.weight": embed.reshape(embed.shape[0], -1)}
    model = NiT.from_config(config)
    report = load_state(model, state, ignore_extra=ignore_extra, origin=origin)

    decoder = load_encoder(encoder, encoder_source)
    info = decoder.info
    if info.channels != config.in_channels:
        raise ValueError(f"{origin}: the model reads {config.in_channels}-channel latents but encoder {encoder} "
                         f"makes {info.channels}; name the encoder NiT was trained with")
    factor = scaling_factor if scaling_factor is not None else info.scaling_factor
    if factor is None:
        raise ValueError(f"encoder {encoder} records no scaling factor; give one with --scaling-factor")
    scaling = LatentScaling.scalar(factor, info.channels)
    height, width = (int(v) for v in train_size)
    unit = info.factor * config.patch_size
    if height < unit or width < unit:
        raise ValueError(f"train size {height}x{width}: each side must be at least one unit ({unit} px)")
    digest = file_sha256(path)
    run_info = {
        "config": None,
        "model": asdict(config),
        "data": {"encoder": asdict(info), "encoder_weights": getattr(decoder, "weights_id", ""), "dtype": "float32",
                 "normalization": scaling.record(), "patch_size": config.patch_size,
                 "max_latent_hw": [height // info.factor, width // info.factor], "catalogs": []},
        "imported": {"format": "NiT", "source": str(path.resolve()), "sha256": digest,
                     "skipped_keys": report.skipped, "train_size": [height, width]},
        "code_version": code_version(),
    }
    folder = save_checkpoint(out, 0, model=model, ema=None, state=None, run_info=run_info)
    return ImportSummary(run_dir=out, checkpoint=folder, config=config, scaling=scaling, report=report,
                         source_sha256=digest)


# -- init_from: a run that starts from another's weights ---------------------------------------------

def init_weights(model: NiT, ema: NiT, source: str | Path, identity: dict[str, Any]) -> dict[str, Any]:
    """Fill `model` and `ema` with the weights of checkpoint `source` (an nr run or checkpoint folder,
    trained or imported; EMA weights when it has them). Returns the record for run.json.

    Refused (CheckpointMismatchError) when the model config differs in anything the weights fix, or
    the data does not mean what the weights learned: another encoder, encoder weights, patch size, or
    normalisation mode or factor. The REPA projector is the one part allowed to differ: a source
    without one leaves the new run's projector as initialised; a source's projector is skipped when
    the new run has none. Per-channel statistics may differ (fine-tuning on other catalogs)."""
    where = f"init_from {source}"
    path = Path(source)
    if path.is_file():
        raise CheckpointMismatchError(f"{where}: a weights file, not an nr run; bring NiT's checkpoint in first with "
                                      f"`nr import nit-model {path} --out RUN` and set init_from = RUN")
    folder = resolve_checkpoint(path)
    weights = weights_file(folder, ema=True)
    info = verify_checkpoint(folder, [weights.name], use="sample")
    saved_model, saved_data = info.get("model"), info.get("data")
    if not isinstance(saved_model, dict) or not isinstance(saved_data, dict):
        raise CheckpointMismatchError(f"{where}: its run.json lacks the model config or data identity")
    mine = asdict(model.config)
    differ = [f"{k} {saved_model.get(k)!r} there, {mine[k]!r} here" for k in mine
              if k not in RUNTIME_FIELDS and saved_model.get(k) != mine[k]]
    if differ:
        raise CheckpointMismatchError(f"{where}: its model differs from this config's: {'; '.join(differ)}. Set "
                                      f"model, mlp and num_classes to match it (NiT-XL: model = \"XL\", "
                                      f"num_classes = 1000)")
    check_encoder(saved_data, identity, where=where)
    if saved_data.get("patch_size") != identity["patch_size"]:
        raise CheckpointMismatchError(f"{where}: patch size {saved_data.get('patch_size')} there, "
                                      f"{identity['patch_size']} here")
    check_normalization_mode(saved_data["normalization"], identity["normalization"], where=where)
    with_projector = model.projector is not None
    state = load_weights(folder, ema=True)
    report = load_state(model, state, ignore_extra=() if with_projector else ("projector.",),
                        allow_missing=("projector.",) if with_projector else (), origin=str(weights))
    ema.load_state_dict(model.state_dict())
    return {"path": str(folder), "step": info.get("step"), "weights": weights.name,
            "sha256": (info.get("checksums") or {}).get("files", {}).get(weights.name, {}).get("sha256"),
            "missing": report.missing, "skipped": report.skipped}


# model settings TrainConfig has no key for: a run that starts from weights takes them from the weights
INHERITED_FIELDS = ("rope_grid", "rope_theta", "qk_norm", "mlp_ratio")


def inherited_model_fields(source: str | Path) -> dict[str, Any]:
    """What a fine-tune of checkpoint `source` takes from its model: the fields TrainConfig does not
    set (NiT's RoPE grid above all) and the class count (unless the config sets num_classes)."""
    from nrtrain.checkpoint import read_run_info

    path = Path(source)
    if path.is_file():
        return {}  # refused with its fix by init_weights
    saved = read_run_info(path).get("model") or {}
    return {k: saved[k] for k in (*INHERITED_FIELDS, "num_classes") if k in saved}
