"""`nr train` on a Ray cluster: Ray Train starts one worker per GPU (or CPU slot), sets up the
torch process group, and every worker runs the same `nrtrain.train.train` as under torchrun.

The run folder (`config.out`) must be on storage every worker can read and rank 0 can write (the
checkpoints are written there, not into Ray's storage), so `--resume` works the same way with or
without Ray.
"""

from __future__ import annotations

import os
from dataclasses import asdict

from nrtrain.train import TrainConfig


def _worker(config: dict) -> None:
    import ray.train

    from nrtrain.train import train

    # train() places itself on LOCAL_RANK's GPU, as under torchrun
    os.environ["LOCAL_RANK"] = str(ray.train.get_context().get_local_rank())
    train(TrainConfig(**config))


def train_on_ray(config: TrainConfig, *, workers: int, use_gpu: bool | None = None, address: str | None = None):
    """Run `config` on `workers` Ray Train workers; returns Ray's Result. Checkpoints land in config.out."""
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
    return trainer.fit()
