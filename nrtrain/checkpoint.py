"""Checkpoints: a folder per step that a person can open without nr.

    run/checkpoints/step-00001000/
        model.safetensors   the trained weights (NiT key names)
        ema.safetensors     the EMA weights, what sampling uses
        state.pt            optimizer, scheduler, step, loader cursor, RNG states (for --resume)
        run.json            the resolved config, the model config, and the data identity
    run/checkpoints/latest  the name of the last complete checkpoint

A checkpoint is written into a temporary folder and renamed when complete, then `latest` is
replaced atomically, so a crash at any moment leaves the previous checkpoint intact and named.
A `step-*` folder is always complete: folders appear by renaming a finished one in and leave by
being renamed to a hidden `.del-` name before they are deleted. Re-saving a step that exists (a
re-run after a resume) first points `latest` at a hard-linked copy of the old folder (`.old-`), so
`latest` names a complete checkpoint at every instant; the next save cleans up what a crash left.

The data identity is what `nr train --resume` and `nr sample` check a catalog against: encoder,
factor, channels, stored quantity, normalisation statistics, and the largest training size (the
sampler's RoPE extrapolation starts there).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from nrdata.catalog.atomic import atomic_write_bytes, fsync_path

LATEST = "latest"
STEP_PREFIX = "step-"
# hidden names in checkpoints/, never pruned: a folder being written, a replaced step's stand-in, a
# folder being deleted
TMP_PREFIX = ".tmp-"
BACKUP_PREFIX = ".old-"
DISCARD_PREFIX = ".del-"


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
    tmp = root / f"{TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file(_cpu_state(model), str(tmp / "model.safetensors"))
    if ema is not None:
        save_file(_cpu_state(ema), str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    (tmp / "run.json").write_text(json.dumps({**run_info, "step": step}, indent=2, default=str) + "\n")
    for path in tmp.iterdir():
        fsync_path(path)
    fsync_path(tmp)
    if final.exists():  # a re-run of the same step after a resume: replace it whole
        # `latest` may name `final`; it must name a complete folder while `final` is away
        backup = root / _hidden_name(BACKUP_PREFIX, final.name)
        shutil.copytree(final, backup, copy_function=_link_or_copy)
        fsync_path(backup)
        fsync_path(root)
        if _latest_name(root) == final.name:
            _point_latest(root, backup.name)
        _discard(final)
    tmp.rename(final)
    fsync_path(root)
    _point_latest(root, final.name)
    _clean_leftovers(root)
    if keep:
        for old in sorted(root.glob(f"{STEP_PREFIX}*"))[:-keep]:
            if old != final:
                _discard(old)
    return final


def _hidden_name(prefix: str, name: str) -> str:
    # unique, so a leftover of an earlier crash never collides
    return f"{prefix}{uuid.uuid4().hex[:8]}-{name}"


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)  # the files are never written in place, so sharing them is safe and free
    except OSError:  # a filesystem without hard links
        shutil.copy2(src, dst)
    return dst


def _latest_name(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip()
    except FileNotFoundError:
        return None


def _point_latest(root: Path, name: str) -> None:
    atomic_write_bytes(root / LATEST, (name + "\n").encode())


def _discard(folder: Path) -> None:
    """Delete a folder so that a crash midway never leaves a partial folder under its own name."""
    doomed = folder.with_name(_hidden_name(DISCARD_PREFIX, folder.name))
    try:
        folder.rename(doomed)
    except FileNotFoundError:  # already gone: pruning never fails a run
        return
    fsync_path(folder.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def _clean_leftovers(root: Path) -> None:
    """Remove what an interrupted save left; called once `latest` names a fresh checkpoint, so
    nothing hidden is named. A backup whose step folder is gone was the only copy: it goes back."""
    named = _latest_name(root)
    for path in sorted(root.glob(f"{DISCARD_PREFIX}*")) + sorted(root.glob(f"{TMP_PREFIX}*")):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:  # a `latest` that was never put in place
            path.unlink(missing_ok=True)
    for backup in sorted(root.glob(f"{BACKUP_PREFIX}*")):
        if backup.name == named:
            continue
        original = root / backup.name[len(BACKUP_PREFIX) + 9:]
        if original.name.startswith(STEP_PREFIX) and not original.exists() and (backup / "run.json").is_file():
            backup.rename(original)
            fsync_path(root)
        else:
            shutil.rmtree(backup, ignore_errors=True)


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
            complete = [p for p in sorted(root.glob(f"{STEP_PREFIX}*")) if (p / "run.json").is_file()]
            hint = (f"the newest complete one there is {complete[-1]}: pass it, or write "
                    f"'{complete[-1].name}' into {latest}" if complete else
                    "no complete step-* folder is left there; start a new run")
            raise FileNotFoundError(f"{latest} names {found.name}, which is not a complete checkpoint "
                                    f"(no {found / 'run.json'}); {hint}")
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
