"""Training-step throughput of NiT on packed batches against the same images padded, same run.

Data: synthetic latents of ImageNet-1k at DC-AE f32c32 native resolution, as bench/loader_throughput.py
draws them (32 channels, patch 1, side lengths in tokens h ~ N(12, 2.5), w ~ N(13, 2.5), rounded and
clipped to 5..16, independently). Their token counts are packed into packs of at most L tokens with
`nrdata.packing.pack` (LPFHP); the first `--warmup` + `--steps` packs of that packing are the steps.
Values are random normal; only shapes matter here. All batches sit on the device before timing (the
loader is not measured: bench/loader_throughput.py does that).

Every row trains on the same images with the same number of images in each step (so the same real
tokens over the timed steps, and the same number of steps), with the same flow-matching loss
(`nrtrain.transport.FlowMatchingLoss`, per-image reduction, label dropout 0.1) and weights:

* packed: the model as `nr train` runs it, one sequence of the pack's tokens, block-diagonal attention
  by each backend of `--backends` (by default every one that can train on this device);
* padded: each image padded with zeros to the longest image of its batch, [B, L_max, C], run through
  the same model's modules as a plain batch (per-image adaLN broadcast over its row, RoPE of the real
  positions), attention with a key-padding mask in one SDPA call (what a padded DiT/FiT trainer does;
  it does not depend on `--backends`), outputs of padding tokens discarded, so the loss is on real
  tokens only. Tokens are scattered to the padded layout and gathered back inside the timed step
  (O(T x C) copies, negligible next to the transformer). Two batchings of the same images:
    random  the images of the timed packs shuffled and dealt into batches of the packs' image counts
            (a plain random sampler: the baseline the "vs padded" column divides by);
    packs   each batch = one pack's images. LPFHP fills a pack from one to three distinct lengths, so
            this is a length-bucketed padded trainer and pads almost nothing.
Before timing, both layouts' forwards are compared on real tokens (fp32, sdpa-loop); the script stops
if they differ. The adaLN-Zero and final layers are drawn at std 0.02 instead of zero, so that this
comparison is not 0 = 0; random weights change no kernel's speed.

One step = forward + backward + gradient clipping (1.0) + AdamW step + zero_grad: `nrtrain.train`'s
step without EMA and logging; it reads the loss back (`.item()`), as the trainer does, so each step
ends synchronised. Each row starts a fresh AdamW; its first `--warmup` steps (optimizer state,
autotuning, compilation and the dynamic-shape recompile under `--compile`) are not timed. The rows
run `--rounds` times, every other round in reverse order (the machine may be shared); figures are
medians over rounds, ratios are taken within a round. Columns:

  real tok/s = real tokens of the timed steps / their seconds (the same numerator in every row)
  TFLOP/s    = sum over timed steps of model_flops(config, seqlens, training=True) / seconds
  MFU        = TFLOP/s / peak, peak = nrtrain.train.peak_flops(device) (dense bf16: 989e12 on H100/H200),
               CUDA only. model_flops counts the useful FLOPs of the real images (nrtrain/flops.py:
               per-image adaLN, block-diagonal attention, backward = 2x forward), so padding and
               recomputation never raise it; every row has the same numerator.
  peak GiB   = torch.cuda.max_memory_allocated over the row (weights, AdamW state, batches included).
  vs padded  = real tok/s / real tok/s of padded random batches in the same round and compile setting
               (median, and the range over rounds).
  graphs     = (compile on) graphs dynamo compiled during the timed steps: 0 means steady state; more
               means recompiles were timed (packs differ in length and image count, and sdpa-loop's
               per-pack runs of equal-length images are Python ints that dynamo specialises on).

On a CPU shared with other work, torch's intra-op threads wait on each other and small ops slow down
by large, uneven factors; there `--threads 1` gives steadier figures.

Usage:
    .venv/bin/python bench/train_throughput.py                 # CPU: preset demo, L=2048, fp32
    .venv/bin/python bench/train_throughput.py --threads 1 --backends sdpa-loop --steps 8
    python bench/train_throughput.py --compile both            # CUDA: preset XL, L=16384, bf16 autocast
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters as compile_counters

from nrdata.packing import pack
from nrtrain.attention import BACKENDS, resolve_backend
from nrtrain.flops import model_flops
from nrtrain.model import PRESETS, NiT, build_model, modulate
from nrtrain.packed import PackedBatch, packed_from_tokens
from nrtrain.rope import apply_rope, rope_coordinates, rope_cos_sin
from nrtrain.train import TrainConfig, make_optimizer, peak_flops
from nrtrain.transport import FlowMatchingLoss

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_device import (add_device_options, load_average, print_header, randomize_zero_layers,  # noqa: E402
                          resolve_device)

CHANNELS = 32
PATCH = 1
SIDES = (5, 16)
LONGEST_IMAGE = SIDES[1] * SIDES[1]
CHECK_IMAGES = 8
PADDED_ATTENTION = "key-padding SDPA"


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
    is shared with the packed layout; inside, every image occupies L_max rows and attention ignores
    the padding keys.
    """

    def __init__(self, model: NiT):
        super().__init__()
        self.model = model

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
            h = padded_block(block, h, c, cos, sin, key_mask)
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
    attention = model.config.attention
    model.config = replace(model.config, attention="sdpa-loop")
    try:
        with torch.no_grad():
            packed = model(small.tokens, t, small.labels, small)
            padded = PaddedNiT(model)(small.tokens, t, small.labels, small)
    finally:
        model.config = replace(model.config, attention=attention)
    return float((packed - padded).abs().max() / packed.abs().max())


def measure(net: nn.Module, model: NiT, batches: list[PackedBatch], warmup: int, autocast,
            device: torch.device) -> dict:
    """Train `warmup` untimed steps then the rest; rates of the timed steps."""
    timed = batches[warmup:]
    real_tokens = sum(b.num_tokens for b in timed)
    useful_flops = sum(model_flops(model.config, b.seqlens(), training=True) for b in timed)
    optimizer = make_optimizer(model, TrainConfig())
    loss_fn = FlowMatchingLoss(null_class=model.null_class)
    generator = torch.Generator(device).manual_seed(0)  # the same t, noise and dropout for every row
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model.train()

    def step(batch: PackedBatch) -> float:
        with autocast():
            terms = loss_fn(net, batch, generator)
        terms.loss.float().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return terms.loss.item()

    for batch in batches[:warmup]:
        step(batch)
    if cuda:
        torch.cuda.synchronize(device)
    graphs = compile_counters["stats"]["unique_graphs"]
    started = time.perf_counter()
    losses = [step(batch) for batch in timed]
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    recompiled = compile_counters["stats"]["unique_graphs"] - graphs
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"non-finite loss in a timed step: {losses}")
    return {"step_s": seconds / len(timed), "tokens_s": real_tokens / seconds,
            "images_s": sum(b.num_images for b in timed) / seconds, "flops_s": useful_flops / seconds,
            "memory": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None, "recompiled": recompiled}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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
                             f"{', '.join(BACKENDS)} or auto; 'available' = every one that can train on the device")
    parser.add_argument("--rounds", type=int, help="measurements of every row, alternating order "
                                                   "(default: 1 on CUDA, 3 on CPU)")
    parser.add_argument("--compile", choices=("off", "on", "both"),
                        help="torch.compile the model (default: both on CUDA, off on CPU)")
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

    names = (list(BACKENDS) if args.backends == "available"
             else [name.strip() for name in args.backends.split(",") if name.strip()])
    if not names:
        parser.error("--backends is empty; name at least one backend")
    backends = []
    for name in names:
        try:
            backend = resolve_backend(name, device.type, needs_backward=True)
        except ValueError as error:
            if args.backends == "available":
                continue
            parser.error(f"--backends: {error}")
        if backend not in backends:
            backends.append(backend)
    if args.precision == "fp32" or (args.precision == "auto" and not cuda):
        half_only = [b for b in backends if b in ("flash-varlen", "torch-varlen")]
        if half_only and args.backends != "available":
            parser.error(f"--backends {', '.join(half_only)} need bf16; drop them or use --precision bf16")
        backends = [b for b in backends if b not in half_only]
    if not backends:
        parser.error(f"no attention backend can train on {device.type} here; pass --backends sdpa-loop")
    args.backends = backends
    return args, device


def main(argv: list[str] | None = None) -> int:
    args, device = parse_args(argv)
    # the model resolves its (lru-cached, pure) attention backend inside forward; dynamo warns, harmlessly
    warnings.filterwarnings("ignore", message=".*functools.lru_cache.*", category=UserWarning)
    cuda = device.type == "cuda"
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else nullcontext
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    print_header("NiT training-step throughput: packed batches against the same images padded", device)

    packs = draw_packs(args.warmup + args.steps, args.max_tokens, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    # warm-up and timed images are shuffled apart, so every row times the same images
    random_groups = shuffled_like(packs[:args.warmup], rng) + shuffled_like(packs[args.warmup:], rng)
    batchings = {"packs": [batch_of(group) for group in packs], "random": [batch_of(group) for group in random_groups]}
    timed = batchings["packs"][args.warmup:]
    real_tokens, images = sum(b.num_tokens for b in timed), sum(b.num_images for b in timed)
    print(f"data: native-size latents {CHANNELS} x h x w, h ~ N(12, 2.5), w ~ N(13, 2.5) clipped to "
          f"{SIDES[0]}..{SIDES[1]}, patch {PATCH}; LPFHP packs of L={args.max_tokens:,}; {args.warmup} warm-up + "
          f"{args.steps} timed steps of {images / len(timed):.1f} images and {real_tokens / len(timed):,.0f} real "
          f"tokens on average (pack fill {real_tokens / (len(timed) * args.max_tokens):.1%}); padded, real tokens "
          f"are {real_share(batchings['random'][args.warmup:]):.1%} of the tokens of random batches and "
          f"{real_share(timed):.1%} of those of pack batches")

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = build_model(args.preset, in_channels=CHANNELS, patch_size=PATCH, attention=args.backends[0])
    randomize_zero_layers(model, args.seed)
    config = model.config
    batchings = {name: [b.to(device) for b in batches] for name, batches in batchings.items()}
    params = sum(p.numel() for p in model.parameters())
    print(f"model: NiT preset {args.preset} (depth {config.depth}, hidden {config.hidden}, heads {config.heads}, "
          f"{params / 1e6:.1f}M parameters), {'bf16 autocast' if bf16 else 'fp32'}; one step = forward + backward "
          f"+ grad clip + AdamW + zero_grad (nr train's step without EMA), loss read back every step")
    first = batchings["random"][0]
    difference = layout_difference(model, first)
    print(f"check: padded forward = packed forward on real tokens of {min(CHECK_IMAGES, first.num_images)} "
          f"images (fp32, sdpa-loop): max |diff| / max |out| = {difference:.1e}")
    if difference > 1e-3:
        print("the padded layout does not compute the same model; its figures would mean nothing", file=sys.stderr)
        return 1
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # nr train's default; only fp32 matmuls are affected
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device)
    print(f"rows: medians over {args.rounds} round(s); real tok/s counts real tokens only; "
          "TFLOP/s = sum model_flops(config, seqlens, training=True) / seconds"
          + (f"; MFU = TFLOP/s / peak {peak / 1e12:.0f} TFLOP/s (nrtrain.train.peak_flops)" if peak else
             "; MFU: no peak known for this device")
          + "; vs padded = real tok/s / that of padded random batches, same round and compile setting"
          + ("; graphs = graphs compiled during the timed steps (0 = steady state)" if any(compile_modes) else ""))

    rows = ([("padded", "random", PADDED_ATTENTION), ("padded", "packs", PADDED_ATTENTION)]
            + [("packed", "packs", backend) for backend in args.backends])
    print(f"{'layout':<8}{'batches':<9}{'attention':<18}{'compile':<9}{'s/step':>8}{'real tok/s':>12}{'img/s':>9}"
          f"{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'vs padded':>20}{'graphs':>8}")
    for compiled in compile_modes:
        results = {row: [] for row in rows}
        for round_index in range(args.rounds):
            for row in (rows if round_index % 2 == 0 else rows[::-1]):
                layout, batching, backend = row
                if layout == "packed":
                    model.config = replace(config, attention=backend)
                net = model if layout == "packed" else PaddedNiT(model)
                if compiled:
                    torch._dynamo.reset()
                    net = torch.compile(net)
                try:
                    results[row].append(measure(net, model, batchings[batching], args.warmup, autocast, device))
                except torch.OutOfMemoryError:
                    results[row].append(None)
                del net
                release(device)
        baseline = results[rows[0]]
        for row, measured in results.items():
            layout, batching, attention = row
            label = f"{layout:<8}{batching:<9}{attention:<18}{'on' if compiled else 'off':<9}"
            done = [r for r in measured if r is not None]
            if len(done) < len(measured):
                print(f"{label}out of device memory in {len(measured) - len(done)} of {len(measured)} round(s)")
            if not done:
                continue
            median = {key: statistics.median(r[key] for r in done) for key in ("step_s", "tokens_s", "images_s",
                                                                               "flops_s")}
            ratios = [r["tokens_s"] / b["tokens_s"] for r, b in zip(measured, baseline) if r and b]
            ratio = "-" if not ratios else f"{statistics.median(ratios):.2f}x" + (
                f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else "")
            mfu = f"{median['flops_s'] / peak:.1%}" if peak else "-"
            memory = f"{max(r['memory'] for r in done):.1f}" if cuda else "-"
            graphs = str(max(r["recompiled"] for r in done)) if compiled else "-"
            print(f"{label}{median['step_s']:>8.3f}{median['tokens_s']:>12,.0f}{median['images_s']:>9,.1f}"
                  f"{median['flops_s'] / 1e12:>9.3f}{mfu:>7}{memory:>10}{ratio:>20}{graphs:>8}", flush=True)
    print(f"load average (1, 5, 15 min) after: {load_average()}; above {os.cpu_count()} means other work "
          "competed for the cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
