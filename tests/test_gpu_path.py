"""Every branch a GPU run takes, run on the CPU as far as a CPU can go: bf16 autocast training and
resuming, bfloat16 sampling with t kept in float32, the attention backend for every (device, dtype,
compile) pair, torch.compile over packs of different lengths, DDP with gradient accumulation, a NaN
on one rank. The tests marked `cuda` need a GPU; `bench/gpu_check.py` runs them on one."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from typer.testing import CliRunner

from cli import app
from nrdata.packing.catalog_packs import pack_catalogs, write_pack_result
from nrtrain import attention
from nrtrain.attention import choose_backend, packed_attention, prepare_attention, resolve_backend
from nrtrain.checkpoint import load_weights, resolve_checkpoint
from nrtrain.model import build_model
from nrtrain.packed import packed_from_tokens
from nrtrain.transport import FlowMatchingLoss
from nrtrain.transport.cfg import GuidedField
from nrtrain.train import (NonFiniteLossError, TrainConfig, autocast_for, precision_dtype, read_metrics, train,
                           train_step)
from catalog_factory import make_manifest, make_rows, write_catalog
from test_sample import pixel_catalog

runner = CliRunner()
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu_check.py runs it on a GPU)")


@pytest.fixture(scope="module")
def pixel_packs(tmp_path_factory) -> Path:
    """A pixel catalog (decodable without weights) and its packs: what `nr train` and `nr sample` read."""
    root = tmp_path_factory.mktemp("gpu-path")
    catalog = pixel_catalog(root / "catalog")
    write_pack_result(root / "packs.parquet", pack_catalogs([catalog.root], max_tokens=16, epochs=2))
    return root


def _cli(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_nr_train_in_bf16_trains_and_resumes_on_cpu_and_nr_sample_runs_in_bfloat16(pixel_packs, tmp_path):
    common = ["--packs", str(pixel_packs / "packs.parquet"), "--model", "tiny", "--set", "precision=bf16",
              "--set", "workers=0", "--set", "log_every=1", "--set", "ckpt_every=3", "--set", "tensorboard=false",
              "--lr", "1e-3"]
    _cli("train", *common, "--out", str(tmp_path / "whole"), "--steps", "6")
    _cli("train", *common, "--out", str(tmp_path / "split"), "--steps", "3")
    _cli("train", *common, "--out", str(tmp_path / "split"), "--steps", "6", "--resume")
    whole, split = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "split")
    assert [m["step"] for m in split] == list(range(1, 7))
    assert all(np.isfinite(m["loss"]) for m in whole)
    # bf16 autocast on the CPU is deterministic: the resumed run is the uninterrupted one
    np.testing.assert_allclose([m["loss"] for m in split], [m["loss"] for m in whole], rtol=1e-5)
    config = json.loads((tmp_path / "split" / "config.json").read_text())["config"]
    assert config["precision"] == "bf16"

    _cli("sample", str(tmp_path / "split"), "--out", str(tmp_path / "samples"), "--size", "16x16", "--size",
         "8x16", "--count", "3", "--dtype", "bfloat16", "--steps", "3", "--cfg", "2", "--device", "cpu")
    provenance = json.loads((tmp_path / "samples" / "provenance.json").read_text())
    assert provenance["dtype"] == "bfloat16" and provenance["settings"]["model_dtype"] == "bfloat16"
    assert provenance["complete"]
    with np.load(tmp_path / "samples" / "samples-16x16.npz") as npz:
        assert npz["arr_0"].shape == (3, 16, 16, 3) and npz["arr_0"].dtype == np.uint8


def test_bf16_autocast_reaches_the_model_in_training():
    """Under precision=bf16 the forward really runs in bf16 (the autocast factory is entered per step)."""
    model = build_model("tiny", in_channels=4, patch_size=1, num_classes=3)
    seen = []
    model.blocks[0].attn.qkv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    batch = packed_from_tokens([torch.randn(6, 4), torch.randn(4, 4)], [(2, 3), (2, 2)], [0, 1])
    model.use_attention("cpu", torch.bfloat16, training=True)
    for _ in range(2):
        losses = train_step(model, [batch], FlowMatchingLoss(null_class=3), torch.Generator().manual_seed(0),
                            autocast=autocast_for("bf16", torch.device("cpu")))
    assert seen == [torch.bfloat16, torch.bfloat16] and bool(losses.finite)
    assert autocast_for("auto", torch.device("cpu")) is contextlib.nullcontext
    assert autocast_for("fp32", torch.device("cuda")) is contextlib.nullcontext
    # what the attention backend is chosen for: auto means bf16 on CUDA, fp32 elsewhere
    assert [precision_dtype(p, torch.device(d)) for p, d in (("auto", "cuda"), ("auto", "cpu"), ("bf16", "cpu"))] \
        == [torch.bfloat16, torch.float32, torch.bfloat16]


def test_sampling_in_bfloat16_hands_the_model_float32_times():
    seen = []

    def model(x, t, y, batch):
        seen.append((x.dtype, t.dtype, t.tolist()))
        return torch.zeros_like(x)

    batch = packed_from_tokens([torch.randn(4, 3)], [(2, 2)], [0])
    field = GuidedField(model, batch, torch.tensor([0]), cfg_scale=1.0, cfg_interval=(0.0, 1.0), null_class=1,
                        model_dtype=torch.bfloat16)
    t = 0.999  # in bf16 this is 1.0: the step before it (the spacing there is 1/256)
    field(batch.tokens.double(), t)
    dtype_x, dtype_t, values = seen[0]
    assert dtype_x == torch.bfloat16 and dtype_t == torch.float32
    assert values[0] == pytest.approx(t, abs=1e-7) and torch.tensor(t, dtype=torch.bfloat16).item() == 1.0


def test_host_side_lengths_travel_with_the_batch_so_nothing_reads_sizes_back():
    batch = packed_from_tokens([torch.randn(6, 4), torch.randn(4, 4), torch.randn(9, 4)], [(2, 3), (2, 2), (3, 3)],
                               [0, 1, 2])
    # on the meta device nothing can be read back: a sync would raise here as it would stall a GPU
    moved = batch.to("meta")
    assert moved.sizes.device.type == "meta" and moved.seqlens() == [6, 4, 9]
    from nrtrain.transport.cfg import double_for_cfg

    assert double_for_cfg(moved, null_class=3).seqlens() == [6, 4, 9, 6, 4, 9]
    prepared = prepare_attention(moved, "sdpa-loop")
    assert prepared.runs == ((0, 1, 6), (6, 1, 4), (10, 1, 9))


# -- the attention backend: one decision from device, dtype and compile ---------------------------

BF16, FP32, FP16 = torch.bfloat16, torch.float32, torch.float16


@pytest.mark.parametrize("device, dtype, compiled, flash, expected", [
    ("cuda", BF16, False, True, "flash-varlen"),
    ("cuda", FP16, False, True, "flash-varlen"),
    ("cuda", BF16, False, False, "torch-varlen"),
    ("cuda", BF16, True, False, "torch-varlen"),
    ("cuda", FP32, False, True, "sdpa-loop"),  # the varlen kernels refuse fp32
    ("cuda", FP32, False, False, "sdpa-loop"),
    ("cuda", FP32, True, False, "flex"),  # sdpa-loop would recompile per pack
    ("cpu", FP32, False, False, "sdpa-loop"),
    ("cpu", BF16, False, False, "sdpa-loop"),
    ("cpu", FP32, True, False, "masked-sdpa"),
    ("cpu", BF16, True, True, "masked-sdpa"),
])
def test_auto_backend_for_each_device_dtype_and_compile(monkeypatch, device, dtype, compiled, flash, expected):
    real = importlib.util.find_spec
    monkeypatch.setattr(attention.importlib.util, "find_spec",
                        lambda name, *a: (object() if flash else None) if name == "flash_attn" else real(name, *a))
    resolve_backend.cache_clear()
    try:
        assert choose_backend(device, dtype, compiled=compiled)[0] == expected
        assert resolve_backend("auto", device, dtype, compiled=compiled) == expected
    finally:
        resolve_backend.cache_clear()


@pytest.mark.parametrize("name, device, dtype, compiled, needs_backward, message", [
    ("torch-varlen", "cuda", FP32, False, False, "needs fp16/bf16 .* precision=bf16 .* --dtype bfloat16"),
    ("torch-varlen", "cpu", BF16, False, False, "runs on CUDA only"),
    ("flash-varlen", "cpu", BF16, False, False, "runs on CUDA only"),
    ("sdpa-loop", "cpu", FP32, True, False, "recompile for each pack"),
    ("flex", "cpu", FP32, False, True, "no backward on cpu"),
    ("nope", "cpu", FP32, False, False, "unknown attention backend"),
])
def test_backends_that_cannot_run_say_what_to_use(name, device, dtype, compiled, needs_backward, message):
    with pytest.raises(ValueError, match=message):
        resolve_backend(name, device, dtype, compiled=compiled, needs_backward=needs_backward)


def test_the_model_fixes_its_backend_before_the_forward_and_follows_autocast_otherwise():
    model = build_model("tiny", in_channels=4, patch_size=1, num_classes=3)
    assert model.attention_backend(torch.device("cpu")) == "sdpa-loop"
    assert model.use_attention("cpu", FP32, training=True, compiled=True) == "masked-sdpa"
    assert model.attention_backend(torch.device("cpu")) == "masked-sdpa"
    with pytest.raises(ValueError, match="recompile"):
        build_model("tiny", in_channels=4, patch_size=1, attention="sdpa-loop").use_attention(
            "cpu", FP32, training=True, compiled=True)


def test_a_backend_that_cannot_run_here_is_refused_before_the_run_folder_holds_a_run(pixel_packs, tmp_path):
    config = dict(packs=str(pixel_packs / "packs.parquet"), out=str(tmp_path / "run"), model="tiny", steps=1,
                  workers=0, tensorboard=False)
    with pytest.raises(ValueError, match="torch-varlen runs on CUDA only"):
        train(TrainConfig(**config, attention="torch-varlen"))
    assert train(TrainConfig(**config)).final_step == 1  # the same --out, no --overwrite needed


# -- torch.compile: one graph for every pack, no graph break inside a block ------------------------

def _random_pack(rng: np.random.Generator, images: int, channels: int = 4) -> "PackedBatch":  # noqa: F821
    sizes = [(int(rng.integers(1, 6)), int(rng.integers(1, 6))) for _ in range(images)]
    tokens = [torch.from_numpy(rng.standard_normal((h * w, channels), dtype=np.float32)) for h, w in sizes]
    return packed_from_tokens(tokens, sizes, rng.integers(0, 3, images).tolist())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_compiled_blocks_serve_packs_of_any_length_without_recompiling_or_breaking(precision):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = build_model("tiny", in_channels=4, patch_size=1, num_classes=3, attention="masked-sdpa")
    for p in eager.parameters():  # move off the zero initialisation so every block matters
        torch.nn.init.normal_(p, std=0.05)
    compiled = build_model("tiny", in_channels=4, patch_size=1, num_classes=3)
    compiled.load_state_dict(eager.state_dict())
    autocast = autocast_for(precision, torch.device("cpu"))
    dtype = BF16 if precision == "bf16" else FP32
    assert compiled.use_attention("cpu", dtype, training=True, compiled=True) == "masked-sdpa"
    compiled.compile_blocks(backend="aot_eager")  # dynamo and autograd tracing, without C++ code generation
    rng = np.random.default_rng(0)
    for images in (1, 2, 3, 5, 2, 4, 1, 6):
        batch = _random_pack(rng, images)
        t, y = torch.rand(images), batch.labels
        with autocast():
            want = eager(batch.tokens, t, y, batch)
            got = compiled(batch.tokens, t, y, batch)
        got.float().sum().backward()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2 if precision == "bf16" else 1e-5,
                                   atol=2e-2 if precision == "bf16" else 1e-5)
    assert dict(counters["graph_break"]) == {}
    # one graph for single-image packs (size 1 is specialised) and one for all others, shared by the blocks
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
    assert all(p.grad is not None for p in compiled.blocks.parameters() if p.requires_grad)


def test_the_trainer_compiles_its_blocks_and_trains_like_eager(tmp_path):
    manifest = make_manifest(channels=4)
    write_catalog(tmp_path / "cat", make_rows(24, manifest, seed=0), manifest)
    write_pack_result(tmp_path / "packs.parquet", pack_catalogs([tmp_path / "cat"], max_tokens=160, epochs=1))
    base = dict(packs=str(tmp_path / "packs.parquet"), model="tiny", steps=3, lr=1e-3, workers=0, ckpt_every=3,
                tensorboard=False, attention="masked-sdpa")
    eager = train(TrainConfig(**base, out=str(tmp_path / "eager")))
    compiled = train(TrainConfig(**base, out=str(tmp_path / "compiled"), compile=True, compile_backend="aot_eager"))
    np.testing.assert_allclose(compiled.losses, eager.losses, rtol=1e-4)


# -- DDP: gradient accumulation with no_sync, and a NaN on one rank -------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _micro_batches() -> list:
    rng = np.random.default_rng(7)
    return [_random_pack(rng, int(n)) for n in (3, 2, 4, 1)]


def _generators(indices) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(100 + i) for i in indices]


def _fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model("tiny", in_channels=4, patch_size=1, num_classes=3)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return model


def _accumulating_rank(rank: int, world: int, port: int, results: str) -> None:
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = _fresh_model()
    net = torch.nn.parallel.DistributedDataParallel(model)
    allreduces = []
    net.register_comm_hook(None, lambda state, bucket: (allreduces.append(1), allreduce_hook(state, bucket))[1])
    mine = _micro_batches()[2 * rank: 2 * rank + 2]
    train_step(net, mine, FlowMatchingLoss(null_class=3), _generators([2 * rank, 2 * rank + 1]))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    two_micro = len(allreduces)
    model.zero_grad(set_to_none=True)
    train_step(net, mine[:1], FlowMatchingLoss(null_class=3), _generators([2 * rank]))
    torch.save({"grads": grads, "allreduces": (two_micro, len(allreduces) - two_micro)},
               Path(results) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_ddp_with_grad_accum_2_equals_one_process_accumulating_the_same_micro_batches(tmp_path):
    mp.spawn(_accumulating_rank, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    model = _fresh_model()
    train_step(model, _micro_batches(), FlowMatchingLoss(null_class=3), _generators(range(4)))
    alone = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for rank in ranks:
        assert set(rank["grads"]) == set(alone)
        for name, grad in alone.items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)
        # no_sync held back the first micro-batch: two micro-batches cost the all-reduces of one
        two_micro, one_micro = rank["allreduces"]
        assert two_micro == one_micro >= 1


def _trainer_rank(rank: int, world: int, port: int, packs: str, out: str, results: str, nan_at: int | None) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    if nan_at is not None and rank == 1:
        calls = {"n": 0}
        original = FlowMatchingLoss.__call__

        def poisoned(self, *args, **kwargs):
            terms = original(self, *args, **kwargs)
            calls["n"] += 1
            if calls["n"] > nan_at:
                terms.loss = terms.loss * float("nan")
            return terms

        FlowMatchingLoss.__call__ = poisoned
    config = TrainConfig(packs=packs, out=out, model="tiny", steps=6, lr=1e-3, workers=0, ckpt_every=2,
                         log_every=1, tensorboard=False, grad_accum=2)
    outcome: dict = {}
    try:
        summary = train(config)
        outcome = {"steps": summary.final_step,
                   "state": {k: v.detach().clone() for k, v in summary.model.state_dict().items()}}
    except NonFiniteLossError as exc:
        outcome = {"error": str(exc)}
    torch.save(outcome, Path(results) / f"trainer{rank}.pt")


@pytest.fixture(scope="module")
def ddp_packs(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("ddp")
    manifest = make_manifest(channels=4)
    write_catalog(root / "cat", make_rows(60, manifest, seed=0), manifest)
    write_pack_result(root / "packs.parquet", pack_catalogs([root / "cat"], max_tokens=160, epochs=2))
    return str(root / "packs.parquet")


def test_the_trainer_runs_ddp_with_grad_accum_2(ddp_packs, tmp_path):
    mp.spawn(_trainer_rank, args=(2, _free_port(), ddp_packs, str(tmp_path / "run"), str(tmp_path), None),
             nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"trainer{r}.pt") for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 6
    for key, value in r0["state"].items():
        assert torch.equal(value, r1["state"][key]), key


@pytest.mark.timeout(180)
def test_a_nan_on_one_rank_stops_every_rank_with_the_last_good_checkpoint(ddp_packs, tmp_path):
    # rank 1's loss turns NaN at its 7th micro-batch, i.e. step 4 (two micro-batches per step)
    mp.spawn(_trainer_rank, args=(2, _free_port(), ddp_packs, str(tmp_path / "run"), str(tmp_path), 6),
             nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"trainer{r}.pt") for r in (0, 1))
    assert "step 4" in r1["error"] and "on this rank" in r1["error"]
    assert "step 4" in r0["error"] and "on another rank" in r0["error"]
    for outcome in (r0, r1):
        assert "step-00000002" in outcome["error"]
    assert resolve_checkpoint(tmp_path / "run").name == "step-00000002"
    assert all(torch.isfinite(v).all() for v in load_weights(tmp_path / "run", ema=False).values())
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2, 3]


# -- CUDA only: the kernels a CPU cannot run (bench/gpu_check.py runs these on the GPU) -----------

@cuda
@pytest.mark.parametrize("backend", ["torch-varlen", "flash-varlen", "flex", "sdpa-loop"])
def test_cuda_backends_match_the_masked_reference_in_bf16(backend):
    if backend == "flash-varlen" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash-attn is not installed")
    device = torch.device("cuda")
    batch = _random_pack(np.random.default_rng(3), 6).to(device)
    q, k, v = (torch.randn(batch.num_tokens, 4, 64, device=device, dtype=BF16) for _ in range(3))
    want = packed_attention(q, k, v, prepare_attention(batch, "masked-sdpa"))
    got = packed_attention(q, k, v, prepare_attention(batch, resolve_backend(backend, "cuda", BF16)))
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@cuda
def test_cuda_compiled_training_step_in_bf16_has_no_graph_break_and_one_graph():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    device = torch.device("cuda")
    model = build_model("tiny", in_channels=4, patch_size=1, num_classes=3).to(device)
    backend = model.use_attention(device, BF16, training=True, compiled=True)
    model.compile_blocks()
    rng = np.random.default_rng(0)
    for images in (2, 3, 5, 4):
        batch = _random_pack(rng, images).to(device)
        losses = train_step(model, [batch], FlowMatchingLoss(null_class=3),
                            torch.Generator(device).manual_seed(0), autocast=autocast_for("bf16", device))
        assert bool(losses.finite)
    assert backend in ("flash-varlen", "torch-varlen")
    assert dict(counters["graph_break"]) == {} and counters["stats"]["unique_graphs"] <= 2
