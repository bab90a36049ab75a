"""The run folder `nr train` writes into: what may already be there (refused, resumed or overwritten,
never mixed), the checks made before any data is read, and the metrics log with its loss plot."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Any

from nrdata.catalog.atomic import atomic_write_bytes
from nrdata.extras import available, missing_notice
from nrtrain.checkpoint import resolve_checkpoint, verify_checkpoint
from nrtrain.config import TrainConfig


# what `train` writes into its out folder; any of them there means a run was started in it
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "config.json", "loss.png")


# a run that stopped before its first logged step leaves only these: nothing of it could mix with another
SETUP_OUTPUTS = ("config.json", "loss.png")


def previous_run(out: Path) -> list[str]:
    """The outputs of an earlier run present in `out`, by name; empty when it left only SETUP_OUTPUTS."""
    found = [name for name in RUN_OUTPUTS if (out / name).exists()]
    return found if set(found) - set(SETUP_OUTPUTS) else []


def check_run_folder(out: Path, config: TrainConfig) -> None:
    """Refuse to start a run where another one lives (their checkpoints and metrics would mix) unless
    the config resumes it or overwrites it."""
    found = previous_run(out)
    if not found or config.resume or config.overwrite:
        return
    try:
        checkpoint = resolve_checkpoint(out)
    except FileNotFoundError:
        checkpoint = None
    if checkpoint is not None:
        what = f"continue it from {checkpoint} with --resume, or start over with --overwrite"
    else:
        what = "it has no checkpoint to resume from: start over with --overwrite"
    raise ValueError(f"{out} already holds a run ({', '.join(found)}); {what} (deletes its checkpoints, metrics "
                     "and TensorBoard logs), or choose another --out")


def remove_previous_run(out: Path) -> list[str]:
    """Delete an earlier run's outputs (for `overwrite`); each is renamed aside first, so a crash midway
    never leaves a half-deleted checkpoints folder that looks like a run. Returns what was removed."""
    found = previous_run(out)
    for name in found:
        doomed = out / f".overwritten-{uuid.uuid4().hex[:8]}-{name}"
        (out / name).rename(doomed)
        if doomed.is_dir():
            shutil.rmtree(doomed)
        else:
            doomed.unlink()
    return found


def truncate_metrics(out: Path, step: int) -> None:
    """Keep the metrics records up to `step` (the checkpoint a resume starts from), so the steps the
    resumed run logs again are not there twice; a line cut short by a crash goes too. Atomic."""
    path = out / "metrics.jsonl"
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


def check_has_rows(packs: str) -> None:
    """Refuse packs without a single pack, or built from catalogs without rows, in one clear line
    (from the packs file's footer alone)."""
    from nrdata.packing.packs_file import packs_summary

    if not Path(packs).is_file():
        return  # the loader says how to make one
    packs_count, catalogs = packs_summary(packs)
    empty = [c.get("path", "?") for c in catalogs if c.get("rows") == 0]
    if catalogs and len(empty) == len(catalogs):
        raise ValueError(f"{packs}: its catalog{'s' if len(empty) > 1 else ''} {', '.join(empty)} had no rows when "
                         "packed, so there is nothing to train on; see why images failed with `nr catalog errors "
                         "CATALOG`, fix or encode them, then `nr pack` again")
    if packs_count == 0:
        raise ValueError(f"{packs}: the packs file holds no packs (no rows to train on); `nr pack` the catalogs "
                         "again and check its report")


def preflight(out: Path, config: TrainConfig) -> tuple[Path | None, dict[str, Any] | None]:
    """The checks a run makes before reading data: the out folder, the packs, and (resuming) the
    checkpoint's files against their hashes and its step against config.steps. Returns the checkpoint
    to resume and its run info (None, None when not resuming)."""
    check_run_folder(out, config)
    check_has_rows(config.packs)
    if not config.resume:
        return None, None
    checkpoint = resolve_checkpoint(out)
    saved = verify_checkpoint(checkpoint, use="resume")  # every file against its saved hash
    if config.steps < int(saved.get("step", 0)):
        raise ValueError(f"config steps = {config.steps} is below step {saved['step']} of the checkpoint "
                         f"{checkpoint}; steps counts from the start of the run: pass --steps above "
                         f"{saved['step']} to train further")
    return checkpoint, saved


def tensorboard_notice(config: TrainConfig) -> str | None:
    """One line when `config` asks for TensorBoard logs (the default) and TensorBoard is not installed."""
    if config.tensorboard and not available("torch.utils.tensorboard"):
        return (missing_notice("torch.utils.tensorboard", skipped="TensorBoard logging")
                + " (or --set tensorboard=false)")
    return None


def run_notices(config: TrainConfig) -> list[str]:
    """One line for each output of a run with `config` that will be skipped because its optional
    dependency is missing (TensorBoard events, loss.png); the CLI prints them before training."""
    notices = [tensorboard_notice(config)]
    if not available("matplotlib"):
        notices.append(missing_notice("matplotlib", skipped="loss.png"))
    return [notice for notice in notices if notice]


class MetricsLog:
    """metrics.jsonl (always) and TensorBoard (when asked for and installed: `run_notices` says when
    not), written by rank 0."""

    def __init__(self, out: Path, tensorboard: bool, resumed_step: int | None = None) -> None:
        self.path = out / "metrics.jsonl"
        self.board = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                pass  # reported once, before training, by run_notices
            else:
                # a resumed run purges the events logged after its checkpoint, as metrics.jsonl is truncated
                self.board = SummaryWriter(str(out / "tensorboard"),
                                           purge_step=None if resumed_step is None else resumed_step + 1)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.board.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.board is not None:
            self.board.close()


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def plot_loss(out: str | Path) -> Path | None:
    """loss.png next to metrics.jsonl: the logged loss against the step. None when nothing is logged
    yet or matplotlib is not installed (an incidental plot; `run_notices` reports it)."""
    records = read_metrics(out)
    if not records or not available("matplotlib"):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path
