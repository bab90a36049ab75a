"""Checkpoints: a folder per step that a person can open without nr.

    run/checkpoints/step-00001000/
        model.safetensors   the trained weights (NiT key names)
        ema.safetensors     the EMA weights, what sampling uses
        state.pt            optimizer, scheduler, step, loader cursor, RNG states (for --resume)
        run.json            the resolved config, the model config, and the data identity
    run/checkpoints/latest  the name of the last complete checkpoint

A checkpoint is written into a temporary folder and renamed when complete, then `latest` is
replaced atomically, so a crash at any moment leaves the previous checkpoint intact and named.

The data identity is what `nr train --resume` and `nr sample` check a catalog against: encoder,
factor, channels, stored quantity, normalisation statistics, and the largest training size (the
sampler's RoPE extrapolation starts there).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nrdata.catalog.atomic import atomic_write_bytes, fsync_path

LATEST = "latest"
STEP_PREFIX = "step-"


class CheckpointMismatchError(ValueError):
    """A checkpoint and the data (or config) it is used with do not belong together."""


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def data_identity(catalogs, normalization, patch_size: int) -> dict[str, Any]:
    """What a model trained on these catalogs depends on (the first catalog's encoder; the pack
    merge already refused catalogs of different encoders)."""
    manifest = catalogs[0].manifest
    sizes = [c.scan().select("latent_h", "latent_w").max().collect().row(0) for c in catalogs]
    return {
        "encoder": asdict(manifest.encoder),
        "dtype": manifest.dtype,
        "normalization": {"mean": list(normalization.mean), "std": list(normalization.std),
                          "count": normalization.count},
        "patch_size": patch_size,
        "max_latent_hw": [max(int(h) for h, _ in sizes), max(int(w) for _, w in sizes)],
        "catalogs": [{"path": str(c.root), "fingerprint": c.manifest.fingerprint} for c in catalogs],
    }


def check_data_identity(saved: dict[str, Any], current: dict[str, Any], *, where: str) -> None:
    """Refuse data whose latents mean something else than what the checkpoint was trained on."""
    for key, label in (("encoder", "encoder"), ("patch_size", "patch size")):
        if saved.get(key) != current.get(key):
            raise CheckpointMismatchError(
                f"{where}: trained on {label} {saved.get(key)} but the data now has {current.get(key)}; "
                "use catalogs encoded the same way, or start a new run")
    mean_a, mean_b = saved["normalization"]["mean"], current["normalization"]["mean"]
    std_a, std_b = saved["normalization"]["std"], current["normalization"]["std"]
    if len(mean_a) != len(mean_b) or any(abs(a - b) > 1e-4 * (1 + abs(a)) for a, b in zip(mean_a + std_a,
                                                                                       mean_b + std_b)):
        raise CheckpointMismatchError(
            f"{where}: the catalogs' normalisation (mean/std per channel) differs from the one the model was "
            "trained with; the model would see latents on another scale. Use the same catalogs (or re-pack "
            "them as they were), or start a new run")


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, ema: torch.nn.Module | None,
                    state: dict[str, Any], run_info: dict[str, Any], keep: int | None = None) -> Path:
    """Write checkpoint `step` completely, then point `latest` at it. Returns its folder."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_cpu_state(model), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(_cpu_state(ema), str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "run.json").write_text(json.dumps({**run_info, "step": step}, indent=2, default=str) + "\n")
    for path in tmp.iterdir():
        fsync_path(path)
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_path(root)
    atomic_write_bytes(root / LATEST, (final.name + "\n").encode())
    if keep:
        for old in sorted(root.glob(f"{STEP_PREFIX}*"))[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(module, "_orig_mod", module)  # torch.compile wrapper
    module = getattr(module, "module", module)  # DDP wrapper
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from itself, a run folder, or a run's checkpoints folder (via `latest`)."""
    path = Path(path)
    if (path / "run.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / LATEST
        if latest.is_file():
            found = root / latest.read_text().strip()
            if (found / "run.json").is_file():
                return found
            raise FileNotFoundError(f"{latest} names {found.name}, which is not a complete checkpoint")
    raise FileNotFoundError(f"{path}: no checkpoint here (expected a folder with run.json, or a run folder "
                            f"with checkpoints/{LATEST})")


def read_run_info(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((resolve_checkpoint(checkpoint) / "run.json").read_text())


def load_weights(checkpoint: str | Path, *, ema: bool = True) -> dict[str, torch.Tensor]:
    folder = resolve_checkpoint(checkpoint)
    name = "ema.safetensors" if ema and (folder / "ema.safetensors").is_file() else "model.safetensors"
    return load_file(str(folder / name))


def load_model(checkpoint: str | Path, *, ema: bool = True, device: str | torch.device = "cpu",
               **overrides) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The NiT of a checkpoint (EMA weights by default) in eval mode, and its run info."""
    from nrtrain.model import NiT, NiTConfig

    info = read_run_info(checkpoint)
    config = NiTConfig(**{**info["model"], **overrides})
    model = NiT.from_config(config)
    model.load_state_dict(load_weights(checkpoint, ema=ema), strict=True)
    return model.to(device).eval(), info


def load_training_state(checkpoint: str | Path) -> dict[str, Any]:
    return torch.load(resolve_checkpoint(checkpoint) / "state.pt", map_location="cpu", weights_only=False)
