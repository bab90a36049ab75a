"""Checkpoints: a folder per step that a person can open without nr.

    run/checkpoints/step-00001000/
        model.safetensors   the trained weights (NiT key names)
        ema.safetensors     the EMA weights, what sampling uses
        state.pt            optimizer, scheduler, step, loader cursor, RNG states (for --resume)
        run.json            the resolved config, the model config, the data identity, and the
                            checksums: sha256 and size of every other file, and of run.json's own
                            content (its keys less "checksums", as canonical JSON)
    run/checkpoints/latest  the name of the last complete checkpoint

A checkpoint is written into a temporary folder and renamed when complete, then `latest` is
replaced atomically, so a crash at any moment leaves the previous checkpoint intact and named.
A `step-*` folder is always complete: folders appear by renaming a finished one in and leave by
being renamed to a hidden `.del-` name before they are deleted. Re-saving a step that exists (a
re-run after a resume) first points `latest` at a hard-linked copy of the old folder (`.old-`), so
`latest` names a complete checkpoint at every instant; the next save cleans up what a crash left.

The checksums are written when the files are, and checked before a resume or a sample reads them,
so a flipped bit or a truncated file is named (with the newest other checkpoint that verifies)
instead of training or sampling from garbage. Checkpoints written before checksums existed load
without the check; a file of theirs that cannot be parsed is still named.

The data identity is what `nr train --resume` and `nr sample` check a catalog against: encoder,
factor, channels, stored quantity, the normalisation (its mode, and the statistics or the scaling
factor), and the largest training size (the sampler's RoPE extrapolation starts there).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nrdata.catalog.atomic import atomic_write_bytes, fsync_path

LATEST = "latest"
STEP_PREFIX = "step-"
# hidden names in checkpoints/, never pruned: a folder being written, a replaced step's stand-in, a
# folder being deleted
TMP_PREFIX = ".tmp-"
BACKUP_PREFIX = ".old-"
DISCARD_PREFIX = ".del-"
RUN_INFO = "run.json"
CHECKSUMS_KEY = "checksums"
HASH_CHUNK = 1 << 22


class CheckpointMismatchError(ValueError):
    """A checkpoint and the data (or config) it is used with do not belong together."""


class CheckpointDamagedError(ValueError):
    """A checkpoint file differs from what was saved (flipped bits, truncation) or cannot be parsed."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only folder); nothing partial was kept."""


def checkpoint_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def data_identity(catalogs, normalization, patch_size: int) -> dict[str, Any]:
    """What a model trained on these catalogs depends on (the first catalog's encoder; the pack
    merge already refused catalogs of different encoders). `normalization`: the run's
    `LatentScaling`, or a manifest's statistics (per-channel)."""
    manifest = catalogs[0].manifest
    sizes = [c.scan().select("latent_h", "latent_w").max().collect().row(0) for c in catalogs]
    return {
        "encoder": asdict(manifest.encoder),
        "encoder_weights": manifest.encoder_weights,  # content hash; "" for catalogs of manifest schema 1
        "dtype": manifest.dtype,
        "normalization": normalization_record(normalization),
        "patch_size": patch_size,
        "max_latent_hw": [max(int(h) for h, _ in sizes), max(int(w) for _, w in sizes)],
        "catalogs": [{"path": str(c.root), "fingerprint": c.manifest.fingerprint} for c in catalogs],
    }


def normalization_record(normalization) -> dict[str, Any]:
    if hasattr(normalization, "record"):
        return normalization.record()
    return {"mode": "per-channel", "scaling_factor": None, "mean": list(normalization.mean),
            "std": list(normalization.std), "count": normalization.count}


def check_data_identity(saved: dict[str, Any], current: dict[str, Any], *, where: str) -> None:
    """Refuse data whose latents mean something else than what the checkpoint was trained on."""
    check_encoder(saved, current, where=where)
    if saved.get("patch_size") != current.get("patch_size"):
        raise CheckpointMismatchError(
            f"{where}: trained on patch size {saved.get('patch_size')} but the data now has "
            f"{current.get('patch_size')}; use packs made for that patch size, or start a new run")
    check_normalization_mode(saved["normalization"], current["normalization"], where=where)
    if saved["normalization"].get("mode", "per-channel") == "scalar":
        return  # the factor decides; the catalogs' statistics play no part
    mean_a, mean_b = saved["normalization"]["mean"], current["normalization"]["mean"]
    std_a, std_b = saved["normalization"]["std"], current["normalization"]["std"]
    if len(mean_a) != len(mean_b) or any(abs(a - b) > 1e-4 * (1 + abs(a)) for a, b in zip(mean_a + std_a,
                                                                                       mean_b + std_b)):
        raise CheckpointMismatchError(
            f"{where}: the catalogs' normalisation (mean/std per channel) differs from the one the model was "
            "trained with; the model would see latents on another scale. Use the same catalogs (or re-pack "
            "them as they were), or start a new run")


# what a latent means; the source (a hub id or a local copy) and revision are where the weights were
# read from, and the weights' content hash says whether they are the same weights
LATENT_FIELDS = ("name", "factor", "channels", "quantity")


def check_encoder(saved: dict[str, Any], current: dict[str, Any], *, where: str) -> None:
    """The same kind of latent from the same weights. Without a weights hash on both sides (catalogs
    of manifest schema 1) the weights' source must match too."""
    encoder_a, encoder_b = saved.get("encoder") or {}, current.get("encoder") or {}
    fields = LATENT_FIELDS
    if not (saved.get("encoder_weights") and current.get("encoder_weights")):
        fields += ("source",)
    for key in fields:
        if encoder_a.get(key) != encoder_b.get(key):
            raise CheckpointMismatchError(
                f"{where}: trained on latents of encoder {key} {encoder_a.get(key)!r} but the data has "
                f"{encoder_b.get(key)!r}; use catalogs encoded the same way, or start a new run")
    check_encoder_weights(saved, current, where=where)


def check_encoder_weights(saved: dict[str, Any], current: dict[str, Any], *, where: str) -> None:
    weights_a, weights_b = saved.get("encoder_weights"), current.get("encoder_weights")
    if weights_a and weights_b and weights_a != weights_b:
        raise CheckpointMismatchError(
            f"{where}: trained on latents of encoder weights {weights_a} but the catalogs were encoded with "
            f"{weights_b}; use catalogs encoded with the same weights, or start a new run")


def check_normalization_mode(saved: dict[str, Any], current: dict[str, Any], *, where: str) -> None:
    """The same rule (per-channel or scalar) and, in scalar mode, the same factor."""
    mode_a, mode_b = saved.get("mode", "per-channel"), current.get("mode", "per-channel")
    factor_a, factor_b = saved.get("scaling_factor"), current.get("scaling_factor")
    if mode_a != mode_b:
        def shown(mode, factor):
            return f"scalar normalisation (z x {factor})" if mode == "scalar" else "per-channel normalisation"
        raise CheckpointMismatchError(
            f"{where}: the weights were trained with {shown(mode_a, factor_a)} but this run uses "
            f"{shown(mode_b, factor_b)}; the model would see latents on another scale. Set "
            f"normalization = \"{mode_a}\"{f' (scaling_factor = {factor_a})' if mode_a == 'scalar' else ''} "
            "in the training config")
    if mode_a == "scalar" and abs(float(factor_a) - float(factor_b)) > 1e-6 * abs(float(factor_a)):
        raise CheckpointMismatchError(
            f"{where}: the weights were trained with latents scaled by {factor_a} but this run scales by "
            f"{factor_b}; set scaling_factor = {factor_a} in the training config")


def save_checkpoint(run_dir: Path, step: int, *, model: torch.nn.Module, ema: torch.nn.Module | None,
                    state: dict[str, Any] | None, run_info: dict[str, Any], keep: int | None = None,
                    keep_every: int | None = None) -> Path:
    """Write checkpoint `step` completely, then point `latest` at it. Returns its folder.
    `state` None writes no state.pt: weights to sample or start from, not a run to resume (an import).

    Older checkpoints beyond the last `keep` are removed, except milestones: steps that are a
    multiple of `keep_every`.

    A failed write (CheckpointWriteError, naming the file) removes what it had written, so the
    folder holds the checkpoints it held before and `latest` still names a complete one."""
    root = Path(run_dir) / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    writing = root
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        writing = tmp / "model.safetensors"
        save_file(_cpu_state(model), str(writing))
        if ema is not None:
            writing = tmp / "ema.safetensors"
            save_file(_cpu_state(ema), str(writing))
        if state is not None:
            writing = tmp / "state.pt"
            torch.save(state, writing)
        writing = tmp / RUN_INFO
        # hashed from the files as written: a later change to any byte of them is caught at load time
        files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                 for p in sorted(tmp.iterdir()) if p.name != RUN_INFO}
        info = json.loads(json.dumps({**run_info, "step": step}, default=str))
        info[CHECKSUMS_KEY] = {"algorithm": "sha256", "files": files, RUN_INFO: _run_info_sha256(info)}
        writing.write_text(json.dumps(info, indent=2) + "\n")
        for path in tmp.iterdir():
            fsync_path(path)
        fsync_path(tmp)
        writing = final
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
        writing = root / LATEST
        _point_latest(root, final.name)
    except (OSError, SafetensorError, RuntimeError) as exc:
        # torch.save reports a full disk as RuntimeError, safetensors as SafetensorError
        if isinstance(exc, RuntimeError) and not _is_write_failure(exc):
            raise
        _remove_temporaries(root, tmp)
        shown = final / writing.name if writing.parent == tmp else writing
        named = _latest_name(root) if root.is_dir() else None
        then = ("continue with --resume" if named else
                "start the run again with --overwrite (it has no checkpoint to resume from)")
        raise CheckpointWriteError(
            f"cannot write checkpoint file {shown}: {_reason(exc)}; the partial files were removed and "
            f"{root / LATEST} names {root / named if named else 'no checkpoint yet'}. Free space or make "
            f"{root} writable, then {then}") from exc
    _clean_leftovers(root)
    if keep:
        for old in sorted(root.glob(f"{STEP_PREFIX}*"))[:-keep]:
            if old != final and not _milestone(old.name, keep_every):
                _discard(old)
    return final


def _milestone(name: str, keep_every: int | None) -> bool:
    step = name.removeprefix(STEP_PREFIX)
    return bool(keep_every) and step.isdigit() and int(step) % keep_every == 0


def _is_write_failure(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc.__cause__ or exc.__context__, OSError) or any(
        word in text for word in ("no space", "read-only", "permission", "file write failed", "errno"))


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} (errno {exc.errno})"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _remove_temporaries(root: Path, tmp: Path) -> None:
    """What a failed save leaves: its folder being written, and a `latest` that was never put in place."""
    shutil.rmtree(tmp, ignore_errors=True)
    for leftover in root.glob(f"{TMP_PREFIX}*"):
        if leftover.is_file():
            leftover.unlink(missing_ok=True)


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
    if (path / RUN_INFO).is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / LATEST
        if latest.is_file():
            found = root / latest.read_text().strip()
            if (found / RUN_INFO).is_file():
                return found
            complete = [p for p in sorted(root.glob(f"{STEP_PREFIX}*")) if (p / RUN_INFO).is_file()]
            hint = (f"the newest complete one there is {complete[-1]}: pass it, or write "
                    f"'{complete[-1].name}' into {latest}" if complete else
                    "no complete step-* folder is left there; start a new run")
            raise FileNotFoundError(f"{latest} names {found.name}, which is not a complete checkpoint "
                                    f"(no {found / RUN_INFO}); {hint}")
    raise FileNotFoundError(f"{path}: no checkpoint here (expected a folder with run.json, or a run folder "
                            f"with checkpoints/{LATEST})")


# -- checksums ---------------------------------------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _run_info_sha256(info: dict[str, Any]) -> str:
    """run.json's own checksum: its content less the checksums, as canonical JSON (a JSON round trip
    of parsed values is exact, so indentation and key order do not matter)."""
    rest = {k: v for k, v in info.items() if k != CHECKSUMS_KEY}
    return hashlib.sha256(json.dumps(rest, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _parse_run_info(folder: Path, use: str) -> dict[str, Any]:
    path = folder / RUN_INFO
    try:
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise CheckpointDamagedError(_damaged(path, f"cannot be parsed ({exc})", use)) from None
    sums = info.get(CHECKSUMS_KEY)
    if sums is not None and (not isinstance(sums, dict) or sums.get(RUN_INFO) != _run_info_sha256(info)):
        raise CheckpointDamagedError(_damaged(path, "does not match the hash written when it was saved (damaged, or "
                                                    f"edited by hand: then delete its \"{RUN_INFO}\" entry under "
                                                    f"\"{CHECKSUMS_KEY}\")", use))
    return info


def checkpoint_files(info: dict[str, Any]) -> dict[str, dict[str, Any]] | None:
    """{file name: {sha256, bytes}} recorded in a run.json; None for a checkpoint saved without them."""
    sums = info.get(CHECKSUMS_KEY)
    return sums.get("files") if isinstance(sums, dict) else None


def verify_checkpoint(checkpoint: str | Path, names: list[str] | None = None, *, use: str = "resume",
                      digests: dict[str, str] | None = None) -> dict[str, Any]:
    """Check run.json and the files `names` (default: every file recorded) against the checksums
    written at save time; returns the run info. `digests` are sha256s already computed by the caller
    (one read of a file serves both the check and its provenance). Raises CheckpointDamagedError
    naming the file and the newest other checkpoint that verifies. `use`: "resume" or "sample", for
    the hint. A checkpoint saved without checksums passes unchecked."""
    folder = resolve_checkpoint(checkpoint)
    info = _parse_run_info(folder, use)
    recorded = checkpoint_files(info)
    if recorded is None:
        return info
    for name in names if names is not None else sorted(recorded):
        problem = _file_problem(folder / name, recorded.get(name), (digests or {}).get(name))
        if problem:
            raise CheckpointDamagedError(_damaged(folder / name, problem, use))
    return info


def _file_problem(path: Path, record: dict[str, Any] | None, digest: str | None) -> str | None:
    if record is None:
        return None  # not recorded: an optional file (ema) the save did not write
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if size != record.get("bytes"):
        return (f"is {size:,} bytes but was {record.get('bytes'):,} when saved: it does not match what was written "
                "(truncated or damaged)")
    if (digest or file_sha256(path)) != record.get("sha256"):
        return "does not match the hash written when it was saved (damaged or truncated)"
    return None


def previous_good_checkpoint(damaged: Path, names: list[str] | None = None) -> Path | None:
    """The newest other complete step folder next to `damaged` whose files verify (or that was saved
    without checksums and whose run.json parses): what to use instead."""
    damaged = Path(damaged)
    root = damaged.parent
    for folder in sorted(root.glob(f"{STEP_PREFIX}*"), reverse=True):
        if folder == damaged or not (folder / RUN_INFO).is_file():
            continue
        try:
            info = _parse_run_info(folder, "resume")
            recorded = checkpoint_files(info) or {}
            wanted = names if names is not None else sorted(recorded)
            if any(_file_problem(folder / n, recorded.get(n), None) for n in wanted):
                continue
        except (CheckpointDamagedError, OSError):
            continue
        return folder
    return None


def _damaged(path: Path, problem: str, use: str) -> str:
    folder = path.parent
    needed = ["model.safetensors", "ema.safetensors", "state.pt"] if use == "resume" else None
    good = previous_good_checkpoint(folder, needed)
    if good is None:
        instead = "no other checkpoint there verifies: restore the file from a copy, or start a new run"
    elif use == "sample":
        instead = f"sample from {good} instead, or restore the file"
    else:
        instead = (f"resume from {good} (write '{good.name}' into {good.parent / LATEST}) or restore the file")
    return f"{path} {problem}; {instead}"


# -- reading -------------------------------------------------------------------------------------------

def read_run_info(checkpoint: str | Path) -> dict[str, Any]:
    folder = resolve_checkpoint(checkpoint)
    return _parse_run_info(folder, "resume")


def weights_file(checkpoint: str | Path, *, ema: bool = True) -> Path:
    """The safetensors file a load with `ema` reads (EMA weights when saved and asked for)."""
    folder = resolve_checkpoint(checkpoint)
    return folder / ("ema.safetensors" if ema and (folder / "ema.safetensors").is_file() else "model.safetensors")


def load_weights(checkpoint: str | Path, *, ema: bool = True, use: str = "resume") -> dict[str, torch.Tensor]:
    path = weights_file(checkpoint, ema=ema)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:  # a file cut short or overwritten, unchecked
        raise CheckpointDamagedError(_damaged(path, f"cannot be read ({_reason(exc)}; damaged or truncated)",
                                              use)) from None


def load_model(checkpoint: str | Path, *, ema: bool = True, device: str | torch.device = "cpu",
               use: str = "sample", ignore_extra: Sequence[str] = (),
               **overrides) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The NiT of a checkpoint (EMA weights by default) in eval mode, and its run info. Every tensor
    must load (`load_state`); `ignore_extra` names prefixes of checkpoint keys to skip."""
    from nrtrain.model import NiT, NiTConfig

    info = read_run_info(checkpoint)
    config = NiTConfig(**{**info["model"], **overrides})
    model = NiT.from_config(config)
    load_state(model, load_weights(checkpoint, ema=ema, use=use), ignore_extra=ignore_extra,
               origin=str(weights_file(checkpoint, ema=ema)))
    return model.to(device).eval(), info


@dataclass(frozen=True)
class LoadReport:
    loaded: list[str]  # model keys filled from the checkpoint
    missing: list[str]  # model keys the checkpoint lacks, left as the model initialised them (allowed ones)
    skipped: list[str]  # checkpoint keys the model has no place for, skipped on request


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], *, ignore_extra: Sequence[str] = (),
               allow_missing: Sequence[str] = (), origin: str = "checkpoint") -> LoadReport:
    """Load `state` into `model`; returns what was loaded, left missing and skipped.

    Checkpoint keys the model lacks are refused unless they start with a prefix in `ignore_extra`
    (e.g. "projector." for NiT's REPA projector); model keys the checkpoint lacks are refused unless
    they start with one in `allow_missing`. A refusal (CheckpointMismatchError) lists every key that
    is missing, extra or of another shape, and loads nothing."""
    expected = model.state_dict()
    extra = sorted(k for k in state if k not in expected)
    skipped = [k for k in extra if k.startswith(tuple(ignore_extra))] if ignore_extra else []
    unexpected = [k for k in extra if k not in skipped]
    absent = sorted(k for k in expected if k not in state)
    missing = [k for k in absent if allow_missing and k.startswith(tuple(allow_missing))]
    refused_missing = [k for k in absent if k not in missing]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if refused_missing or unexpected or mismatched:
        problems = [f"missing from the checkpoint: {_listed(refused_missing)}" if refused_missing else "",
                    f"not in the model: {_listed(unexpected)} (skip them on request: ignore_extra=[prefix, ...])"
                    if unexpected else "",
                    f"shape mismatch: {_listed(mismatched)}" if mismatched else ""]
        raise CheckpointMismatchError(f"{origin} does not fit the model: " + "; ".join(p for p in problems if p))
    wanted = {k: v for k, v in state.items() if k in expected}
    model.load_state_dict(wanted, strict=False)
    return LoadReport(loaded=sorted(wanted), missing=missing, skipped=skipped)


def _listed(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_training_state(checkpoint: str | Path) -> dict[str, Any]:
    path = resolve_checkpoint(checkpoint) / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - unpickling a cut-short file fails in many ways (EOFError, RuntimeError, ...)
        raise CheckpointDamagedError(_damaged(path, f"cannot be read ({type(exc).__name__}: {_reason(exc)}; "
                                                    "damaged or truncated)", "resume")) from None
