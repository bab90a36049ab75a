"""Sampling throughput of NiT: CFG on an interval of t against CFG on every step, same run.

`nrtrain.transport.sample` with a NiT of random weights (throughput does not depend on them; the
adaLN-Zero and final layers are drawn at std 0.02 instead of zero so the velocity is not identically
zero), Euler ODE, `--steps` steps, CFG scale `--cfg-scale` applied where t lies in `--interval`
(NiT's (0, 0.7): t = 1 is noise, so the first, noisiest steps run unguided on the conditional pack
alone) against the same scale on every step ([0, 1]). Inside the interval one model call runs the
doubled pack (conditional images + the same images with the null class, 2x the tokens); outside it,
one call on the pack. Images are square at each of `--sizes` pixels, DC-AE f32c32 latents (32
channels, 32 px per latent pixel, patch 1: 256 px = 8x8 tokens, 512 px = 16x16), `--batch` images
per `sample` call, all of one size. The model runs in bf16 on CUDA and fp32 on CPU and the state is
integrated in float64 (nr sample's defaults); start noise is drawn before timing; VAE decoding is
not included.

Counted per sampling call, by a wrapper around the model: forward passes, those on the doubled pack,
and tokens through the model; `sample` reports NFE (velocity evaluations) and guided NFE, and the
script checks that its own count agrees. Pack-sized forwards = NFE + guided NFE (a doubled pass costs
two), so their ratio is the speed-up the interval can give at best; the measured img/s ratio is
printed next to it. Each size gets one untimed warm-up call; the two settings then alternate for
`--repeats` rounds and each figure is the median. On a CPU shared with other work, torch's intra-op
threads wait on each other and small ops slow down by large, uneven factors; there `--threads 1`
gives steadier figures.

  img/s   = batch / seconds of one `sample` call (median over repeats)
  TFLOP/s = model FLOPs of the call (nrtrain.flops.model_flops per forward, useful FLOPs) / seconds
  MFU     = TFLOP/s / nrtrain.train.peak_flops(device) (dense bf16 peak; CUDA only)

`measure_sampling(...)` does this and returns a dict (bench/gpu_check.py calls it); the command line
prints it as a table.

Usage:
    .venv/bin/python bench/sample_throughput.py          # CPU: preset demo, 20 steps, batch 4
    python bench/sample_throughput.py                     # CUDA: preset XL, 50 steps, batch 128, bf16
    python bench/sample_throughput.py --sizes 256 --batch 256 --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn as nn

from nrtrain.attention import resolve_backend
from nrtrain.flops import model_flops
from nrtrain.model import PRESETS, NiT, build_model
from nrtrain.packed import PackedBatch
from nrtrain.train import peak_flops
from nrtrain.transport import noise_pack, sample

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_device import (add_device_options, budget_short, load_average, print_header, randomize_zero_layers,  # noqa: E402
                          resolve_device)

CHANNELS = 32
FACTOR = 32  # DC-AE f32: pixels per latent pixel
PATCH = 1
EVERY_STEP = (0.0, 1.0)


class CountingModel(nn.Module):
    """The model, counting its forward passes: all, those on a doubled (CFG) pack, and tokens."""

    def __init__(self, model: NiT, images: int):
        super().__init__()
        self.model = model
        self.images = images
        self.forwards = self.doubled = self.tokens = 0

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        self.forwards += 1
        self.doubled += int(batch.num_images == 2 * self.images)
        self.tokens += x.shape[0]
        return self.model(x, t, y, batch)


def run(model: NiT, noise: PackedBatch, steps: int, cfg_scale: float, interval: tuple[float, float],
        device: torch.device) -> dict:
    """One timed `sample` call and what it counted."""
    counter = CountingModel(model, noise.num_images)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = sample(counter, noise, noise.labels, null_class=model.null_class, solver="euler", steps=steps,
                    cfg_scale=cfg_scale, cfg_interval=interval, model_dtype=next(model.parameters()).dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    if not torch.isfinite(result.tokens).all():
        raise FloatingPointError(f"non-finite samples with cfg interval {interval}")
    if (counter.forwards, counter.doubled) != (result.nfe, result.guided_nfe):
        raise AssertionError(f"counted {counter.forwards} forwards ({counter.doubled} doubled) but sample reports "
                         f"nfe {result.nfe}, guided {result.guided_nfe}")
    seqlens = noise.seqlens()
    flops = ((counter.forwards - counter.doubled) * model_flops(model.config, seqlens)
             + counter.doubled * model_flops(model.config, seqlens * 2))
    return {"seconds": seconds, "nfe": result.nfe, "guided": result.guided_nfe, "forwards": counter.forwards,
            "doubled": counter.doubled, "tokens": counter.tokens, "flops": flops}


def parse_interval(text: str) -> tuple[float, float]:
    try:
        low, high = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH (two numbers, e.g. 0,0.7)") from None
    if not 0 <= low <= high <= 1:
        raise argparse.ArgumentTypeError(f"interval {text!r} must satisfy 0 <= LOW <= HIGH <= 1")
    return low, high


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of pixel sizes, "
                                         "e.g. 256,512") from None
    bad = [s for s in sizes if s < FACTOR or s % FACTOR]
    if not sizes or bad:
        raise argparse.ArgumentTypeError(f"sizes must be positive multiples of {FACTOR} px (DC-AE f32), got {text!r}")
    return sizes


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, torch.device]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Defaults depend on the device: CUDA runs XL in bf16, 50 steps, batch 128; "
                                            "CPU runs demo in fp32, 20 steps, batch 4.")
    add_device_options(parser)
    parser.add_argument("--preset", choices=list(PRESETS), help="model size (default: XL on CUDA, demo on CPU)")
    parser.add_argument("--sizes", type=parse_sizes, default=[256, 512],
                        help="square image sizes in pixels, comma-separated (default: 256,512)")
    parser.add_argument("--batch", type=int, help="images per sample call (default: 128 on CUDA, 4 on CPU)")
    parser.add_argument("--steps", type=int, help="Euler steps (default: 50 on CUDA, 20 on CPU)")
    parser.add_argument("--cfg-scale", type=float, default=4.0)
    parser.add_argument("--interval", type=parse_interval, default=(0.0, 0.7),
                        help="CFG interval LOW,HIGH of t (t = 1 is noise), measured against 0,1 (default: 0,0.7)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (median)")
    parser.add_argument("--attention", default="auto", help="attention backend (default: auto, as nr sample)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    device = resolve_device(parser, args)
    cuda = device.type == "cuda"
    defaults = dict(preset="XL" if cuda else "demo", batch=128 if cuda else 4, steps=50 if cuda else 20)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.cfg_scale <= 1:
        parser.error(f"--cfg-scale must be > 1 (1 means no guidance, nothing to compare), got {args.cfg_scale}")
    if args.interval == EVERY_STEP:
        parser.error("--interval 0,1 is the baseline itself; give a narrower interval, e.g. 0,0.7")
    try:
        resolve_backend(args.attention, device.type, torch.bfloat16 if cuda else torch.float32)
    except ValueError as error:
        parser.error(f"--attention: {error}")
    return args, device


def measure_sampling(device: torch.device, *, preset: str = "XL", sizes: list[int] = (256, 512), batch: int = 128,
                     steps: int = 50, cfg_scale: float = 4.0, interval: tuple[float, float] = (0.0, 0.7),
                     repeats: int = 3, attention: str = "auto", model_dtype: torch.dtype | None = None, seed: int = 0,
                     deadline: float | None = None, log: Callable[[str], None] = print) -> dict:
    """CFG on `interval` against CFG on every step, per size; returns a dict of every figure.

    `deadline` (time.monotonic()) skips the sizes after the first that would not end before it, listed
    under "skipped".
    Raises AssertionError when the interval run does not do fewer doubled passes.
    """
    cuda = device.type == "cuda"
    model_dtype = model_dtype or (torch.bfloat16 if cuda else torch.float32)
    torch.manual_seed(seed)
    with torch.device(device):
        model = build_model(preset, in_channels=CHANNELS, patch_size=PATCH, attention=attention)
    randomize_zero_layers(model, seed)
    model = model.to(model_dtype).eval()
    backend = model.use_attention(device, model_dtype, training=False)  # as nr sample fixes it
    config = model.config
    params = sum(p.numel() for p in model.parameters())
    peak = peak_flops(device)
    dtype_name = str(model_dtype).removeprefix("torch.")
    result = {"preset": preset, "parameters": params, "model_dtype": dtype_name, "attention": backend,
              "solver": "euler", "steps": steps, "cfg_scale": cfg_scale, "interval": list(interval),
              "baseline_interval": list(EVERY_STEP), "batch": batch, "repeats": repeats, "peak_flops": peak,
              "decode_included": False, "sizes": [], "skipped": []}
    log(f"model: NiT preset {preset} (depth {config.depth}, hidden {config.hidden}, heads {config.heads}, "
        f"{params / 1e6:.1f}M parameters), random weights, {dtype_name}, attention {backend}; Euler ODE {steps} "
        f"steps, CFG scale {cfg_scale:g}, state in float64, batch {batch} images, {repeats} timed call(s) per "
        "setting (median), decode not included")
    last_seconds = 0.0
    for size in sizes:
        left = budget_short(deadline, last_seconds, bool(result["sizes"]))
        if left is not None:
            result["skipped"].append(f"{size} px: {left:.0f} s of the budget left, the last size took "
                                     f"{last_seconds:.0f} s")
            continue
        started = time.monotonic()
        side = size // FACTOR // PATCH
        labels = torch.randint(0, config.num_classes, (batch,), generator=torch.Generator().manual_seed(size))
        noise = noise_pack([(side, side)] * batch, config.token_dim, range(batch), labels).to(device)
        run(model, noise, min(steps, 3), cfg_scale, EVERY_STEP, device)  # warm-up, untimed
        settings = {"every": EVERY_STEP, "interval": interval}
        measured = {name: [] for name in settings}
        for repeat in range(repeats):
            order = list(settings) if repeat % 2 == 0 else list(reversed(settings))
            for name in order:
                measured[name].append(run(model, noise, steps, cfg_scale, settings[name], device))
        entry = {"size": size, "tokens": [side, side], "settings": {}}
        for name in settings:
            first = measured[name][0]
            seconds = statistics.median(r["seconds"] for r in measured[name])
            flops_s = first["flops"] / seconds
            entry["settings"][name] = {
                "cfg_interval": list(settings[name]), "nfe": first["nfe"], "guided_nfe": first["guided"],
                "forwards": first["forwards"], "doubled": first["doubled"],
                "pack_sized": first["nfe"] + first["guided"], "tokens_per_call": first["tokens"] / first["forwards"],
                "seconds": seconds, "images_s": batch / seconds, "tflops": flops_s / 1e12,
                "mfu": flops_s / peak if peak else None}
        every, inside = entry["settings"]["every"], entry["settings"]["interval"]
        if inside["doubled"] >= every["doubled"]:
            raise AssertionError(f"the interval run did not do fewer doubled passes ({inside['doubled']} vs "
                                 f"{every['doubled']})")
        entry["ratio"] = inside["images_s"] / every["images_s"]
        entry["ideal_ratio"] = every["pack_sized"] / inside["pack_sized"]
        result["sizes"].append(entry)
        last_seconds = time.monotonic() - started
    return result


def print_table(result: dict, log: Callable[[str], None] = print) -> None:
    peak = result["peak_flops"]
    log("forwards = model calls (doubled = on the CFG-doubled pack); pack-sized = NFE + guided NFE; "
        "TFLOP/s = model_flops of every forward / seconds"
        + (f"; MFU = TFLOP/s / peak {peak / 1e12:.0f} TFLOP/s" if peak else "; MFU: no peak known for this device"))
    log(f"{'size':>5}{'tokens':>8}{'cfg on t in':>13}{'NFE':>5}{'doubled':>9}{'pack-sized':>12}"
        f"{'tokens/call':>13}{'s/call':>9}{'img/s':>9}{'TFLOP/s':>9}{'MFU':>7}{'vs every step':>15}")
    for entry in result["sizes"]:
        every = entry["settings"]["every"]
        for name, s in entry["settings"].items():
            mfu = f"{s['mfu']:.1%}" if s["mfu"] is not None else "-"
            span = f"[{s['cfg_interval'][0]:g}, {s['cfg_interval'][1]:g}]"
            tokens = f"{entry['tokens'][0]}x{entry['tokens'][1]}"
            log(f"{entry['size']:>5}{tokens:>8}{span:>13}{s['nfe']:>5}{s['doubled']:>9}{s['pack_sized']:>12}"
                f"{s['tokens_per_call']:>13,.0f}{s['seconds']:>9.3f}{s['images_s']:>9.2f}{s['tflops']:>9.3f}{mfu:>7}"
                f"{s['images_s'] / every['images_s']:>14.2f}x")
    low, high = result["interval"]
    for entry in result["sizes"]:
        log(f"{entry['size']} px: CFG on [{low:g}, {high:g}] runs {entry['ratio']:.2f}x the images/s of CFG on every "
            f"step; the pack-sized forward count allows {entry['ideal_ratio']:.2f}x")
    for note in result["skipped"]:
        log(f"skipped: {note}")


def main(argv: list[str] | None = None) -> int:
    args, device = parse_args(argv)
    print_header("NiT sampling throughput: CFG on an interval against CFG on every step", device)
    try:
        result = measure_sampling(device, preset=args.preset, sizes=args.sizes, batch=args.batch, steps=args.steps,
                                  cfg_scale=args.cfg_scale, interval=args.interval, repeats=args.repeats,
                                  attention=args.attention, seed=args.seed, log=lambda text: print(text, flush=True))
    except AssertionError as error:
        print(error, file=sys.stderr)
        return 1
    print_table(result)
    print(f"load average (1, 5, 15 min) after: {load_average()}; above {os.cpu_count()} means other work "
          "competed for the cores")
    return 0


if __name__ == "__main__":
    sys.exit(main())
