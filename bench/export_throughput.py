"""NiT export throughput (rows/s) against a plain per-row loop writing the same files, same run.

Builds a catalog of N DC-AE-native-like rows through the real CatalogWriter: 32 channels stored as
bfloat16 (nr's default storage for VAE latents), flips stored, latent sizes of ImageNet images at
native resolution (about 9-20 x 7-16 latent pixels), labels over 1000 classes. Then, alternating,
for a few rounds:

- baseline: a plain loop over row ids that reads both latents with `Catalog.latent`, widens them to
  float32 times the scaling factor and calls `safetensors.numpy.save_file` straight into the same
  `<wnid>/<stem>.safetensors` paths. It is the least work any one-file-per-image export does (read
  the bytes, write one file); the share of its time spent inside save_file is reported as well,
  the raw cost of writing these tensors.
- export: `export_nit`, which adds what makes it usable and safe: streaming by index part,
  staging + rename for every file, the resume check, the JSONL and the export record.
- resume: `export_nit` again on the finished output (every file found, only the JSONL rewritten).

    python bench/export_throughput.py                  # 20k rows, 2 rounds
    python bench/export_throughput.py --rows 5000 --rounds 1

The outputs go to the page cache like any write; a contended machine shows in the load average
printed first.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow
import safetensors
import safetensors.numpy

from nrdata.catalog import Catalog, CatalogWriter, EncoderInfo, LatentRow, Manifest
from nrdata.interop import export_nit
from nrdata.interop.nit import type_folder
from nrdata.policies import NATIVE_MAX_AREA, ResolutionPolicy

SCALE = 0.41407


def machine_info() -> str:
    load = os.getloadavg()
    return (f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, load average {load[0]:.2f} "
            f"{load[1]:.2f} {load[2]:.2f}; Python {platform.python_version()}, numpy {np.__version__}, "
            f"pyarrow {pyarrow.__version__}, safetensors {safetensors.__version__}")


def build(root: Path, rows: int, seed: int) -> Path:
    policy = ResolutionPolicy("native", 32, max_area=NATIVE_MAX_AREA)
    manifest = Manifest(
        encoder=EncoderInfo(name="dc-ae-f32c32", source="mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers",
                            revision=None, factor=32, channels=32, quantity="mode", scaling_factor=SCALE),
        dtype="bfloat16", policies=({**policy.to_dict(), "variant": policy.variant},), flip="store")
    rng = np.random.default_rng(seed)
    # content does not matter to the cost: one block of random bf16 words, sliced to each size
    block = (rng.standard_normal((2, 32, 20, 20)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    catalog = root / "catalog"
    with CatalogWriter(catalog, manifest, shard_rows=2048) as writer:
        for i in range(rows):
            orig_w, orig_h = int(rng.integers(300, 660)), int(rng.integers(240, 540))
            w, h = policy.output_size(orig_w, orig_h)
            wnid = f"n{i % 1000:08d}"
            key = f"{wnid}/{wnid}_{i}.JPEG"
            writer.add(LatentRow(key=key, variant="native", latent=block[0, :, : h // 32, : w // 32],
                                 latent_flip=block[1, :, : h // 32, : w // 32], label=i % 1000, class_name=wnid,
                                 source=key, orig_w=orig_w, orig_h=orig_h, image_w=w, image_h=h))
    return catalog


def baseline(catalog: Path, out: Path) -> tuple[float, float]:
    """(seconds in all, seconds inside save_file) of the plain loop."""
    start = time.perf_counter()
    cat = Catalog(catalog)
    index = cat.index.select(["key", "label"]).to_pylist()
    folder = out / type_folder("dc-ae-f32c32-sana-1.1-diffusers", "native-resolution")
    made: set[Path] = set()
    saving = 0.0
    scale = np.float32(SCALE)
    for row_id, row in enumerate(index):
        pair = np.stack([cat.latent(row_id), cat.latent(row_id, flip=True)])
        latent = (pair.astype(np.uint32) << 16).view(np.float32) * scale
        wnid, name = row["key"].split("/")
        path = folder / wnid / f"{name.split('.')[0]}.safetensors"
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        t = time.perf_counter()
        safetensors.numpy.save_file({"latent": latent, "label": np.array(row["label"], np.int64)}, str(path))
        saving += time.perf_counter() - t
    return time.perf_counter() - start, saving


def timed_export(catalog: Path, out: Path) -> tuple[float, int]:
    start = time.perf_counter()
    summary = export_nit(catalog, out)
    return time.perf_counter() - start, summary.written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = parser.parse_args()

    print(machine_info())
    work = Path(tempfile.mkdtemp(prefix="nr-export-bench-", dir=args.dir))
    try:
        t = time.perf_counter()
        catalog = build(work, args.rows, args.seed)
        n = args.rows
        print(f"catalog: {n} rows, {sum(p.stat().st_size for p in (catalog / 'shards').iterdir()) / 2**20:.0f} MiB "
              f"of bf16 shards in {work} (built in {time.perf_counter() - t:.1f} s)")
        results: dict[str, list[float]] = {"baseline": [], "save_file only": [], "export_nit": [], "resume": []}
        for round_ in range(args.rounds):
            seconds, saving = baseline(catalog, work / "baseline")
            results["baseline"].append(n / seconds)
            results["save_file only"].append(n / saving)
            seconds, written = timed_export(catalog, work / "nit")
            assert written == n
            results["export_nit"].append(n / seconds)
            seconds, written = timed_export(catalog, work / "nit")
            assert written == 0
            results["resume"].append(n / seconds)
            exported = sum(p.stat().st_size for p in (work / "nit").rglob("*.safetensors"))
            for name in ("baseline", "nit"):
                shutil.rmtree(work / name)
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:,.0f} rows/s" for k, v in results.items()))
        print(f"\nrows/s, median of {args.rounds} round(s), {n} rows, {exported / n / 1024:.1f} KiB per file:")
        for name, values in results.items():
            print(f"  {name:<15} {statistics.median(values):>10,.0f}")
        ratio = statistics.median(results["export_nit"]) / statistics.median(results["baseline"])
        print(f"export_nit / baseline: {ratio:.2f}")
        print(machine_info())
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
