"""`nr train --ray-workers`: the same trainer under Ray Train on a local 2-CPU cluster."""

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
from nrtrain.train import TrainConfig, read_metrics  # noqa: E402


def test_two_ray_train_workers_train_and_checkpoint(tmp_path):
    from nrtrain.ray_train import train_on_ray

    manifest = make_manifest(channels=4)
    write_catalog(tmp_path / "cat", make_rows(40, manifest), manifest)
    write_pack_result(tmp_path / "packs.parquet", pack_catalogs([tmp_path / "cat"], max_tokens=160, epochs=2))
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        train_on_ray(TrainConfig(packs=str(tmp_path / "packs.parquet"), out=str(tmp_path / "run"), steps=4,
                                 workers=0, ckpt_every=2, log_every=2, tensorboard=False), workers=2)
    finally:
        ray.shutdown()
    assert resolve_checkpoint(tmp_path / "run").name == "step-00000004"
    assert read_run_info(tmp_path / "run")["world_size"] == 2
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [2, 4]
