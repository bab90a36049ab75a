"""nr eval throughput: Inception feature extraction in images/s, nr's batched path against batch-1.

Writes N PNG samples at 256x256 (smooth random fields; what nr sample leaves in a folder), loads a
random-weight InceptionV3 in torch-fidelity's format (no weights can be downloaded here; the
architecture and so the cost are the real ones) and measures on this machine:

1. nr: `nreval.features.extract_features` over the folder, batches of --batch-size images of one
   size, PNGs decoded by --workers DataLoader workers, on --device;
2. baseline, measured in the same run: batch-1 unbatched extraction, one image decoded and passed
   through the same Inception at a time in the main process (how a plain loop over files runs);
3. the metric math: precision/recall (blocks on --device) on the N x 2048 features or on
   --pr-rows random rows per set, and one FID (scipy sqrtm of a 2048² matrix, the same whatever
   N), in seconds.

Both paths give the same features (checked). `measure_eval(...)` is what bench/gpu_check.py calls.

Usage: .venv/bin/python bench/eval_throughput.py [--images 64] [--baseline-images 16] [--batch-size 64]
       [--workers 2] [--pr-rows N] [--no-fid] [--device auto] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from bench_device import add_device_options, budget_short, print_header, resolve_device


def write_samples(folder: Path, count: int, size: int = 256, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        low = rng.integers(0, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC).save(folder / f"{i:06d}.png")
    return folder


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_eval(device: torch.device, weights: Path, folder: Path, *, batch_size: int = 64, workers: int = 2,
                 baseline_images: int = 16, pr_rows: int | None = None, fid: bool = True,
                 deadline: float | None = None, log: Callable[[str], None] = print) -> dict:
    """images/s of nr's batched extraction and of the batch-1 loop over the same files; seconds of
    precision/recall on the device (over pr_rows random 2048-dim rows per set when given, else over
    the extracted features) and, with fid, of one FID."""
    from nreval.features import extract_features
    from nreval.inception import load_inception
    from nreval.inputs import open_samples
    from nreval.metrics import precision_recall

    inception = load_inception(weights, device)
    samples = open_samples(folder)
    warm = torch.from_numpy(samples.images[0]).permute(2, 0, 1)[None]
    inception(warm.expand(min(batch_size, len(samples.images)), -1, -1, -1).contiguous())  # kernels, allocator
    _sync(device)
    started = time.perf_counter()
    features = extract_features(samples.images, inception, batch_size=batch_size, workers=workers)
    _sync(device)
    nr_seconds = time.perf_counter() - started
    result = {"images": len(samples.images), "size": "256x256", "batch_size": batch_size, "workers": workers,
              "device": str(device), "nr_images_s": len(samples.images) / nr_seconds, "skipped": []}
    log(f"nr batched ({batch_size} per call, {workers} workers): {len(samples.images)} images in {nr_seconds:.1f} s, "
        f"{result['nr_images_s']:.1f} images/s")
    short = budget_short(deadline, needed=baseline_images * nr_seconds / len(samples.images) * 4, measured_any=True)
    if short is not None:
        result["skipped"].append(f"batch-1 baseline: {short:.0f} s of the budget left")
        return result
    count = min(baseline_images, len(samples.images))
    pools = []
    _sync(device)
    started = time.perf_counter()
    for index in range(count):
        pixels = torch.from_numpy(samples.images[index]).permute(2, 0, 1)[None]
        pools.append(inception(pixels)["pool"].cpu())
    _sync(device)
    baseline_seconds = time.perf_counter() - started
    result["baseline"] = "batch-1 unbatched feature extraction (same Inception, main process decodes)"
    result["baseline_images"] = count
    result["baseline_images_s"] = count / baseline_seconds
    result["speedup"] = result["nr_images_s"] / result["baseline_images_s"]
    result["max_feature_difference"] = float((torch.cat(pools) - torch.from_numpy(features.pool[:count])).abs().max())
    log(f"baseline, batch-1 unbatched: {count} images in {baseline_seconds:.1f} s, "
        f"{result['baseline_images_s']:.1f} images/s; nr is {result['speedup']:.2f}x; largest pool feature "
        f"difference {result['max_feature_difference']:.2e}")
    if pr_rows:
        generator = torch.Generator(device=device).manual_seed(0)
        reference = torch.randn(pr_rows, 2048, generator=generator, device=device).abs()
        samples = torch.randn(pr_rows, 2048, generator=generator, device=device).abs()
    else:
        reference = torch.from_numpy(features.pool).to(device)
        samples = reference.flip(0)
    _sync(device)
    started = time.perf_counter()
    precision_recall(reference, samples)
    _sync(device)
    result["precision_recall_rows"] = len(reference)
    result["precision_recall_s"] = time.perf_counter() - started
    log(f"precision/recall, {len(reference)} x {len(samples)} rows of 2048 on {device}: "
        f"{result['precision_recall_s']:.2f} s")
    if fid:
        from nreval.metrics import GaussianStatistics

        started = time.perf_counter()
        half = len(features.pool) // 2
        GaussianStatistics.of(features.pool[:half]).frechet_distance(GaussianStatistics.of(features.pool[half:]))
        result["fid_s"] = time.perf_counter() - started
        log(f"one FID (scipy sqrtm of a 2048² matrix, on the CPU): {result['fid_s']:.1f} s")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--baseline-images", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--pr-rows", type=int, default=None, help="time precision/recall on this many random rows "
                                                                   "per set (default: the extracted features)")
    parser.add_argument("--fid", action=argparse.BooleanOptionalAction, default=True,
                        help="also time one FID (scipy sqrtm of 2048², tens of seconds on a small CPU)")
    add_device_options(parser)
    args = parser.parse_args()
    device = resolve_device(parser, args)
    if args.images < 2 or args.baseline_images < 1:
        parser.error("--images must be >= 2 and --baseline-images >= 1")
    print_header("nr eval throughput: Inception features, batched (nr) against batch-1", device)
    from nreval.inception import write_random_weights

    with tempfile.TemporaryDirectory(prefix="nr-eval-bench-") as work:
        work = Path(work)
        weights = write_random_weights(work / "inception.pth")
        folder = write_samples(work / "samples", args.images)
        measure_eval(device, weights, folder, batch_size=args.batch_size, workers=args.workers,
                     baseline_images=args.baseline_images, pr_rows=args.pr_rows, fid=args.fid)


if __name__ == "__main__":
    main()
