"""Training-step throughput of NiT on packed batches against the same images padded, same run.

Data: synthetic latents of ImageNet-1k at DC-AE f32c32 native resolution, as bench/loader_throughput.py
draws them (32 channels, patch 1, side lengths in tokens h ~ N(12, 2.5), w ~ N(13, 2.5), rounded and
clipped to 5..16, independently). Their token counts are packed into packs of at most L tokens with
`nrdata.packing.pack` (LPFHP); the first `--warmup` + `--steps` packs of that packing are the batches.
Values are random normal; only shapes matter here. All batches sit on the device before timing (the
loader is not measured: bench/loader_throughput.py does that).

Two layouts train on exactly the same images per step (so the same real tokens and the same images per
step), with the same flow-matching loss (`nrtrain.transport.FlowMatchingLoss`, per-image reduction,
label dropout 0.1), the same t and noise draws and the same weights:

* packed: the model as `nr train` runs it, one sequence of the pack's tokens, block-diagonal attention
  by the backend named in `--backends` (each one that can train on this device by default);
* padded: each image padded with zeros to the longest image of its batch, [B, L_max, C], run through
  the same model's modules as a plain batch (per-image adaLN broadcast over its row, RoPE of the real
  positions), attention with a key-padding mask in one SDPA call (what a padded DiT/FiT trainer does;
  it does not depend on `--backends`), outputs of padding tokens discarded, so the loss is on real
  tokens only. Tokens are scattered to the padded layout and gathered back inside the timed step
  (O(T x C) copies, negligible next to the transformer).
Before timing, both layouts' forwards are compared on real tokens (fp32, sdpa-loop); the script stops
if they differ. The adaLN-Zero and final layers are drawn at std 0.02 instead of zero, so that this
comparison is not 0 = 0; random weights change no kernel's speed.

One step = forward + backward + gradient clipping (1.0) + AdamW step + zero_grad: `nrtrain.train`'s
step without EMA and logging; it reads the loss back (`.item()`), as the trainer does, so each step
ends synchronised. The first `--warmup` steps (optimizer state allocation, autotuning, compilation
and the dynamic-shape recompile under `--compile`) are not timed. Figures:

  real tok/s = real tokens of the timed steps / their seconds (the same numerator for both layouts)
  TFLOP/s    = sum over timed steps of model_flops(config, seqlens, training=True) / seconds
  MFU        = TFLOP/s / peak, peak = nrtrain.train.peak_flops(device) (dense bf16: 989e12 on H100/H200),
               CUDA only. model_flops counts the useful FLOPs of the real images (nrtrain/flops.py:
               per-image adaLN, block-diagonal attention, backward = 2x forward), so padding and
               recomputation never raise it; the padded layout gets the same numerator.
  vs padded  = packed real tok/s / padded real tok/s, same compile setting.
  graphs     = (compile on) graphs dynamo compiled during the timed steps: 0 means steady state; more
               means recompiles were timed (packs differ in length and image count, and sdpa-loop's
               per-pack runs of equal-length images are Python ints that dynamo specialises on).

Usage:
    .venv/bin/python bench/train_throughput.py                 # CPU: preset demo, L=2048, fp32
    .venv/bin/python bench/train_throughput.py --backends sdpa-loop --steps 8
    python bench/train_throughput.py --compile both            # CUDA: preset XL, L=16384, bf16 autocast
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import shlex
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


def make_batches(count: int, max_tokens: int, seed: int) -> list[PackedBatch]:
    """`count` packs of native-size latents (random values), in the packing's order."""
    rng = np.random.default_rng(seed)
    rows = max(20_000, math.ceil(2 * count * max_tokens / 150))  # about 2x the images `count` full packs hold
    h, w = latent_sides(rng, rows)
    packing = pack(h * w, max_tokens, algorithm="lpfhp", seed=seed)
    batches = []
    for p in range(count):
        ids = packing.pack(p)
        sizes = list(zip(h[ids].tolist(), w[ids].tolist()))
        tokens = [torch.from_numpy(rng.standard_normal((a * b, CHANNELS), dtype=np.float32)) for a, b in sizes]
        labels = rng.integers(0, 1000, len(sizes)).tolist()
        batches.append(packed_from_tokens(tokens, sizes, labels))
    return batches


def randomize_zero_layers(model: nn.Module, seed: int) -> None:
    """Draw the zero-initialised (adaLN-Zero, final) weights at std 0.02 so outputs are not all zero."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


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


def measure(net: nn.Module, model: NiT, batches: list[PackedBatch], warmup: int, autocast, device: torch.device,
            real_tokens: int, useful_flops: int) -> dict:
    """Train `warmup` untimed steps then the rest; rates of the timed steps."""
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
    losses = [step(batch) for batch in batches[warmup:]]
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    recompiled = compile_counters["stats"]["unique_graphs"] - graphs
    if not all(math.isfinite(x) for x in losses):
        raise SystemExit(f"non-finite loss in a timed step: {losses}")
    timed = len(batches) - warmup
    return {"seconds": seconds, "step_s": seconds / timed, "tokens_s": real_tokens / seconds,
            "images_s": sum(b.num_images for b in batches[warmup:]) / seconds, "flops_s": useful_flops / seconds,
            "memory": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None, "recompiled": recompiled}


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Defaults depend on the device: CUDA runs XL, L=16384, bf16, 10 steps, "
                                            "compile off and on; CPU runs demo, L=2048, fp32, 4 steps, compile off.")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--preset", choices=list(PRESETS), help="model size (default: XL on CUDA, demo on CPU)")
    parser.add_argument("--max-tokens", type=int, help="pack budget L (default: 16384 on CUDA, 2048 on CPU)")
    parser.add_argument("--steps", type=int, help="timed steps per row (default: 10 on CUDA, 4 on CPU)")
    parser.add_argument("--warmup", type=int, help="untimed steps first (default: 3 on CUDA, 1 on CPU)")
    parser.add_argument("--backends", default="available",
                        help=f"comma-separated attention backends for the packed layout, from "
                             f"{', '.join(BACKENDS)} or auto; 'available' = every one that can train on the device")
    parser.add_argument("--compile", choices=("off", "on", "both"),
                        help="torch.compile the model (default: both on CUDA, off on CPU)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU (as nr train)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError as error:
            parser.error(f"--device {args.device!r}: {error}")
        if device.type not in ("cpu", "cuda"):
            parser.error(f"--device {args.device!r}: use cpu or cuda")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    cuda = device.type == "cuda"
    defaults = dict(preset="XL" if cuda else "demo", max_tokens=16_384 if cuda else 2048, steps=10 if cuda else 4,
                    warmup=3 if cuda else 1, compile="both" if cuda else "off")
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.max_tokens < LONGEST_IMAGE:
        parser.error(f"--max-tokens {args.max_tokens} is below the largest image ({SIDES[1]}x{SIDES[1]} = "
                     f"{LONGEST_IMAGE} tokens); use at least {LONGEST_IMAGE}")
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
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
    gpu = torch.cuda.get_device_name(device) if cuda else "no GPU"

    print("NiT training-step throughput: packed batches against the same images padded")
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
          f"{platform.machine()}, python {platform.python_version()}, torch {torch.__version__}, "
          f"device {device} ({gpu}), load average (1, 5, 15 min) {load_average()}")

    batches = make_batches(args.warmup + args.steps, args.max_tokens, args.seed)
    timed = batches[args.warmup:]
    real_tokens = sum(b.num_tokens for b in timed)
    padded_tokens = sum(b.num_images * b.max_seqlen for b in timed)
    images = sum(b.num_images for b in timed)
    print(f"data: native-size latents {CHANNELS} x h x w, h ~ N(12, 2.5), w ~ N(13, 2.5) clipped to "
          f"{SIDES[0]}..{SIDES[1]}, patch {PATCH}; LPFHP packs of L={args.max_tokens:,}; {args.warmup} warm-up + "
          f"{args.steps} timed steps; "
          f"timed steps hold {images / len(timed):.1f} images and {real_tokens / len(timed):,.0f} real tokens per "
          f"step (pack fill {real_tokens / (len(timed) * args.max_tokens):.1%}); padded, the same images are "
          f"{padded_tokens / len(timed):,.0f} tokens per step ({real_tokens / padded_tokens:.1%} real)")

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = build_model(args.preset, in_channels=CHANNELS, patch_size=PATCH, attention=args.backends[0])
    randomize_zero_layers(model, args.seed)
    config = model.config
    batches = [b.to(device) for b in batches]
    timed = batches[args.warmup:]
    useful_flops = sum(model_flops(config, b.seqlens(), training=True) for b in timed)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: NiT preset {args.preset} (depth {config.depth}, hidden {config.hidden}, heads {config.heads}, "
          f"{params / 1e6:.1f}M parameters), {'bf16 autocast' if bf16 else 'fp32'}; one step = forward + backward "
          f"+ grad clip + AdamW + zero_grad (nr train's step without EMA), loss read back every step")
    difference = layout_difference(model, batches[0])
    print(f"check: padded forward = packed forward on real tokens of {min(CHECK_IMAGES, batches[0].num_images)} "
          f"images (fp32, sdpa-loop): max |diff| / max |out| = {difference:.1e}")
    if difference > 1e-3:
        print("the padded layout does not compute the same model; its figures would mean nothing", file=sys.stderr)
        return 1
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # nr train's default; only fp32 matmuls are affected
        torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device)
    print("rows: same images per step in both layouts; real tok/s counts real tokens only; "
          "TFLOP/s = sum model_flops(config, seqlens, training=True) / seconds"
          + (f"; MFU = TFLOP/s / peak {peak / 1e12:.0f} TFLOP/s (nrtrain.train.peak_flops)" if peak else
             "; MFU: no peak known for this device")
          + "; vs padded = real tok/s / padded real tok/s, same compile setting"
          + ("; graphs = graphs compiled during the timed steps (0 = steady state)" if any(compile_modes) else ""))

    header = (f"{'layout':<8}{'attention':<18}{'compile':<9}{'s/step':>8}{'real tok/s':>12}{'img/s':>9}"
              f"{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}{'vs padded':>11}{'graphs':>8}")
    print(header)
    for compiled in compile_modes:
        rows = [("padded", PADDED_ATTENTION, None)] + [("packed", backend, backend) for backend in args.backends]
        padded_rate = None
        for layout, label, backend in rows:
            if backend is not None:
                model.config = replace(config, attention=backend)
            net = model if layout == "packed" else PaddedNiT(model)
            if compiled:
                torch._dynamo.reset()
                net = torch.compile(net)
            try:
                r = measure(net, model, batches, args.warmup, autocast, device, real_tokens, useful_flops)
            except torch.OutOfMemoryError:
                print(f"{layout:<8}{label:<18}{'on' if compiled else 'off':<9}  out of device memory")
                r = None
            del net
            release(device)
            if r is None:
                continue
            if layout == "padded":
                padded_rate = r["tokens_s"]
            mfu = f"{r['flops_s'] / peak:.1%}" if peak else "-"
            memory = f"{r['memory']:.1f}" if r["memory"] is not None else "-"
            ratio = f"{r['tokens_s'] / padded_rate:.2f}x" if padded_rate else "-"
            graphs = str(r["recompiled"]) if compiled else "-"
            print(f"{layout:<8}{label:<18}{'on' if compiled else 'off':<9}{r['step_s']:>8.3f}{r['tokens_s']:>12,.0f}"
                  f"{r['images_s']:>9,.1f}{r['flops_s'] / 1e12:>9.3f}{mfu:>7}{memory:>10}{ratio:>11}{graphs:>8}",
                  flush=True)
    print(f"load average (1, 5, 15 min) after: {load_average()}; above {os.cpu_count()} means other work "
          "competed for the cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
