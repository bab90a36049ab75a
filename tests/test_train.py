"""The trainer on CPU: it learns, it resumes exactly, it stops on a non-finite loss with the last good
checkpoint intact, DDP ranks see disjoint packs and keep identical weights, and it refuses data the
checkpoint was not trained on."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
from catalog_factory import make_manifest, make_rows, write_catalog  # noqa: E402

from nrdata.catalog import LatentRow  # noqa: E402
from nrdata.packing.catalog_packs import pack_catalogs, write_pack_result  # noqa: E402
from nrtrain.checkpoint import CheckpointMismatchError, load_weights, read_run_info, resolve_checkpoint  # noqa: E402
from nrtrain.train import NonFiniteLossError, TrainConfig, load_config, parse_override, read_metrics, train  # noqa: E402


def _packs(root: Path, rows: int, max_tokens: int, *, seed: int = 0, channels: int = 4, epochs: int = 2) -> str:
    manifest = make_manifest(channels=channels)
    write_catalog(root / "cat", make_rows(rows, manifest, seed=seed), manifest)
    result = pack_catalogs([root / "cat"], max_tokens=max_tokens, epochs=epochs, seed=seed)
    write_pack_result(root / "packs.parquet", result)
    return str(root / "packs.parquet")


def _config(packs: str, out: Path, **kw) -> TrainConfig:
    base = dict(packs=packs, out=str(out), model="tiny", steps=8, lr=1e-3, workers=0, log_every=2,
                ckpt_every=4, ema_decay=0.9, tensorboard=False)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> str:
    return _packs(tmp_path_factory.mktemp("small"), 40, 160)


def _smooth_rows(n: int) -> list[LatentRow]:
    """Latents like a VAE's: smooth over space (a plane per channel), one image per class."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        h, w = int(rng.integers(3, 10)), int(rng.integers(3, 10))
        coef = rng.standard_normal((4, 3, 1, 1)).astype(np.float32)
        yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
        latent = (coef[:, 0] + coef[:, 1] * yy + coef[:, 2] * xx).astype(np.float16)
        rows.append(LatentRow(key=f"c{i}/{i}.jpg", variant="native", latent=latent, label=i, class_name=f"c{i}",
                              image_w=32 * w, image_h=32 * h, orig_w=32 * w, orig_h=32 * h))
    return rows


def test_a_tiny_model_overfits_a_handful_of_images(tmp_path):
    manifest = make_manifest(channels=4, flip="none")
    write_catalog(tmp_path / "cat", _smooth_rows(6), manifest)
    write_pack_result(tmp_path / "packs.parquet", pack_catalogs([tmp_path / "cat"], max_tokens=1024))
    # one pack holds all six images: the model sees the same images every step
    summary = train(_config(str(tmp_path / "packs.parquet"), tmp_path / "run", steps=200, lr=3e-3,
                            ckpt_every=1000, log_every=20, class_dropout_prob=0.0))
    start, end = np.mean(summary.losses[:20]), np.mean(summary.losses[-20:])
    assert end < 0.4 * start, (start, end)
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics] == list(range(20, 201, 20))
    assert {"loss", "lr", "grad_norm", "images_per_step", "tokens_per_step", "tokens_per_s"} <= set(metrics[0])
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_resuming_continues_the_same_trajectory(small, tmp_path):
    whole = train(_config(small, tmp_path / "whole"))
    first = train(_config(small, tmp_path / "split", steps=4))
    second = train(_config(small, tmp_path / "split", steps=8, resume=True))
    assert (first.final_step, second.steps, second.final_step) == (4, 4, 8)
    torch.testing.assert_close(torch.tensor(first.losses + second.losses), torch.tensor(whole.losses),
                               rtol=1e-5, atol=1e-6)
    for ema in (False, True):
        a = load_weights(tmp_path / "whole", ema=ema)
        b = load_weights(tmp_path / "split", ema=ema)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    info = read_run_info(tmp_path / "split")
    assert info["step"] == 8 and info["data"]["encoder"]["name"] == "test-ae"
    assert json.loads((tmp_path / "split" / "config.json").read_text())["config"]["steps"] == 8


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(small, tmp_path):
    # an absurd learning rate blows the weights up after the first step
    with pytest.raises(NonFiniteLossError, match=r"step \d+ .*the loss is (nan|inf).*step-00000001"):
        train(_config(small, tmp_path / "run", lr=1e30, grad_clip=1e30, ckpt_every=1, steps=20))
    checkpoint = resolve_checkpoint(tmp_path / "run")
    assert checkpoint.name == "step-00000001"
    assert all(torch.isfinite(v).all() for v in load_weights(checkpoint, ema=False).values())


def test_resume_refuses_catalogs_with_another_normalisation(small, tmp_path):
    train(_config(small, tmp_path / "run", steps=2, ckpt_every=2))
    other = _packs(tmp_path / "other", 40, 160, seed=9)  # same encoder, other latents: other mean/std
    with pytest.raises(CheckpointMismatchError, match="normalisation"):
        train(_config(other, tmp_path / "run", steps=4, resume=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, packs: str, out: str, results: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    seen = []
    summary = train(_config(packs, Path(out), steps=6, ckpt_every=6),
                    on_step=lambda step, batch, terms: seen.append(sorted(batch.row_ids.tolist())))
    torch.save({"seen": seen, "state": {k: v.detach().clone() for k, v in summary.model.state_dict().items()},
                "losses": summary.losses}, Path(results) / f"rank{rank}.pt")


def test_two_gloo_ranks_see_disjoint_packs_and_keep_identical_weights(small, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), small, str(tmp_path / "run"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(r0["seen"]) == len(r1["seen"]) == 6
    for a, b in zip(r0["seen"], r1["seen"]):
        assert not set(a) & set(b)  # the two ranks never train the same rows in a step
    assert r0["losses"] != r1["losses"]  # they did see different data
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key
    saved = load_weights(tmp_path / "run", ema=False)
    assert all(torch.equal(saved[k], v) for k, v in r0["state"].items())
    assert read_run_info(tmp_path / "run")["world_size"] == 2


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[model]\nmodel = "S"\nmlp = "swiglu"\n[optim]\nlr = 2e-4\nbetas = [0.9, 0.99]\n')
    config = load_config(path, dict([parse_override("lr=0.001"), parse_override("out=runs/x")]))
    assert (config.model, config.mlp, config.lr, config.betas, config.out) == ("S", "swiglu", 0.001, (0.9, 0.99),
                                                                              "runs/x")
    with pytest.raises(ValueError, match="unknown config keys \\['lrr'\\]"):
        load_config(None, {"lrr": 1})
    with pytest.raises(ValueError, match="schedule"):
        load_config(None, {"schedule": "linear"})


def test_t_mean_and_t_std_reach_the_objective_and_milestones_outlive_the_rolling_checkpoints(small, tmp_path):
    times = []
    train(_config(small, tmp_path / "run", steps=8, ckpt_every=2, keep_checkpoints=1, keep_every=4, t_mean=2.0,
                  t_std=0.01), on_step=lambda step, batch, terms: times.append(terms.t))
    t = torch.cat(times)
    # t = sigmoid(N(2, 0.01)): all close to sigmoid(2) = 0.881
    assert float(t.min()) > 0.87 and float(t.max()) < 0.89
    kept = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert kept == ["step-00000004", "step-00000008"]  # step 4 is a milestone; 8 the last one
    with pytest.raises(ValueError, match="t_std = 0.0: must be > 0"):
        _config(small, tmp_path / "bad", t_std=0.0)
