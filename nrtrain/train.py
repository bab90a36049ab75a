"""The training loop: packs in, checkpoints out. Read it top to bottom.

One step = `grad_accum` packs per rank. Each pack is one PackedBatch (a few hundred images of all
sizes in L tokens); the flow-matching loss is computed on it, gradients are averaged over ranks by
DDP, clipped, and AdamW steps. The EMA follows every step. Every `ckpt_every` steps rank 0 writes a
checkpoint holding everything needed to continue the same trajectory: weights, EMA, optimizer,
scheduler, the loader's cursor, and the RNG states (`--resume` restores them all).

Runs on one CPU for tests, on one GPU, under `torchrun` (DDP; NCCL on GPU, gloo on CPU), or as a
Ray Train job (`nrtrain.ray_train`), all through `train(config)`. The config is `nrtrain.config`; what
the run folder may hold and the metrics log are `nrtrain.run_folder`.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch
import torch.distributed as dist

from nrdata.catalog.atomic import atomic_write_bytes
from nrdata.version import code_version
from nrtrain.checkpoint import (check_data_identity, data_identity, load_training_state, load_weights,
                                resolve_checkpoint, save_checkpoint)
from nrtrain.config import TrainConfig, load_config, parse_override  # noqa: F401  (nrtrain.train's API)
from nrtrain.distributed import Distributed, setup_distributed
from nrtrain.flops import model_flops
from nrtrain.loader import PackedLoader
from nrtrain.model import build_model
from nrtrain.normalization import run_normalization
from nrtrain.packed import PackedBatch
from nrtrain.pretrained import inherited_model_fields, init_weights
from nrtrain.repa import load_vision_encoder, repa_targets
from nrtrain.run_folder import (MetricsLog, plot_loss, preflight, read_metrics,  # noqa: F401  (read_metrics: API)
                                remove_previous_run, truncate_metrics)
from nrtrain.transport import FlowMatchingLoss


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped without writing a checkpoint of that state."""


@dataclass
class TrainSummary:
    steps: int  # optimizer steps done in this call
    final_step: int
    losses: list[float] = field(default_factory=list)  # rank-local mean loss of every step of this call
    checkpoint: str | None = None
    seconds: float = 0.0
    model: torch.nn.Module | None = None  # the trained module (this rank's copy), for notebooks and tests


# -- the pieces -----------------------------------------------------------------------------------

def lr_at(step: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate at `step` (linear warmup, then constant or cosine)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # no weight decay on biases, norms and embedding tables' 1-D parameters (nanoGPT's rule)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of the GPU, for MFU; None when unknown (MFU is then not reported)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12), ("4090", 165e12)):
        if key in name:
            return value
    return None


def rng_state(generator: torch.Generator) -> dict[str, Any]:
    state = {"loss_generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["loss_generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def precision_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the model's matmuls and attention run in: bf16 (precision bf16, or auto on CUDA,
    under autocast) or fp32."""
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and device.type == "cuda") else torch.float32


def autocast_for(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """A factory of the context every forward runs in: bf16 autocast where `precision_dtype` says bf16,
    else nothing. A factory, not a context object: each micro-step enters a fresh one."""
    if precision_dtype(precision, device) == torch.bfloat16:
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return nullcontext


@dataclass
class StepLosses:
    loss: torch.Tensor  # device scalar: mean over the micro-batches of their (detached) loss
    repa: torch.Tensor | None  # device scalar, the REPA term likewise; None without REPA
    finite: torch.Tensor  # device bool: every micro-batch's loss was finite
    images: int
    tokens: int
    flops: int  # model_flops of forward + backward over the micro-batches, from host-side lengths


def train_step(net: torch.nn.Module, micro_batches: Sequence[PackedBatch], loss_fn: FlowMatchingLoss,
               generator: torch.Generator | Sequence[torch.Generator], *, autocast: Callable[[], ContextManager] = nullcontext, encoder=None,
               on_micro: Callable[[PackedBatch, Any], None] | None = None) -> StepLosses:
    """Forward and backward of every micro-batch (already on the device), gradients accumulated as
    their mean; under DDP only the last micro-batch all-reduces. Nothing here reads the device back:
    the caller decides when to look at `finite` (one sync per step, see `train`).

    `generator` draws t, noise and label dropout for every micro-batch in turn, or is one generator
    per micro-batch (to replay the same draws in another split of the work)."""
    model = getattr(net, "module", net)
    model = getattr(model, "_orig_mod", model)
    accum = len(micro_batches)
    generators = [generator] * accum if isinstance(generator, torch.Generator) else list(generator)
    if len(generators) != accum:
        raise ValueError(f"{len(generators)} generators for {accum} micro-batches; give one, or one each")
    loss_sum = repa_sum = None
    finite = None
    images = tokens = flops = 0
    for micro, batch in enumerate(micro_batches):
        batch.labels = torch.where(batch.labels < 0, loss_fn.null_class, batch.labels)
        last = micro == accum - 1
        with (net.no_sync() if hasattr(net, "no_sync") and not last else nullcontext()), autocast():
            targets = repa_targets(encoder, batch.images, batch.sizes, batch.tokens.device) if encoder else None
            terms = loss_fn(net, batch, generators[micro], repa_targets=targets)
        loss = terms.loss.float()
        (loss / accum).backward()
        detached = loss.detach()
        ok = torch.isfinite(detached)
        finite = ok if finite is None else finite & ok
        loss_sum = detached if loss_sum is None else loss_sum + detached
        if terms.repa is not None:
            repa_sum = terms.repa if repa_sum is None else repa_sum + terms.repa
        seqlens = batch.seqlens()
        images += len(seqlens)
        tokens += sum(seqlens)
        flops += model_flops(model.config, seqlens, training=True)
        if on_micro:
            on_micro(batch, terms)
    return StepLosses(loss=loss_sum / accum, repa=None if repa_sum is None else repa_sum / accum, finite=finite,
                      images=images, tokens=tokens, flops=flops)


def _repa_images(encoder, config: TrainConfig) -> str | None:
    """Where REPA images come from: the catalogs' stored ones (`nr encode --repa-pixels`), or, when
    repa_image_root is set, the source images decoded at every step (slow: catalogs without them)."""
    if encoder is None:
        return None
    return "source" if config.repa_image_root else "stored"


def read_step(losses: StepLosses, ddp: Distributed) -> tuple[bool, float, float | None]:
    """(every rank's step was finite, this rank's loss, its REPA term) in one host sync per step.

    Under DDP the finiteness is agreed by a one-element all-reduce, so that all ranks stop together
    rather than the healthy ones waiting in the next gradient all-reduce until the NCCL timeout."""
    flag = (~losses.finite).to(torch.float32).reshape(1)
    if ddp.world_size > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    repa = losses.repa if losses.repa is not None else torch.zeros((), device=flag.device)
    nonfinite, loss, repa_value = torch.cat([flag, losses.loss.reshape(1).float(), repa.reshape(1).float()]).tolist()
    return nonfinite == 0, loss, (repa_value if losses.repa is not None else None)


# -- the loop -----------------------------------------------------------------------------------

def train(config: TrainConfig, *, on_log: Callable[[dict[str, Any]], None] | None = None,
          on_step: Callable[[int, Any, Any], None] | None = None) -> TrainSummary:
    """Train (or, with config.resume, continue) a NiT on the packs; returns what this call did.

    `on_log` gets every logged record (rank 0); `on_step(step, batch, loss_terms)` every micro-step.
    """
    started = time.perf_counter()
    ddp = setup_distributed(config.device)
    device = ddp.device
    out = Path(config.out)
    # refusals that need no data come first: a damaged checkpoint or a mixed-up run folder is named
    # before anything is loaded or written; the ranks agree, so none goes on to wait for one that stopped
    try:
        checkpoint, saved = preflight(out, config)
        refused = None
    except (ValueError, FileNotFoundError) as exc:
        refused = exc
    if ddp.world_size > 1:
        flag = torch.tensor([float(refused is not None)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and refused is None:
            refused = ValueError(f"another rank refused to start the run in {out}; its error says why")
    if refused is not None:
        if ddp.owns_group:
            dist.destroy_process_group()
        raise refused
    if ddp.main:
        out.mkdir(parents=True, exist_ok=True)
    autocast = autocast_for(config.precision, device)
    if config.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # the frozen REPA encoder lives outside the model: it is never trained nor checkpointed
    encoder = (load_vision_encoder(config.repa_encoder, device=device, normalization=config.repa_normalization)
               if config.repa_encoder else None)

    # data: one pack per micro-step, this rank's share, in a resumable order
    loader = PackedLoader(config.packs, catalogs=config.catalogs, rank=ddp.rank, world_size=ddp.world_size,
                          seed=config.seed, steps=config.steps * config.grad_accum, num_workers=config.workers,
                          pin_memory=device.type == "cuda", repa_images=_repa_images(encoder, config),
                          image_root=config.repa_image_root,
                          repa_patch_size=encoder.patch_size if encoder else None)
    dataset = loader.dataset
    catalogs = dataset.catalogs
    scaling = run_normalization(catalogs, config.normalization, config.scaling_factor)
    if scaling.mode == "scalar":
        dataset.set_normalization(scaling)
    identity = data_identity(catalogs, scaling, dataset.patch_size)
    # unlabelled rows (label -1) train as the null class, so an unlabelled catalog trains unconditionally;
    # a fine-tune keeps the class count of the weights it starts from
    inherited = inherited_model_fields(config.init_from) if config.init_from else {}
    num_classes = config.num_classes or inherited.pop("num_classes", None) or max(
        1, 1 + max(int(c.scan().select("label").max().collect().item()) for c in catalogs))
    inherited.pop("num_classes", None)

    # model, EMA, optimizer; the same seed on every rank gives the same initial weights
    torch.manual_seed(config.seed)
    projector = (dict(repa_depth=config.repa_depth, repa_dim=encoder.dim, repa_hidden=config.repa_hidden)
                 if encoder else {})
    model = build_model(config.model, in_channels=dataset.channels, patch_size=dataset.patch_size,
                        mlp=config.mlp, attention=config.attention, num_classes=num_classes, **projector,
                        **inherited).to(device)
    # the attention backend is fixed from device, compute dtype and compile before anything is compiled
    # (or written: a backend that cannot run here is refused before the run folder holds anything)
    model.use_attention(device, precision_dtype(config.precision, device), training=True,
                        compiled=config.compile)
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    optimizer = make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, config))
    loss_fn = FlowMatchingLoss(null_class=model.null_class, reduction=config.reduction,
                               class_dropout_prob=config.class_dropout_prob, direction_loss=config.direction_loss,
                               repa_weight=config.repa_weight if encoder else 0.0, t_mean=config.t_mean,
                               t_std=config.t_std)
    generator = torch.Generator(device).manual_seed(config.seed * 1_000_003 + ddp.rank)  # distinct per rank
    run_info = {"config": asdict(config), "model": asdict(model.config), "data": identity,
                "world_size": ddp.world_size, "code_version": code_version(),
                "repa": encoder.describe() if encoder else None}

    if config.init_from and not config.resume:  # a resume continues from its own checkpoint
        run_info["init_from"] = init_weights(model, ema, config.init_from, identity)
    step = 0
    if config.resume:
        check_data_identity(saved["data"], identity, where=str(checkpoint))
        if saved["model"] != run_info["model"]:
            raise ValueError(f"{checkpoint}: the checkpoint's model {saved['model']} differs from this config's "
                             f"{run_info['model']}; resume with the config the run was started with")
        state = load_training_state(checkpoint)
        model.load_state_dict(load_weights(checkpoint, ema=False))
        ema.load_state_dict(load_weights(checkpoint, ema=True))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        loader.load_state_dict(state["loaders"][ddp.rank])
        restore_rng(state["rng"][ddp.rank], generator)
        step = int(state["step"])
    if ddp.main:
        if config.overwrite:
            remove_previous_run(out)  # as late as possible: a refused config leaves the old run in place
        elif config.resume:
            truncate_metrics(out, step)
        atomic_write_bytes(out / "config.json", (json.dumps(run_info, indent=2, default=str) + "\n").encode())

    if config.compile:
        model.compile_blocks(backend=config.compile_backend)
    net = model
    if ddp.world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    log = MetricsLog(out, config.tensorboard, resumed_step=step if config.resume else None) if ddp.main else None
    peak = peak_flops(device)
    summary = TrainSummary(steps=0, final_step=step)
    batches = iter(loader)
    window = {"loss": 0.0, "repa": 0.0 if encoder else None, "images": 0, "tokens": 0, "flops": 0, "steps": 0,
              "time": time.perf_counter()}
    model.train()

    while step < config.steps:
        micro_batches = [next(batches).to(device, non_blocking=True) for _ in range(config.grad_accum)]
        hook = (lambda batch, terms, at=step: on_step(at, batch, terms)) if on_step else None
        losses = train_step(net, micro_batches, loss_fn, generator, autocast=autocast, encoder=encoder,
                            on_micro=hook)
        finite, step_loss, step_repa = read_step(losses, ddp)
        if not finite:
            if log is not None:
                log.close()
            if ddp.owns_group:
                dist.destroy_process_group()
            where = "on this rank" if not math.isfinite(step_loss) else "on another rank"
            raise NonFiniteLossError(
                f"step {step + 1} (rank {ddp.rank}, packs epoch {loader.epoch} step {loader.step}): the loss is "
                f"{step_loss if where == 'on this rank' else 'nan or inf'} {where}; every rank stopped without "
                f"saving. The last good checkpoint is {_latest_or_none(out)}. Lower lr (now {config.lr}), check "
                "the catalogs with `nr catalog validate`, then `nr train ... --resume`")
        if step_repa is not None:
            window["repa"] += step_repa
        window["images"] += losses.images
        window["tokens"] += losses.tokens
        window["flops"] += losses.flops
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, config.ema_decay)
        step += 1
        summary.steps += 1
        summary.losses.append(step_loss)
        window["loss"] += step_loss
        window["steps"] += 1

        if step % config.log_every == 0 or step == config.steps:
            record = _log_record(step, window, grad_norm, scheduler, ddp, peak)
            window.update(loss=0.0, repa=0.0 if encoder else None, images=0, tokens=0, flops=0, steps=0,
                          time=time.perf_counter())
            if log is not None:
                log.write(record)
                if on_log:
                    on_log(record)
        if step % config.ckpt_every == 0 or step == config.steps:
            summary.checkpoint = _checkpoint(out, step, model, ema, optimizer, scheduler, loader, generator,
                                             run_info, ddp, config.keep_checkpoints, config.keep_every)

    if log is not None:
        log.close()
        plot_loss(out)
    if ddp.owns_group:
        dist.destroy_process_group()
    summary.final_step = step
    summary.model = model
    summary.seconds = time.perf_counter() - started
    return summary


def _latest_or_none(out: Path) -> str:
    try:
        return str(resolve_checkpoint(out))
    except FileNotFoundError:
        return "none (no checkpoint was written yet)"


def _log_record(step: int, window: dict, grad_norm: torch.Tensor, scheduler, ddp: Distributed,
                peak: float | None) -> dict[str, Any]:
    seconds = max(1e-9, time.perf_counter() - window["time"])
    n = max(1, window["steps"])
    # every rank does the same amount of work per step (balanced packs), so rates scale by world size
    record = {"step": step, "loss": window["loss"] / n, "grad_norm": float(grad_norm),
              "lr": scheduler.get_last_lr()[0], "images_per_step": window["images"] * ddp.world_size / n,
              "tokens_per_step": window["tokens"] * ddp.world_size / n,
              "tokens_per_s": window["tokens"] * ddp.world_size / seconds, "seconds_per_step": seconds / n}
    if window["repa"] is not None:
        record["repa"] = window["repa"] / n
    if peak:
        record["mfu"] = window["flops"] / seconds / peak
    return record


def _checkpoint(out: Path, step: int, model, ema, optimizer, scheduler, loader: PackedLoader,
                generator: torch.Generator, run_info: dict, ddp: Distributed, keep: int | None,
                keep_every: int | None) -> str | None:
    # every rank's cursor and RNG go into the one checkpoint rank 0 writes
    local = {"loader": loader.state_dict(), "rng": rng_state(generator)}
    if ddp.world_size > 1:
        gathered: list[Any] = [None] * ddp.world_size
        dist.all_gather_object(gathered, local)
    else:
        gathered = [local]
    path = None
    if ddp.main:
        state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": step,
                 "loaders": [g["loader"] for g in gathered], "rng": [g["rng"] for g in gathered]}
        path = str(save_checkpoint(out, step, model=model, ema=ema, state=state, run_info=run_info, keep=keep,
                                   keep_every=keep_every))
    if ddp.world_size > 1:
        dist.barrier()
    return path
