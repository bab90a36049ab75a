"""`nr train` on a Ray cluster: Ray Train starts one worker per GPU (or CPU slot), sets up the
torch process group, and every worker runs the same `nrtrain.train.train` as under torchrun.

The run folder (`config.out`) must be on storage every worker can read and rank 0 can write (the
checkpoints are written there, not into Ray's storage), so `--resume` works the same way with or
without Ray.

A worker's exception reaches the caller as itself when it is bad input or a stopped run (ValueError,
FileNotFoundError, CheckpointMismatchError, NonFiniteLossError), so `nr train` reports it as it does
without Ray; any other failure becomes a RayTrainFailedError naming the worker's error.
"""

from __future__ import annotations

import os
from dataclasses import asdict

from nrdata.extras import require
from nrtrain.checkpoint import CheckpointMismatchError, resolve_checkpoint
from nrtrain.train import NonFiniteLossError, TrainConfig

# what the trainer raises for bad input or a run it stopped itself: the caller handles these by type
PASSED_THROUGH = (ValueError, FileNotFoundError, CheckpointMismatchError, NonFiniteLossError)


class RayTrainFailedError(RuntimeError):
    """A Ray Train run failed for another reason than bad input (a bug, a lost node, Ray itself)."""


def _worker(config: dict) -> None:
    import ray.train

    from nrtrain.train import train

    # train() places itself on LOCAL_RANK's GPU, as under torchrun
    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())
    train(TrainConfig(**config))


def train_on_ray(config: TrainConfig, *, workers: int, use_gpu: bool | None = None, address: str | None = None):
    """Run `config` on `workers` Ray Train workers; returns Ray's Result. Checkpoints land in config.out.
    Raises MissingExtraError when Ray Train is not installed (`pip install 'nr[ray-train]'`)."""
    require("ray.train")
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True, logging_level="WARNING")
    if use_gpu is None:
        use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    values = asdict(config)
    values["device"] = "cuda" if use_gpu else "cpu"
    trainer = TorchTrainer(_worker, train_loop_config=values,
                           scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu),
                           run_config=RunConfig(name=os.path.basename(os.path.abspath(config.out)),
                                                storage_path=os.path.abspath(os.path.join(config.out, "ray"))))
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps whatever the workers raised
        failure = _failure(exc, config.out)
        if failure is exc:
            raise
        raise failure from exc
    # some Ray versions (and the Tune path) hand the failure back instead of raising it
    if getattr(result, "error", None) is not None:
        raise _failure(result.error, config.out) from result.error
    return result


def _failure(exc: BaseException, out: str) -> BaseException:
    """The exception to raise for Ray's failure `exc`: the worker's own one when it is one of ours,
    `exc` itself when Ray did not wrap anything, else a one-line RayTrainFailedError."""
    rank, cause = _worker_error(exc)
    if cause is None and not _from_ray(exc):
        return exc
    if isinstance(cause, PASSED_THROUGH):
        return cause
    shown = cause if cause is not None else exc
    text = (str(shown).strip().splitlines() or [""])[0]
    who = f"worker rank {rank}" if rank is not None else "Ray Train"
    try:
        last = f"the last checkpoint is {resolve_checkpoint(out)}"
    except FileNotFoundError:
        last = f"no checkpoint was written to {out}"
    return RayTrainFailedError(
        f"the Ray Train run failed: {who} raised {type(shown).__name__}: {text} (the full traceback is in "
        f"Ray's worker logs, under /tmp/ray/session_latest/logs on that node); {last}")


def _worker_error(exc: BaseException) -> tuple[int | None, BaseException | None]:
    """The first exception a worker raised, and its rank if known, from Ray's wrappers around it:
    v2's WorkerGroupError.worker_failures / ControllerError.controller_failure and its traceback
    wrapper (`_base_exc`), v1's TrainingFailedError chained to a RayTaskError (`.cause`)."""
    seen: set[int] = set()
    todo: list[tuple[int | None, BaseException]] = [(None, exc)]
    while todo:
        rank, error = todo.pop(0)
        if id(error) in seen:
            continue
        seen.add(id(error))
        if error is not exc and not _from_ray(error):
            return rank, error
        inner: list[tuple[int | None, object]] = []
        failures = getattr(error, "worker_failures", None)
        if isinstance(failures, dict):
            inner += [(r, failures[r]) for r in sorted(failures)]
        inner += [(rank, getattr(error, name, None)) for name in ("controller_failure", "_base_exc", "cause")]
        inner.append((rank, error.__cause__))
        todo += [(r, e) for r, e in inner if isinstance(e, BaseException)]
    return None, None


def _from_ray(error: BaseException) -> bool:
    return type(error).__module__.split(".")[0] == "ray"
