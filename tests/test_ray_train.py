"""`nr train --ray-workers`: the same trainer under Ray Train on a local 2-CPU cluster, and a worker's
failure reported by the CLI as one line, as without Ray."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

sys.path.insert(0, str(Path(__file__).parent))
from catalog_factory import make_manifest, make_rows, write_catalog  # noqa: E402

from nrdata.packing.catalog_packs import pack_catalogs, write_pack_result  # noqa: E402
from nrtrain.checkpoint import read_run_info, resolve_checkpoint  # noqa: E402
from nrtrain.ray_train import RayTrainFailedError, train_on_ray  # noqa: E402
from nrtrain.train import NonFiniteLossError, TrainConfig, read_metrics  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    """One local cluster for the module: starting Ray is most of these tests' time."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_two_ray_train_workers_train_and_checkpoint(tmp_path, cluster):
    manifest = make_manifest(channels=4)
    write_catalog(tmp_path / "cat", make_rows(40, manifest), manifest)
    write_pack_result(tmp_path / "packs.parquet", pack_catalogs([tmp_path / "cat"], max_tokens=160, epochs=2))
    train_on_ray(TrainConfig(packs=str(tmp_path / "packs.parquet"), out=str(tmp_path / "run"), steps=4,
                             workers=0, ckpt_every=2, log_every=2, tensorboard=False), workers=2)
    assert resolve_checkpoint(tmp_path / "run").name == "step-00000004"
    assert read_run_info(tmp_path / "run")["world_size"] == 2
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [2, 4]


def test_a_worker_failure_is_one_error_line_from_the_cli(tmp_path, cluster):
    from typer.testing import CliRunner

    from cli import app

    # the driver only checks that the file exists; the workers are the first to read it
    (tmp_path / "packs.parquet").write_text("not a parquet file\n")
    result = CliRunner().invoke(app, ["train", "--packs", str(tmp_path / "packs.parquet"), "--out",
                                      str(tmp_path / "run"), "--model", "tiny", "--steps", "2",
                                      "--set", "workers=0", "--set", "tensorboard=false", "--ray-workers", "1"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Parquet" in lines[0], result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


# Ray's wrappers, built by hand: every Ray version and path (raised or returned) without a cluster


def _v2_worker_group_error(failures: dict):
    from ray.train.v2.api.exceptions import WorkerGroupError

    return WorkerGroupError("[Rank 0 Error Snippet]:\nTraceback (most recent call last):\n  ...", failures)


def test_the_workers_own_error_comes_back_when_it_is_ours(tmp_path):
    from ray.exceptions import RayTaskError
    from ray.train.base_trainer import TrainingFailedError
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback

    from nrtrain.ray_train import _failure

    bad = ValueError("packs.parquet: not a packs file")
    assert _failure(_v2_worker_group_error({1: KeyError("x"), 0: bad}), str(tmp_path)) is bad
    stopped = NonFiniteLossError("step 3: the loss is nan")
    wrapped = _v2_worker_group_error({0: UserExceptionWithTraceback(stopped, "Traceback ...")})
    assert _failure(wrapped, str(tmp_path)) is stopped
    missing = FileNotFoundError("catalog.json")
    try:  # Ray Train v1: TrainingFailedError chained to the task error that wraps the worker's
        raise TrainingFailedError("The Ray Train run failed.") from RayTaskError(
            "train_fn", "Traceback ...", missing).as_instanceof_cause()
    except TrainingFailedError as exc:
        assert _failure(exc, str(tmp_path)) is missing
    plain = ValueError("num_workers must be positive")  # raised by Ray's own checks, not wrapped
    assert _failure(plain, str(tmp_path)) is plain


def test_any_other_worker_failure_is_one_line_naming_it(tmp_path):
    from ray.train.v2.api.exceptions import ControllerError

    from nrtrain.ray_train import _failure

    failure = _failure(_v2_worker_group_error({0: KeyError("latent_h"), 1: KeyError("latent_h")}), str(tmp_path))
    assert isinstance(failure, RayTrainFailedError) and "\n" not in str(failure)
    assert "worker rank 0 raised KeyError: 'latent_h'" in str(failure)
    assert "Ray's worker logs" in str(failure) and f"no checkpoint was written to {tmp_path}" in str(failure)
    controller = _failure(ControllerError(TimeoutError("placement group not ready\nmore")), str(tmp_path))
    assert isinstance(controller, RayTrainFailedError) and "\n" not in str(controller)
    assert "TimeoutError: placement group not ready" in str(controller)


def test_a_failure_returned_in_the_result_is_raised(tmp_path, monkeypatch):
    import ray.train.torch

    class Result:
        error = _v2_worker_group_error({0: ValueError("bad value")})

    class Trainer:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            return Result()

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2})
    monkeypatch.setattr(ray.train.torch, "TorchTrainer", Trainer)
    with pytest.raises(ValueError, match="bad value"):
        train_on_ray(TrainConfig(packs="p.parquet", out=str(tmp_path / "run")), workers=2)
