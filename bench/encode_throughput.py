"""Encode throughput: `nr encode`'s Ray pipeline against NiT's preprocessing loop, same images, same run.

Writes N JPEGs of ImageNet-like sizes (mostly 500x375 / 375x500 with a tail; random pixels under
smooth shapes), then measures on this machine:

1. decode/resize stage: images/s of decoding + the native policy, as a plain loop in this process,
   and as Ray Data tasks (`pipelines.encode.decode_resize`, one per CPU);
2. the whole job: images/s of a plain single-process loop as NiT runs it (one image at a time,
   fp32, the image and its mirror each encoded alone, latents kept in memory), against
   `run_encode` (embedded Ray, shape-sorted batches under a pixel budget, flips batched, catalog
   written). The pipeline figure counts everything: Ray start-up, header probe, catalog commits.

Encoder: a DC-AE f32c32 with the real block layout at reduced widths (8..32, as in the tests) and random weights (no weights
can be downloaded here), in fp32 on CPU; on a GPU machine pass `--real-dcae` for the full-size
architecture (bf16 pipeline against the fp32 batch-1 loop).

`measure_encoder(...)` measures the encoder stage alone, without Ray (bench/gpu_check.py calls it on
machines without Ray): the same decoded and resized images (`nrdata.encoding.prepare_item`, not
timed) encoded with their mirrors by nr's path (`load_encoder` + `encode_prepared`: same-shape
batches under a pixel budget, bf16 on CUDA, latents back on the host as the catalog stores them)
against NiT's loop (the diffusers model in fp32, image and mirror each encoded alone, batch 1).

Usage: .venv/bin/python bench/encode_throughput.py [--images 150] [--real-dcae]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw

from bench_device import budget_short

SMALL_DCAE = {
    "in_channels": 3, "latent_channels": 32, "attention_head_dim": 8,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [8, 16, 16, 32, 32, 32], "decoder_block_out_channels": [8, 16, 16, 32, 32, 32],
    "encoder_layers_per_block": [1] * 6, "decoder_layers_per_block": [1] * 6,
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]], "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "upsample_block_type": "interpolate", "downsample_block_type": "Conv",
    "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu", "scaling_factor": 0.41407,
}
# the real dc-ae-f32c32-sana-1.1 geometry (shared/reference/deps.md §3a)
REAL_DCAE = {**SMALL_DCAE, "attention_head_dim": 32,
             "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
             "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
             "encoder_layers_per_block": [2, 2, 2, 3, 3, 3], "decoder_layers_per_block": [3, 3, 3, 3, 3, 3]}


def imagenet_like_size(rng: np.random.Generator) -> tuple[int, int]:
    kind = rng.choice(6, p=[0.45, 0.15, 0.15, 0.08, 0.07, 0.10])
    fixed = {0: (500, 375), 1: (500, 333), 2: (375, 500), 3: (333, 500), 4: (500, 500)}
    if kind in fixed:
        return fixed[kind]
    return int(rng.integers(120, 900)), int(rng.integers(120, 900))


def write_images(root: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class{i % 10:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = imagenet_like_size(rng)
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(4):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            draw.ellipse([x - 60, y - 40, x + 60, y + 40], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        image.save(folder / f"img_{i:05d}.jpg", quality=90)


def nit_loop(items, encoder_dir: Path, policy) -> tuple[float, int]:
    """NiT's preprocessing: per image decode and resize, then each image and its mirror encoded alone
    in fp32 (nit_encoder_loop); seconds for both, and the images encoded."""
    import diffusers

    from nrdata.images import ImageDecodeError, decode_image

    model = diffusers.AutoencoderDC.from_pretrained(encoder_dir, torch_dtype=torch.float32).eval()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    start = time.perf_counter()
    pixels = []
    for item in items:
        try:
            pixels.append(policy.apply(decode_image(item.path)))
        except ImageDecodeError:
            continue
    decode_seconds = time.perf_counter() - start
    return decode_seconds + nit_encoder_loop(model, pixels, device), len(pixels)


def nit_encoder_loop(model, pixels: list[np.ndarray], device: torch.device) -> float:
    """NiT's encoder loop on prepared images: each image and its mirror encoded alone in fp32; seconds."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    kept = []
    with torch.inference_mode():
        for image in pixels:
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
            z = model.encode(x).latent
            z_flip = model.encode(x.flip(-1)).latent
            kept.append(torch.stack([z, z_flip], 1).cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def measure_encoder(device: torch.device, encoder_dir: Path, image_root: Path, *, variants: tuple[str, ...] = ("256",
                    "native"), batch_pixels: int = 32 * 512 * 512, deadline: float | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """Images/s of nr's batched encoder path against NiT's batch-1 fp32 loop, per variant; a dict.

    `encoder_dir` is a diffusers AutoencoderDC folder (f32c32), `image_root` an ImageNet-style folder.
    Both sides encode every image and its mirror, from the same prepared pixels, after one untimed
    image each, the baseline with PyTorch's default fp32 (TF32 off for matmuls, on for cuDNN
    convolutions). `deadline` (time.monotonic()) skips the variants after the first that would not end
    before it.
    """
    # NiT's loop in plain fp32 as PyTorch defaults run it (no TF32 matmuls), whatever ran before in this process
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True
    try:
        return _measure_encoder(device, encoder_dir, image_root, variants, batch_pixels, deadline, log)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _measure_encoder(device, encoder_dir, image_root, variants, batch_pixels, deadline, log) -> dict:
    import diffusers

    from nrdata.encoders import load_encoder
    from nrdata.encoding import encode_prepared, prepare_item
    from nrdata.policies import parse_policy
    from nrdata.sources import list_image_folder

    items = list_image_folder(image_root)
    nr_encoder = load_encoder("dc-ae-f32c32", str(encoder_dir), device=device, dtype="bfloat16")
    nit_model = diffusers.AutoencoderDC.from_pretrained(encoder_dir, torch_dtype=torch.float32).eval().to(device)
    compute = str(nr_encoder.compute_dtype).removeprefix("torch.")
    result = {"encoder": "dc-ae-f32c32", "source": str(encoder_dir),
              "parameters": sum(p.numel() for p in nit_model.parameters()), "images": len(items),
              "nr": f"nrdata.encoders.load_encoder + nrdata.encoding.encode_prepared, compute {compute}, storage "
                    f"bfloat16, batches under {batch_pixels:,} pixels (mirrors included)",
              "baseline": "NiT's loop: AutoencoderDC in float32 (TF32 matmuls off), image and mirror encoded one at a "
                          "time (batch 1)",
              "variants": [], "skipped": []}
    log(f"encoder: DC-AE f32c32 architecture, {result['parameters'] / 1e6:.1f}M parameters, random weights; "
        f"{len(items)} images with their mirrors; nr: {result['nr']}; baseline: {result['baseline']}")
    last_seconds = 0.0
    for variant in variants:
        left = budget_short(deadline, last_seconds, bool(result["variants"]))
        if left is not None:
            result["skipped"].append(f"variant {variant}: {left:.0f} s of the budget left, the last took "
                                     f"{last_seconds:.0f} s")
            continue
        started = time.monotonic()
        policy = parse_policy(variant, unit=32)
        prepared = [image for item in items for image in prepare_item(item, [policy]).images]
        pixels = [image.pixels for image in prepared]
        encode_prepared(nr_encoder, prepared[:1], flip=True, batch_pixels=batch_pixels)  # warm-up, untimed
        nit_encoder_loop(nit_model, pixels[:1], device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        rows, errors = encode_prepared(nr_encoder, prepared, flip=True, batch_pixels=batch_pixels)
        nr_seconds = time.perf_counter() - start  # latents come back to the host: no sync needed
        if errors:
            raise RuntimeError(f"nr's encoder path failed on {len(errors)} image(s): {errors[0]}")
        nit_seconds = nit_encoder_loop(nit_model, pixels, device)
        shapes = sorted({p.shape[:2] for p in pixels})
        entry = {"variant": variant, "images": len(pixels), "shapes": len(shapes),
                 "pixels_per_image": sum(p.shape[0] * p.shape[1] for p in pixels) / len(pixels),
                 "nr_seconds": nr_seconds, "nr_images_s": len(rows) / nr_seconds,
                 "nit_seconds": nit_seconds, "nit_images_s": len(pixels) / nit_seconds}
        entry["ratio"] = entry["nr_images_s"] / entry["nit_images_s"]
        result["variants"].append(entry)
        log(f"{variant:>7}: {len(pixels)} images in {len(shapes)} shape(s); nr {entry['nr_images_s']:.1f} img/s "
            f"({compute}, batched), NiT loop {entry['nit_images_s']:.1f} img/s (float32, batch 1): "
            f"{entry['ratio']:.1f}x")
        last_seconds = time.monotonic() - started
    return result


def decode_stage_loop(items, policy) -> float:
    from nrdata.images import decode_image

    start = time.perf_counter()
    for item in items:
        policy.apply(decode_image(item.path))
    return time.perf_counter() - start


def decode_stage_ray(items, manifest_policies) -> float:
    import ray

    from pipelines.encode import _blocks, _configure_data_context, connect_ray, decode_resize

    connect_ray(None)
    _configure_data_context()
    work = [{"path": str(i.path), "key": i.key, "label": i.label, "class_name": i.class_name,
             "variants": ["native"]} for i in items]
    start = time.perf_counter()
    dataset = ray.data.from_items(work, override_num_blocks=_blocks(len(work))).map_batches(
        decode_resize, fn_kwargs={"policies": manifest_policies, "max_pixels": 10**9}, batch_format="pyarrow",
        batch_size=8, num_cpus=1)
    rows = sum(t.num_rows for t in dataset.iter_batches(batch_format="pyarrow", batch_size=None))
    seconds = time.perf_counter() - start
    ray.shutdown()
    assert rows == len(items)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=150)
    parser.add_argument("--real-dcae", action="store_true", help="full-size DC-AE architecture (GPU machines)")
    parser.add_argument("--batch-pixels", type=int, default=32 * 512 * 512)
    args = parser.parse_args()

    import diffusers

    from nrdata.encoding import catalog_manifest
    from nrdata.encoders import load_encoder
    from nrdata.policies import parse_policy
    from nrdata.sources import list_image_folder
    from pipelines.encode import EncodeConfig, EncoderSpec, run_encode

    torch.manual_seed(0)
    work = Path(tempfile.mkdtemp(prefix="nr-encode-bench-"))
    try:
        write_images(work / "images", args.images)
        encoder_dir = work / "dcae"
        diffusers.AutoencoderDC(**(REAL_DCAE if args.real_dcae else SMALL_DCAE)).save_pretrained(encoder_dir)
        items = list_image_folder(work / "images")
        policy = parse_policy("native", unit=32)
        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
        print(f"encode throughput: {len(items)} JPEGs of ImageNet-like sizes, native policy (unit 32), flips stored; "
              f"DC-AE f32c32 {'full-size' if args.real_dcae else 'reduced-width'} architecture, random weights")
        print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, GPU {gpu}, "
              f"torch {torch.__version__}")

        loop_decode = decode_stage_loop(items, policy)
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"
        probe = load_encoder("dc-ae-f32c32", str(encoder_dir), dtype=dtype)
        policies = list(catalog_manifest(probe, [policy], flip=True).policies)
        ray_decode = decode_stage_ray(items, policies)
        loop_seconds, loop_done = nit_loop(items, encoder_dir, policy)
        config = EncodeConfig(source=str(work / "images"), out=str(work / "catalog"),
                              encoder=EncoderSpec("dc-ae-f32c32", source=str(encoder_dir), dtype=dtype),
                              policies=("native",), flip=True, batch_pixels=args.batch_pixels)
        start = time.perf_counter()
        summary = run_encode(config)
        pipeline_seconds = time.perf_counter() - start
        assert summary.encoded == len(items), summary

        n = len(items)
        print(f"{'stage':<44}{'s':>9}{'img/s':>10}{'vs loop':>9}")
        print(f"{'decode+resize, plain loop (1 process)':<44}{loop_decode:>9.2f}{n / loop_decode:>10.1f}{1:>8.1f}x")
        print(f"{'decode+resize, Ray Data tasks':<44}{ray_decode:>9.2f}{n / ray_decode:>10.1f}"
              f"{loop_decode / ray_decode:>8.1f}x")
        print(f"{'whole job, NiT loop (batch 1, fp32)':<44}{loop_seconds:>9.2f}{loop_done / loop_seconds:>10.1f}"
              f"{1:>8.1f}x")
        print(f"{'whole job, nr encode pipeline (' + dtype + ')':<44}{pipeline_seconds:>9.2f}"
              f"{n / pipeline_seconds:>10.1f}{(n / pipeline_seconds) / (loop_done / loop_seconds):>8.1f}x")
        p = summary.progress
        print(f"pipeline inside: decode {p.decode_rate:.1f} img/s per worker, encode {p.encode_rate:.1f} img/s per "
              f"actor ({summary.ray.get('actors')} actor(s)); the pipeline figure includes Ray start-up and the "
              "catalog writes, the loop keeps latents in memory")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
