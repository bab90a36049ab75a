"""Training-step throughput of NiT on packed batches against the same images padded, same run.

Data: synthetic latents of ImageNet-1k at DC-AE f32c32 native resolution, as bench/loader_throughput.py
draws them (32 channels, patch 1, side lengths in tokens h ~ N(12, 2.5), w ~ N(13, 2.5), rounded and
clipped to 5..16, independently). Their token counts are packed into packs of at most L tokens with
`nrdata.packing.pack` (LPFHP); the first `--warmup` + `--steps` packs of that packing are the steps.
Values are random normal; only shapes matter here. All batches sit on the device before timing (the
loader is not measured: bench/loader_throughput.py does that).

One step is `nr train`'s own: `nrtrain.train.train_step` (forward + backward under the trainer's
`autocast_for(precision)`, flow-matching loss `nrtrain.transport.FlowMatchingLoss` with per-image
reduction and label dropout 0.1), then `read_step` (the trainer's one host sync per step), gradient
clipping (1.0), AdamW, zero_grad and `update_ema`, in the trainer's order; only the loader, the
scheduler and logging are left out. Attention is fixed per row the trainer's way
(`NiT.use_attention`), and compile on is the trainer's regional compilation (`NiT.compile_blocks`:
each block compiled with dynamic shapes). Every row trains on the same images with the same number
of images in each step (so the same real tokens over the timed steps) and the same weights:

* packed: the model as `nr train` runs it, one sequence of the pack's tokens, block-diagonal attention
  by each backend of `--backends` (by default every one that can train on this device);
* padded: each image padded with zeros to the longest image of its batch, [B, L_max, C], run through
  the same model's modules as a plain batch (per-image adaLN broadcast over its row, RoPE of the real
  positions), attention with a key-padding mask in one SDPA call (what a padded DiT/FiT trainer does;
  it does not depend on `--backends`), outputs of padding tokens discarded, so the loss is on real
  tokens only. Compile on compiles each block's padded call with the same options. Tokens are
  scattered to the padded layout and gathered back inside the timed step (O(T x C) copies,
  negligible next to the transformer). Two batchings of the same images:
    random  the images of the timed packs shuffled and dealt into batches of the packs' image counts
            (a plain random sampler: the baseline the "vs padded" column divides by);
    packs   each batch = one pack's images. LPFHP fills a pack from one to three distinct lengths, so
            this is a length-bucketed padded trainer and pads almost nothing.
Before timing, both layouts' forwards are compared on real tokens (fp32, sdpa-loop); the script stops
if they differ. The adaLN-Zero and final layers are drawn at std 0.02 instead of zero, so that this
comparison is not 0 = 0; random weights change no kernel's speed.

Each row starts a fresh AdamW; its first `--warmup` steps (optimizer state, autotuning, compilation and
the dynamic-shape recompile under `--compile`) are not timed. The rows run `--rounds` times, every
other round in reverse order (the machine may be shared); figures are medians over rounds, ratios are
taken within a round. Columns:

  real tok/s = real tokens of the timed steps / their seconds (the same numerator in every row)
  TFLOP/s    = sum over timed steps of model_flops(config, seqlens, training=True) / seconds (the
               `flops` train_step returns)
  MFU        = TFLOP/s / peak, peak = nrtrain.train.peak_flops(device) (dense bf16: 989e12 on H100/H200),
               CUDA only. model_flops counts the useful FLOPs of the real images (nrtrain/flops.py:
               per-image adaLN, block-diagonal attention, backward = 2x forward), so padding and
               recomputation never raise it; every row has the same numerator.
  peak GiB   = torch.cuda.max_memory_allocated over the row (weights, EMA, the copy of the initial weights
               every row starts from, AdamW state, every row's batches included).
  vs padded  = real tok/s / real tok/s of padded random batches in the same round and compile setting
               (median, and the range over rounds).
  graphs     = (compile on) graphs dynamo compiled during the timed steps: 0 means steady state; more
               means recompiles were timed.

`measure_training(...)` does all of this and returns a dict (bench/gpu_check.py calls it); this
script's command line prints it as a table. On a CPU shared with other work, torch's intra-op
threads wait on each other and small ops slow down by large, uneven factors; there `--threads 1`
gives steadier figures.

Usage:
    .venv/bin/python bench/train_throughput.py                 # CPU: preset demo, L=2048, fp32
    .venv/bin/python bench/train_throughput.py --threads 1 --backends sdpa-loop --steps 8
    python bench/train_throughput.py --compile both            # CUDA: preset XL, L=16384, bf16 autocast
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import replace
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters as compile_counters

from nrdata.packing import pack
from nrtrain.attention import BACKENDS, resolve_backend
from nrtrain.model import PRESETS, NiT, build_model, modulate
from nrtrain.packed import PackedBatch, packed_from_tokens
from nrtrain.rope import apply_rope, rope_coordinates, rope_cos_sin
from nrtrain.train import (TrainConfig, autocast_for, make_optimizer, precision_dtype, peak_flops, read_step,
                           train_step, update_ema)
from nrtrain.transport import FlowMatchingLoss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_device import (add_device_options, budget_short, load_average, print_header, randomize_zero_layers,  # noqa: E402
                          resolve_device)

CHANNELS = 32
PATCH = 1
SIDES = (5, 16)
LONGEST_IMAGE = SIDES[1] * SIDES[1]
CHECK_IMAGES = 8
PADDED_ATTENTION = "key-padding SDPA"
# the backends a packed row may use; masked-sdpa (O(T^2) mask) only when asked for by name
DEFAULT_BACKENDS = ("flash-varlen", "torch-varlen", "flex", "sdpa-loop")
MFU_FORMULA = ("MFU = sum over timed steps of nrtrain.flops.model_flops(config, seqlens, training=True) / seconds "
               "/ nrtrain.train.peak_flops(device); model_flops = 3 x forward of the real images only: "
               "2*T*(P*D + depth*(4*D^2 + mlp MACs) + D*P) + 2*B*(256*D + D^2 + depth*6*D^2 + 2*D^2) "
               "+ depth * sum_i 4*n_i^2*D (block-diagonal attention)")


def latent_sides(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    h = np.clip(np.rint(rng.normal(12.0, 2.5, n)), *SIDES).astype(int)
    w = np.clip(np.rint(rng.normal(13.0, 2.5, n)), *SIDES).astype(int)
    return h, w


Image = tuple[int, int, torch.Tensor, int]  # (h, w) in tokens, tokens [h*w, C], label


def draw_packs(count: int, max_tokens: int, seed: int) -> list[list[Image]]:
    """The images of `count` LPFHP packs of native-size latents (random values), in the packing's order."""
    rng = np.random.default_rng(seed)
    rows = max(20_000, math.ceil(2 * count * max_tokens / 150))  # about 2x the images `count` full packs hold
    h, w = latent_sides(rng, rows)
    packing = pack(h * w, max_tokens, algorithm="lpfhp", seed=seed)
    packs = []
    for p in range(count):
        ids = packing.pack(p)
        packs.append([(a, b, torch.from_numpy(rng.standard_normal((a * b, CHANNELS), dtype=np.float32)),
                       int(rng.integers(0, 1000))) for a, b in zip(h[ids].tolist(), w[ids].tolist())])
    return packs


def shuffled_like(packs: list[list[Image]], rng: np.random.Generator) -> list[list[Image]]:
    """The images of `packs` in random order, dealt into batches of the packs' image counts."""
    images = [image for group in packs for image in group]
    order = rng.permutation(len(images)).tolist()
    batches, start = [], 0
    for group in packs:
        batches.append([images[i] for i in order[start:start + len(group)]])
        start += len(group)
    return batches


def batch_of(images: list[Image]) -> PackedBatch:
    return packed_from_tokens([tokens for _, _, tokens, _ in images], [(h, w) for h, w, _, _ in images],
                              [label for _, _, _, label in images])


def real_share(batches: list[PackedBatch]) -> float:
    return sum(b.num_tokens for b in batches) / sum(b.num_images * b.max_seqlen for b in batches)


class PaddedNiT(nn.Module):
    """The same NiT's weights run on a padded batch [B, L_max, C]; called like the packed model.

    Takes and returns packed tokens [T, C] so that FlowMatchingLoss (noise, t, loss on real tokens)
    and train_step are shared with the packed layout; inside, every image occupies L_max rows and
    attention ignores the padding keys. `block_fn` runs one block on the padded batch (compiled for
    compile on).
    """

    def __init__(self, model: NiT, block_fn: Callable | None = None):
        super().__init__()
        self.model = model
        self.block_fn = block_fn or padded_block

    @property
    def config(self):  # train_step counts FLOPs from the config of the module it is given
        return self.model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        model, config = self.model, self.model.config
        images, longest, total = batch.num_images, batch.max_seqlen, x.shape[0]
        offsets = torch.arange(total, device=x.device) - batch.cu_seqlens.long()[batch.image_ids]
        slots = batch.image_ids * longest + offsets  # row of each real token in the flattened [B * L_max]

        def padded(values: torch.Tensor) -> torch.Tensor:
            out = values.new_zeros((images * longest, *values.shape[1:]))
            out[slots] = values
            return out

        real = padded(torch.ones(total, dtype=torch.bool, device=x.device))
        key_mask = real.view(images, 1, 1, longest)  # [B, 1, 1, L_max]: attend to real keys only
        coords = rope_coordinates(batch.positions, batch.sizes, batch.image_ids, config.rope_grid)
        cos, sin = rope_cos_sin(coords, batch.sizes, batch.image_ids, config.head_dim, theta=config.rope_theta)
        cos, sin = padded(cos), padded(sin)  # [B * L_max, head_dim]

        h = model.x_embedder(padded(x)).view(images, longest, -1)
        c = model.t_embedder(t) + model.y_embedder(y)
        for block in model.blocks:
            h = self.block_fn(block, h, c, cos, sin, key_mask)
        final = model.final_layer
        shift, scale = final.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        out = final.linear(modulate(final.norm_final(h), shift, scale))
        return out.flatten(0, 1)[slots]


def padded_block(block, h: torch.Tensor, c: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 key_mask: torch.Tensor) -> torch.Tensor:
    """NiTBlock.forward on [B, L_max, D]: the modulation broadcast over each image's row."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.adaLN_modulation(c)[:, None].chunk(6, dim=-1)
    attn = block.attn
    images, longest, _ = h.shape
    qkv = attn.qkv(modulate(block.norm1(h), shift_msa, scale_msa)).view(images * longest, 3, attn.heads, -1)
    q, k, v = qkv.unbind(1)
    q = apply_rope(attn.q_norm(q), cos, sin).to(v.dtype)
    k = apply_rope(attn.k_norm(k), cos, sin).to(v.dtype)
    as_heads = lambda z: z.view(images, longest, attn.heads, -1).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(as_heads(q), as_heads(k), as_heads(v), attn_mask=key_mask)
    h = h + gate_msa * attn.proj(out.transpose(1, 2).flatten(2))
    return h + gate_mlp * block.mlp(modulate(block.norm2(h), shift_mlp, scale_mlp))


def layout_difference(model: NiT, batch: PackedBatch) -> float:
    """max |packed - padded| / max |packed| of the two forwards on the first images of `batch`, fp32."""
    n = min(CHECK_IMAGES, batch.num_images)
    sizes = [tuple(s) for s in batch.sizes[:n].tolist()]
    tokens = list(batch.tokens[: int(batch.cu_seqlens[n])].split([a * b for a, b in sizes]))
    small = packed_from_tokens(tokens, sizes, batch.labels[:n].cpu()).to(batch.tokens.device)
    t = torch.linspace(0.1, 0.9, n, device=small.tokens.device)
    config, plan = model.config, model.attention_plan
    model.config = replace(config, attention="sdpa-loop")
    model.use_attention(small.tokens.device, torch.float32, training=False)
    try:
        with torch.no_grad():
            packed = model(small.tokens, t, small.labels, small)
            padded = PaddedNiT(model)(small.tokens, t, small.labels, small)
    finally:
        model.config, model.attention_plan = config, plan
    return float((packed - padded).abs().max() / packed.abs().max())


def time_steps(net: nn.Module, model: NiT, ema: NiT, batches: list[PackedBatch], warmup: int, autocast,
               device: torch.device) -> dict:
    """Train `warmup` untimed steps then the rest with nr train's step; rates of the timed steps."""
    timed = batches[warmup:]
    optimizer = make_optimizer(model, TrainConfig())
    loss_fn = FlowMatchingLoss(null_class=model.null_class)
    generator = torch.Generator(device).manual_seed(0)  # the same t, noise and dropout for every row
    single = SimpleNamespace(world_size=1)  # read_step's view of a run without DDP
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model.train()

    def step(batch: PackedBatch):
        losses = train_step(net, [batch], loss_fn, generator, autocast=autocast)
        finite, loss, _ = read_step(losses, single)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        update_ema(ema, model, 0.9999)
        return finite, loss, losses

    for batch in batches[:warmup]:
        step(batch)
    if cuda:
        torch.cuda.synchronize(device)
    graphs = compile_counters["stats"]["unique_graphs"]
    started = time.perf_counter()
    results = [step(batch) for batch in timed]
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    recompiled = compile_counters["stats"]["unique_graphs"] - graphs
    if not all(finite for finite, _, _ in results):
        raise FloatingPointError(f"non-finite loss in a timed step: {[loss for _, loss, _ in results]}")
    tokens = sum(r.tokens for _, _, r in results)
    return {"step_s": seconds / len(timed), "tokens_s": tokens / seconds,
            "images_s": sum(r.images for _, _, r in results) / seconds,
            "flops_s": sum(r.flops for _, _, r in results) / seconds,
            "memory": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None, "recompiled": recompiled,
            "loss": results[-1][1]}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def usable_backends(names: list[str], device: torch.device, dtype: torch.dtype, *,
                    compiled: bool) -> tuple[list[str], dict[str, str]]:
    """(the backends of `names` that can train here, {backend: why not} for the others)."""
    usable, refused = [], {}
    for name in names:
        try:
            backend = resolve_backend(name, device.type, dtype, needs_backward=True, compiled=compiled)
        except ValueError as error:
            refused[name] = str(error)
            continue
        if backend not in usable:
            usable.append(backend)
    return usable, refused


def measure_training(device: torch.device, *, preset: str = "XL", max_tokens: int = 16_384, steps: int = 10,
                     warmup: int = 3, backends: list[str] | tuple[str, ...] = DEFAULT_BACKENDS,
                     compile_modes: tuple[bool, ...] = (False, True), precision: str = "bf16", rounds: int = 1,
                     padded_batchings: tuple[str, ...] = ("random", "packs"), seed: int = 0,
                     compile_options: dict | None = None, deadline: float | None = None, compile_estimate_s: float = 0.0,
                     log: Callable[[str], None] = print) -> dict:
    """Packed against padded training steps, every row through nrtrain.train.train_step; returns a dict.

    `backends` are tried for the packed rows, those resolve_backend refuses on this device are left
    out (reasons under "refused"). `padded_batchings` must hold "random" (the baseline); "packs" adds
    the length-bucketed padded rows. `deadline` (time.monotonic()) stops starting rows that would end
    after it: a row after the first is skipped when the time left is below the last row's duration,
    a compiled row also when it is below `compile_estimate_s`; skipped rows are listed with the reason. Rows that
    fail (out of memory, an exception) are recorded with their error and the others still run.
    `compile_options` go to torch.compile (e.g. {"backend": "eager"} for a quick check on CPU).
    """
    if "random" not in padded_batchings:
        raise ValueError(f"padded_batchings {padded_batchings} must hold 'random', the baseline of every ratio")
    if max_tokens < LONGEST_IMAGE:
        raise ValueError(f"max_tokens {max_tokens} is below the largest image ({SIDES[1]}x{SIDES[1]} = "
                         f"{LONGEST_IMAGE} tokens)")
    # the model resolves nothing inside forward once use_attention ran, but dynamo may still warn about caches
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*", category=UserWarning)
    cuda = device.type == "cuda"
    autocast = autocast_for(precision, device)
    dtype = precision_dtype(precision, device)
    compile_options = dict(compile_options or {})
    packs = draw_packs(warmup + steps, max_tokens, seed)
    rng = np.random.default_rng(seed + 1)
    # warm-up and timed images are shuffled apart, so every row times the same images
    random_groups = shuffled_like(packs[:warmup], rng) + shuffled_like(packs[warmup:], rng)
    batchings = {"packs": [batch_of(group) for group in packs], "random": [batch_of(group) for group in random_groups]}
    timed = batchings["packs"][warmup:]
    real_tokens, images = sum(b.num_tokens for b in timed), sum(b.num_images for b in timed)
    result = {
        "preset": preset, "max_tokens": max_tokens, "steps": steps, "warmup": warmup, "rounds": rounds,
        "precision": precision, "compute_dtype": str(dtype).removeprefix("torch."),
        "compile_options": {k: str(v) for k, v in compile_options.items()},
        "data": {"channels": CHANNELS, "patch": PATCH, "sides_tokens": list(SIDES),
                 "images_per_step": images / len(timed), "real_tokens_per_step": real_tokens / len(timed),
                 "pack_fill": real_tokens / (len(timed) * max_tokens),
                 "padded_real_share_random": real_share(batchings["random"][warmup:]),
                 "padded_real_share_packs": real_share(timed)},
        "step": "nrtrain.train.train_step + read_step + clip_grad_norm_(1.0) + AdamW.step + zero_grad + update_ema",
        "mfu_formula": MFU_FORMULA, "peak_flops": peak_flops(device), "rows": [], "skipped": [], "refused": {},
    }
    log(f"data: native-size latents {CHANNELS} x h x w, h ~ N(12, 2.5), w ~ N(13, 2.5) clipped to "
        f"{SIDES[0]}..{SIDES[1]}, patch {PATCH}; LPFHP packs of L={max_tokens:,}; {warmup} warm-up + "
        f"{steps} timed steps of {images / len(timed):.1f} images and {real_tokens / len(timed):,.0f} real "
        f"tokens on average (pack fill {result['data']['pack_fill']:.1%}); padded, real tokens are "
        f"{result['data']['padded_real_share_random']:.1%} of the tokens of random batches and "
        f"{result['data']['padded_real_share_packs']:.1%} of those of pack batches")

    torch.manual_seed(seed)
    with torch.device(device):
        model = build_model(preset, in_channels=CHANNELS, patch_size=PATCH, attention="sdpa-loop")
    randomize_zero_layers(model, seed)
    config = model.config
    batchings = {name: [b.to(device) for b in batches] for name, batches in batchings.items()}
    params = sum(p.numel() for p in model.parameters())
    result["model"] = {"depth": config.depth, "hidden": config.hidden, "heads": config.heads, "parameters": params}
    log(f"model: NiT preset {preset} (depth {config.depth}, hidden {config.hidden}, heads {config.heads}, "
        f"{params / 1e6:.1f}M parameters), precision {precision} (attention computes in {result['compute_dtype']}); "
        f"one step = {result['step']}")
    first = batchings["random"][0]
    difference = layout_difference(model, first)
    result["layout_check"] = difference
    log(f"check: padded forward = packed forward on real tokens of {min(CHECK_IMAGES, first.num_images)} "
        f"images (fp32, sdpa-loop): max |diff| / max |out| = {difference:.1e}")
    if difference > 1e-3:
        raise AssertionError(f"the padded layout does not compute the same model (difference {difference:.1e}); "
                             "its figures would mean nothing")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # nr train's default; only fp32 matmuls are affected
        torch.backends.cudnn.allow_tf32 = True
    # every row starts from the same weights (and an EMA of them), so rows differ only in layout and kernels
    initial = {name: value.detach().clone() for name, value in model.state_dict().items()}
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    last_seconds = 0.0
    for compiled in compile_modes:
        names, refused = usable_backends(list(backends), device, dtype, compiled=compiled)
        for name, why in refused.items():
            result["refused"][f"{name}, compile {'on' if compiled else 'off'}"] = why
        # the baseline first, the length-bucketed padded batches last (the first to go when time runs out)
        rows = ([("padded", "random", PADDED_ATTENTION)] + [("packed", "packs", backend) for backend in names]
                + [("padded", "packs", PADDED_ATTENTION)] * ("packs" in padded_batchings))
        measured = {row: [] for row in rows}
        errors: dict[tuple, str] = {}
        skipped: set[tuple] = set()
        padded_fn = torch.compile(padded_block, **{"dynamic": True, **compile_options}) if compiled else padded_block
        for round_index in range(rounds):
            for row in (rows if round_index % 2 == 0 else rows[::-1]):
                layout, batching, backend = row
                if row in errors or row in skipped:
                    continue
                needed = max(last_seconds, compile_estimate_s if compiled else 0.0)
                left = budget_short(deadline, needed, last_seconds > 0)
                if left is not None:
                    skipped.add(row)
                    result["skipped"].append(f"{layout} {batching} {backend} compile {'on' if compiled else 'off'}: "
                                             f"{left:.0f} s of the budget left, a row takes about {needed:.0f} s")
                    continue
                started = time.monotonic()
                try:
                    model.load_state_dict(initial)
                    ema.load_state_dict(initial)
                    if compiled:
                        torch._dynamo.reset()
                    if layout == "packed":
                        model.config = replace(config, attention=backend)
                        model.use_attention(device, dtype, training=True, compiled=compiled)
                        if compiled:
                            model.compile_blocks(**compile_options)
                        net = model
                    else:
                        net = PaddedNiT(model, padded_fn)
                    measured[row].append(time_steps(net, model, ema, batchings[batching], warmup, autocast, device))
                except Exception as error:  # noqa: BLE001 - one backend's failure must not hide the others
                    errors[row] = f"{type(error).__name__}: {error}"
                    log(f"{layout} {batching} {backend} compile {'on' if compiled else 'off'} failed: {errors[row]}\n"
                        + traceback.format_exc(limit=-4))
                finally:
                    net = None
                    release(device)
                last_seconds = time.monotonic() - started
        baseline = measured[rows[0]]
        for row in rows:
            layout, batching, attention = row
            done = measured[row]
            entry = {"layout": layout, "batches": batching, "attention": attention, "compile": compiled,
                     "rounds_done": len(done)}
            if row in errors:
                entry.update(status="error", error=errors[row])
            elif not done:
                entry.update(status="skipped")
            else:
                median = {key: statistics.median(r[key] for r in done)
                          for key in ("step_s", "tokens_s", "images_s", "flops_s")}
                ratios = [r["tokens_s"] / b["tokens_s"] for r, b in zip(done, baseline)]
                peak = result["peak_flops"]
                entry.update(status="ok", step_s=median["step_s"], tokens_s=median["tokens_s"],
                             images_s=median["images_s"], tflops=median["flops_s"] / 1e12,
                             mfu=median["flops_s"] / peak if peak else None,
                             peak_gib=max(r["memory"] for r in done) if cuda else None,
                             vs_padded=statistics.median(ratios) if ratios else None,
                             vs_padded_range=[min(ratios), max(ratios)] if ratios else None,
                             graphs=max(r["recompiled"] for r in done) if compiled else None,
                             last_loss=done[-1]["loss"])
            result["rows"].append(entry)
    model.config = config
    return result


def format_row(row: dict) -> str:
    label = f"{row['layout']:<8}{row['batches']:<9}{row['attention']:<18}{'on' if row['compile'] else 'off':<9}"
    if row["status"] == "error":
        return f"{label}failed: {row['error']}"
    if row["status"] == "skipped":
        return f"{label}skipped (time budget)"
    ratio = "-"
    if row["vs_padded"] is not None:
        low, high = row["vs_padded_range"]
        ratio = f"{row['vs_padded']:.2f}x" + (f" ({low:.2f}-{high:.2f})" if row["rounds_done"] > 1 else "")
    mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
    memory = f"{row['peak_gib']:.1f}" if row["peak_gib"] is not None else "-"
    graphs = str(row["graphs"]) if row["graphs"] is not None else "-"
    return (f"{label}{row['step_s']:>8.3f}{row['tokens_s']:>12,.0f}{row['images_s']:>9,.1f}{row['tflops']:>9.3f}"
            f"{mfu:>7}{memory:>10}{ratio:>20}{graphs:>8}")


def print_table(result: dict, log: Callable[[str], None] = print) -> None:
    peak = result["peak_flops"]
    log(f"rows: medians over {result['rounds']} round(s); real tok/s counts real tokens only; "
        "TFLOP/s = sum model_flops(config, seqlens, training=True) / seconds"
        + (f"; MFU = TFLOP/s / peak {peak / 1e12:.0f} TFLOP/s (nrtrain.train.peak_flops)" if peak else
           "; MFU: no peak known for this device")
        + "; vs padded = real tok/s / that of padded random batches, same round and compile setting"
        + "; graphs = graphs compiled during the timed steps (0 = steady state)")
    log(f"{'layout':<8}{'batches':<9}{'attention':<18}{'compile':<9}{'s/step':>8}{'real tok/s':>12}{'img/s':>9}"
        f"{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'vs padded':>20}{'graphs':>8}")
    for row in result["rows"]:
        log(format_row(row))
    for name, why in result["refused"].items():
        log(f"not run: {name}: {why}")
    for note in result["skipped"]:
        log(f"skipped: {note}")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Defaults depend on the device: CUDA runs XL, L=16384, bf16, 10 steps, "
                                            "1 round, compile off and on; CPU runs demo, L=2048, fp32, 4 steps, "
                                            "3 rounds, compile off.")
    add_device_options(parser)
    parser.add_argument("--preset", choices=list(PRESETS), help="model size (default: XL on CUDA, demo on CPU)")
    parser.add_argument("--max-tokens", type=int, help="pack budget L (default: 16384 on CUDA, 2048 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default: 10 on CUDA, 4 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--backends", default="available",
                        help=f"comma-separated attention backends for the packed layout, from "
                             f"{', '.join(BACKENDS)} or auto; 'available' = every one of "
                             f"{', '.join(DEFAULT_BACKENDS)} that can train on the device")
    parser.add_argument("--rounds", type=int, help="measurements of every row, alternating order "
                                                   "(default: 1 on CUDA, 3 on CPU)")
    parser.add_argument("--compile", choices=("off", "on", "both"),
                        help="torch.compile the blocks (default: both on CUDA, off on CPU)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU (as nr train)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = resolve_device(parser, args)
    cuda = device.type == "cuda"
    defaults = dict(preset="XL" if cuda else "demo", max_tokens=16_384 if cuda else 2048, steps=10 if cuda else 4,
                    warmup=3 if cuda else 1, rounds=1 if cuda else 3, compile="both" if cuda else "off")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.max_tokens < LONGEST_IMAGE:
        parser.error(f"--max-tokens {args.max_tokens} is below the largest image ({SIDES[1]}x{SIDES[1]} = "
                     f"{LONGEST_IMAGE} tokens); use at least {LONGEST_IMAGE}")
    for name in ("steps", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        parser.error(f"--warmup must be >= 0, got {args.warmup}")
    if args.compile != "off" and args.warmup < 2:
        parser.error(f"--compile {args.compile} needs --warmup >= 2 (the first compile and the dynamic-shape "
                     f"recompile must not be timed), got {args.warmup}")
    if args.precision == "bf16" and not cuda:
        parser.error("--precision bf16 is for CUDA; on CPU use fp32 (bf16 autocast there is slower, not faster)")
    args.precision = "bf16" if args.precision == "bf16" or (args.precision == "auto" and cuda) else "fp32"

    names = (list(DEFAULT_BACKENDS) if args.backends == "available"
             else [name.strip() for name in args.backends.split(",") if name.strip()])
    if not names:
        parser.error("--backends is empty; name at least one backend")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    usable, refused = usable_backends(names, device, dtype, compiled=False)
    if args.backends != "available" and refused:
        parser.error("--backends: " + "; ".join(refused.values()))
    if not usable:
        parser.error(f"no attention backend can train on {device.type} here; pass --backends sdpa-loop")
    args.backends = names
    return args, device


def main(argv: list[str] | None = None) -> int:
    args, device = parse_args(argv)
    compile_modes = {"off": (False,), "on": (True,), "both": (False, True)}[args.compile]
    print_header("NiT training-step throughput (nr train's step): packed batches against the same images padded",
                 device)
    try:
        result = measure_training(device, preset=args.preset, max_tokens=args.max_tokens, steps=args.steps,
                                  warmup=args.warmup, backends=args.backends, compile_modes=compile_modes,
                                  precision=args.precision, rounds=args.rounds, seed=args.seed,
                                  log=lambda text: print(text, flush=True))
    except AssertionError as error:
        print(error, file=sys.stderr)
        return 1
    print_table(result)
    print(f"load average (1, 5, 15 min) after: {load_average()}; above {os.cpu_count()} means other work "
          "competed for the cores")
    return 1 if any(row["status"] == "error" for row in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
