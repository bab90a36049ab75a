"""Packed loader throughput against NiT's own loading path reproduced in our words, same data, same run.

Latents (issue 18). A catalog of DC-AE f32c32-like native-resolution latents (32 channels, bf16,
flipped twin stored), packed at L=16384 (LPFHP, patch size 1, as NiT-XL); every loader runs with
the same number of DataLoader workers, one pack per batch:

* nr: `nrtrain.loader.PackedLoader` over the catalog's memory-mapped Arrow shards, checking every
  row's CRC-32 the first time the run reads it (its default); nr unchecked: `verify=False`;
* nr, DataLoader transfer: the same batches (`PackedDataset.batch`, built in a new shared-memory
  segment each) handed over by the DataLoader's own pickling instead of nr's pool of slots allocated
  once (`nrtrain.batch_transfer`): nr's storage format with the stock transfer, which separates what
  the format gains from what the transfer gains;
* NiT path: NiT's `ImprovedPackedImageNetLatentDataset` + `packed_collate_fn`
  (`nit/data/packed_c2i_data.py`) as its code does it, in our words: one safetensors file per image
  holding `latent` float32 [2, C, h, w] (both flips, as NiT's preprocessing writes them) and
  `label`, read with `safetensors.torch.load_file`, a random twin per image, the packs as a batch
  sampler, its collation (each latent to (h w) c 1 1 tokens, concatenated; labels and hw_list
  tensors). NiT normalises later, on the GPU, so neither the reproduction nor its figure does. Only
  the rows of the first `--baseline-packs` packs get files; per-pack rates compare directly.

REPA (issue 17). A second, smaller catalog of the same latent sizes whose rows each have a source
JPEG of the size the native policy encodes (32 px per latent cell), stored with REPA images at 16 px
per latent cell (what RADIO, patch 16, needs per token with patch size 1):

* nr stored REPA (the default, `repa_images="stored"`): the REPA images memory-mapped from the
  shards beside the latents and copied (mirrored with the twin) into the batch's shared buffer;
* nr per-step JPEG (`repa_images="source"`, nr's path before issue 17): every row's JPEG decoded,
  resized by its policy, mirrored with the twin;
* NiT REPA path: NiT's dataset with its per-image source read: the JPEG opened, converted to RGB,
  BICUBIC-resized to 16 px per latent cell, both it and its mirror turned into float tensors in
  [-1, 1], one kept; the images travel as a list of float32 tensors.

Cold rounds (`--cold`, as root): the page cache is dropped (`echo 3 > /proc/sys/vm/drop_caches`)
after each loader is built and before its first batch, so the loader's reads hit the disk (the
disk's read-ahead, printed, lets a memory-mapped shard read 8 MB around each fault, which a file
per image cannot use); one pass over the first `--baseline-packs` packs (REPA: `--repa-packs`).

Warm rounds: one loader run over two passes (nr: the packs file's two epochs, cut to the baseline's
pack count for the REPA rows; NiT: its packs twice), as in training, where one DataLoader runs the
whole schedule. The first pass includes starting the workers and, for nr, each worker mapping the
shard pages it touches and checking every row's checksum; the second is the steady state. The
loaders alternate for `--rounds` rounds, because the machine may be shared: each figure is the
median over rounds of the ratio of two rates measured back to back.

Latent sizes follow ImageNet-1k at DC-AE f32 native resolution (NiT's rule: each side floored to a
multiple of 32 px): side lengths in tokens are h ~ N(12, 2.5), w ~ N(13, 2.5), rounded and clipped
to 5..16, independently (mean about 12 x 13 = 156 tokens; ImageNet's typical 500x375 photo gives
15 x 11 = 165 tokens).

    python bench/loader_throughput.py                   # 100k + 12k rows in a temporary folder
    python bench/loader_throughput.py --dir /tmp/lt     # keep the data there and reuse it next time
    python bench/loader_throughput.py --rows 20000 --repa-rows 4000 --rounds 2   # a quick look
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import resource
import shutil
import statistics
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import psutil
import pyarrow.compute as pc
import torch
from numba import njit
from torch.utils.data import DataLoader, Dataset

from nrdata.catalog import Catalog, CatalogWriter, EncoderInfo, LatentRow, Manifest
from nrdata.catalog.checksum import HAS_PCLMUL, crc32
from nrdata.catalog.reader import ShardView
from nrdata.packing import packs_info, read_packs
from nrdata.packing.catalog_packs import open_packs, pack_catalogs, write_pack_result
from nrtrain.loader import PackedDataset, PackedLoader

CHANNELS = 32
SIDES = (5, 16)
REPA_PIXELS = 16  # RADIO's patch size with the model's patch size 1


def latent_sides(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    h = np.clip(np.rint(rng.normal(12.0, 2.5, n)), *SIDES).astype(int)
    w = np.clip(np.rint(rng.normal(13.0, 2.5, n)), *SIDES).astype(int)
    return h, w


def build_catalog(root: Path, rows: int, seed: int) -> None:
    manifest = Manifest(
        encoder=EncoderInfo(name="dc-ae-f32c32", source="bench", revision=None, factor=32, channels=CHANNELS,
                            quantity="mode", scaling_factor=0.41407),
        dtype="bfloat16",
        policies=({"kind": "native", "unit": 32, "max_area": 2048 * 2048, "target": None, "variant": "native"},),
        flip="store",
    )
    rng = np.random.default_rng(seed)
    # a pool of random bf16 words, sliced per row: the values do not matter, only sizes and layout
    pool = (rng.standard_normal((64, CHANNELS, 16, 16)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    hs, ws = latent_sides(rng, rows)
    with CatalogWriter(root, manifest, shard_rows=8192) as writer:
        for i, (h, w) in enumerate(zip(hs.tolist(), ws.tolist())):
            label = i % 1000
            writer.add(LatentRow(key=f"n{label:08d}/img_{i:07d}", variant="native", label=label,
                                 latent=pool[i % 64][:, :h, :w], latent_flip=pool[(i + 1) % 64][:, :h, :w]))


def write_nit_files(root: Path, catalog: Catalog, rows: np.ndarray) -> list[Path]:
    """One safetensors file per row as NiT's preprocessing writes it (float32 latent and its mirror's,
    a label); returns the paths in `rows` order."""
    from safetensors.torch import save_file

    keys = catalog.index["key"].to_pylist()
    labels = catalog.index["label"].to_numpy()
    paths = []
    for row in rows.tolist():
        path = root / f"{keys[row]}.safetensors"
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        pair = torch.stack([catalog.latent_torch(row), catalog.latent_torch(row, flip=True)]).float()
        save_file({"latent": pair.contiguous(), "label": torch.tensor(int(labels[row]))}, str(path))
    return paths


class NitDataset(Dataset):
    """NiT's ImprovedPackedImageNetLatentDataset as its code behaves, in our words: item = one image.

    Reads the image's safetensors file; with `images` (REPA, as all NiT's released configs train)
    also its source JPEG, resized BICUBIC to 16 px per latent cell (the native-resolution branch), and
    keeps the float [-1, 1] tensor of it or of its mirror, with the latent of the same twin."""

    def __init__(self, latent_files: dict[int, Path], image_files: dict[int, Path] | None,
                 sizes: dict[int, tuple[int, int]]) -> None:
        self.latent_files, self.image_files, self.sizes = latent_files, image_files, sizes

    def __len__(self) -> int:
        return max(self.latent_files) + 1

    def __getitem__(self, row: int) -> dict:
        from PIL import Image
        from safetensors.torch import load_file

        data = load_file(str(self.latent_files[row]))
        twin = int(torch.randint(0, 2, (1,)).item())
        item = {"latent": data["latent"][twin], "label": data["label"]}
        if self.image_files is not None:
            h, w = self.sizes[row]
            image = Image.open(self.image_files[row]).convert("RGB").resize((w * 16, h * 16),
                                                                            Image.Resampling.BICUBIC)
            both = [image, image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]  # NiT builds both, keeps one
            # a writable copy of each image, as torchvision's to_tensor makes (NiT's transforms)
            pair = torch.stack([torch.from_numpy(np.array(i)).permute(2, 0, 1).float().div(255) for i in both])
            item["image"] = pair.sub_(0.5).div_(0.5)[twin]
        return item


def nit_collate(items: list[dict]) -> dict:
    """NiT's packed_collate_fn in our words (patch size 1): every latent as (h w) c 1 1 tokens, concatenated."""
    latents, labels, sizes, images = [], [], [], []
    for item in items:
        c, h, w = item["latent"].shape
        latents.append(item["latent"].permute(1, 2, 0).reshape(h * w, c, 1, 1))
        labels.append(item["label"])
        sizes.append([h, w])
        images.append(item.get("image"))
    return {"image": images, "latent": torch.cat(latents), "label": torch.tensor(labels),
            "hw_list": torch.tensor(sizes, dtype=torch.int32)}


def nit_loader(dataset: NitDataset, packs: list[np.ndarray], workers: int, passes: int) -> DataLoader:
    """NiT's training DataLoader: the packs as its batch sampler (pin_memory only matters with a GPU)."""
    return DataLoader(dataset, batch_sampler=[p.tolist() for p in packs] * passes, collate_fn=nit_collate,
                      num_workers=workers)


class StockTransfer(Dataset):
    """nr's batches (`PackedDataset.batch`, nr's storage format) of its first `steps` positions, `passes`
    times, handed over by the DataLoader's own transfer instead of nr's slot pool."""

    def __init__(self, dataset: PackedDataset, steps: int, passes: int) -> None:
        self.dataset, self.steps, self.passes = dataset, steps, passes

    def __len__(self) -> int:
        return self.steps * self.passes

    def __getitem__(self, i: int):
        return self.dataset.batch(i % self.steps)


def jpeg_bytes(h: int, w: int, seed: int) -> bytes:
    """A photo-like JPEG (smooth colour fields, edges and grain, quality 90) that the native policy
    resizes to (h*32) x (w*32) pixels: each side up to 31 px longer, as a photo's sides are."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    height, width = h * 32 + int(rng.integers(0, 32)), w * 32 + int(rng.integers(0, 32))
    yy, xx = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    coef = rng.uniform(0, 255, (3, 4))
    pixels = np.stack([coef[c, 0] * yy + coef[c, 1] * xx + coef[c, 2] * np.sin(9 * yy * xx + c) + coef[c, 3] * (
        (yy * 7 + xx * 5) % 1 > 0.5) for c in range(3)], -1) / 2.2
    pixels = np.clip(pixels + rng.normal(0, 10, pixels.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def build_repa_catalog(root: Path, images: Path, rows: int, seed: int) -> None:
    """`rows` latents with flipped twins and REPA images at 16 px per latent cell, and a source JPEG per
    row under `images` (one JPEG per latent size, copied per row: every row is its own file)."""
    from nrdata.images import decode_image
    from nrdata.policies import ResolutionPolicy
    from nrdata.repa_images import repa_views

    manifest = Manifest(
        encoder=EncoderInfo(name="dc-ae-f32c32", source="bench", revision=None, factor=32, channels=CHANNELS,
                            quantity="mode", scaling_factor=0.41407),
        dtype="bfloat16",
        policies=({"kind": "native", "unit": 32, "max_area": 2048 * 2048, "target": None, "variant": "native"},),
        flip="store", source_root=str(images), repa_pixels=REPA_PIXELS,
    )
    rng = np.random.default_rng(seed + 1)
    pool = (rng.standard_normal((64, CHANNELS, 16, 16)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    hs, ws = latent_sides(rng, rows)
    jpegs: dict[tuple[int, int], tuple[bytes, np.ndarray]] = {}
    with CatalogWriter(root, manifest, shard_rows=2048) as writer:
        for i, (h, w) in enumerate(zip(hs.tolist(), ws.tolist())):
            if (h, w) not in jpegs:
                blob = jpeg_bytes(h, w, seed + len(jpegs))
                (images / "probe.jpg").parent.mkdir(parents=True, exist_ok=True)
                (images / "probe.jpg").write_bytes(blob)
                policy = ResolutionPolicy.from_dict({k: v for k, v in manifest.policies[0].items()
                                                     if k != "variant" and v is not None})
                pixels = policy.apply(decode_image(images / "probe.jpg"))
                jpegs[(h, w)] = blob, repa_views(pixels[None], (h, w), REPA_PIXELS)[0]
            blob, view = jpegs[(h, w)]
            label = i % 1000
            key = f"n{label:08d}/img_{i:07d}"
            (images / f"n{label:08d}").mkdir(exist_ok=True)
            (images / f"{key}.jpg").write_bytes(blob)
            writer.add(LatentRow(key=key, variant="native", label=label, source=f"{key}.jpg",
                                 latent=pool[i % 64][:, :h, :w], latent_flip=pool[(i + 1) % 64][:, :h, :w],
                                 repa_image=view))
    (images / "probe.jpg").unlink()


def drop_page_cache() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def can_drop_page_cache() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


@njit(nogil=True)
def _checksum_rows(data: np.ndarray, offsets: np.ndarray, twins: np.ndarray) -> int:
    """The loader's per-row check, alone: CRC-32 of every row's latent then twin."""
    folded = 0
    for i in range(offsets.shape[0] - 1):
        crc = crc32(data[offsets[i]: offsets[i + 1]], 0)
        folded ^= crc32(twins[offsets[i]: offsets[i + 1]], crc)
    return folded


def checksum_speed(catalog_dir: Path) -> str:
    """GB/s of the loader's compiled CRC-32 and of zlib.crc32 over every row of the catalog (warm)."""
    views = [ShardView(p) for p in sorted((catalog_dir / "shards").glob("*.arrow"))]
    total = sum(2 * int(v.latent[0][-1]) for v in views)
    _checksum_rows(views[0].latent[1], views[0].latent[0][:2], views[0].flip[1])  # compile
    speeds = {}
    for name in ("compiled", "zlib"):
        start = time.perf_counter()
        for v in views:
            (offsets, data), twins = v.latent, v.flip[1]
            if name == "compiled":
                _checksum_rows(data, offsets, twins)
            else:
                for i in range(len(offsets) - 1):
                    zlib.crc32(twins[offsets[i]: offsets[i + 1]], zlib.crc32(data[offsets[i]: offsets[i + 1]]))
        speeds[name] = total / (time.perf_counter() - start) / 1e9
    kind = "PCLMULQDQ" if HAS_PCLMUL else "table-driven"
    return (f"checksum alone, one process, every row's latent and twin ({total / 2**30:.2f} GiB): compiled CRC-32 "
            f"({kind}) {speeds['compiled']:.1f} GB/s, zlib.crc32 per row {speeds['zlib']:.1f} GB/s")


def interleaved_cost(packs_path: Path, steps: int) -> tuple[str, float]:
    """The checksum's cost measured pack by pack: two datasets in this process, one checking and one
    not, build every pack of two passes in turn (which goes first alternates), each timed in CPU
    seconds. Neighbouring measurements see the same machine, so load from other work cancels out."""
    checked, unchecked = PackedDataset(packs_path, verify=True), PackedDataset(packs_path, verify=False)
    spent = {(verify, k): 0.0 for verify in (True, False) for k in (0, 1)}
    for position in range(2 * steps):
        for dataset in (checked, unchecked) if position % 2 == 0 else (unchecked, checked):
            start = time.process_time()
            dataset.batch(position)
            spent[dataset.verify, position // steps] += time.process_time() - start
    figures, costs = [], []
    for label, ks in (("first pass", (0,)), ("second pass", (1,)), ("both", (0, 1))):
        yes, no = (sum(spent[verify, k] for k in ks) for verify in (True, False))
        costs.append(1 - no / yes)  # the share of the checked loader's time the check takes
        figures.append(f"{label} {yes:.2f} s checked / {no:.2f} s unchecked, cost {costs[-1]:+.1%}")
    return "checksum cost, pack by pack in one process (CPU seconds): " + "; ".join(figures), costs[0]


def _reaped_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _live_cpu() -> float:
    return sum(sum(c.cpu_times()[:2]) for c in psutil.Process().children())


def _counts(batch) -> tuple[int, int]:
    """(images, tokens) of an nr PackedBatch or of a batch NiT's collation made."""
    if isinstance(batch, dict):
        return len(batch["label"]), int(batch["latent"].shape[0])
    return batch.num_images, batch.num_tokens


def timed(batches, first_pass: int) -> list[dict]:
    """Rates of the first `first_pass` batches (worker start included) and of the rest, if any.

    Besides wall time, the CPU seconds the loader spent (its workers', page faults included, and this
    process's): on a machine other work shares, the wall clock says how busy the machine was, the CPU
    time what the loader cost."""
    stamps, images, tokens = [time.perf_counter()], [], []
    cpu = [time.process_time() + _reaped_cpu()]
    for batch in batches:
        n, t = _counts(batch)
        images.append(n)
        tokens.append(t)
        stamps.append(time.perf_counter())
        if len(images) == first_pass:  # the workers are alive and between the passes
            cpu.append(time.process_time() + _reaped_cpu() + _live_cpu())
        del batch
    cpu.append(time.process_time() + _reaped_cpu())  # the workers have exited: their time is counted
    passes = []
    bounds = ((0, first_pass), (first_pass, len(images))) if len(images) > first_pass else ((0, first_pass),)
    for k, (lo, hi) in enumerate(bounds):
        seconds = stamps[hi] - stamps[lo]
        passes.append({"packs": hi - lo, "seconds": seconds, "packs_s": (hi - lo) / seconds,
                       "latents_s": sum(images[lo:hi]) / seconds, "tokens_s": sum(tokens[lo:hi]) / seconds,
                       "first": stamps[lo + 1] - stamps[lo], "cpu": cpu[k + 1] - cpu[k]})
    return passes


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def measure(make, first_pass: int, *, cold: bool = False) -> list[dict]:
    """Time the batches of `make()` (built first, so that a cold round drops the cache after it)."""
    batches = make()
    if cold:
        drop_page_cache()
    return timed(batches, first_pass)


def print_rounds(rounds: list[dict], bytes_per_token: dict[str, int]) -> None:
    print("MB/s: bytes handed over per second (one twin's latent in the dtype the loader reads it in: bf16 for nr, "
          "float32 for NiT, whose files hold both twins; plus the REPA image: uint8 for nr, float32 for NiT); first: seconds to the pass's first batch; cpu s: CPU seconds of the loader's processes in the pass")
    print(f"{'round':<7}{'loader':<28}{'pass':>5}{'packs':>7}{'seconds':>9}{'packs/s':>9}{'latents/s':>11}"
          f"{'MB/s':>7}{'first':>7}{'cpu s':>7}")
    for i, measured in enumerate(rounds):
        for name, passes in measured.items():
            for k, r in enumerate(passes):
                mbs = r["tokens_s"] * bytes_per_token[name] / 1e6
                print(f"{i:<7}{name:<28}{k:>5}{r['packs']:>7}{r['seconds']:>9.2f}{r['packs_s']:>9.1f}"
                      f"{r['latents_s']:>11,.0f}{mbs:>7.0f}{r['first']:>7.2f}{r['cpu']:>7.2f}")


def ratio_line(rounds: list[dict], name: str, baseline: str, k: int) -> tuple[str, float]:
    """Median packs/s of both and the median of per-round ratios (each round ran both back to back)."""
    ratios = [r[name][k]["packs_s"] / r[baseline][k]["packs_s"] for r in rounds]
    mine = statistics.median(r[name][k]["packs_s"] for r in rounds)
    theirs = statistics.median(r[baseline][k]["packs_s"] for r in rounds)
    median = statistics.median(ratios)
    return (f"{name} {mine:.1f} packs/s vs {baseline} {theirs:.1f}: ratio per round "
            f"{', '.join(f'{x:.2f}x' for x in ratios)}, median {median:.2f}x"), median


def disk_table(repa_dir: Path, images_dir: Path, sample_cells: float) -> None:
    """Bytes per latent cell of the sample, measured, and ImageNet-1k's three variants extrapolated."""
    views = [ShardView(p) for p in sorted((repa_dir / "shards").glob("*.arrow"))]
    cells = sum(int(v.latent[0][-1]) for v in views) / (CHANNELS * 2)
    latents = 2 * sum(int(v.latent[0][-1]) for v in views) / cells  # latent and twin
    repa = sum(int(v.repa[0][-1]) for v in views) / cells
    files = sum(p.stat().st_size for p in (repa_dir / "shards").glob("*.arrow")) / cells
    jpeg = sum(p.stat().st_size for p in images_dir.rglob("*.jpg")) / cells
    features = 1280 * 2 * 2  # (c) RADIO-v2.5-H: 1280 bf16 values per token, latent and twin
    imagenet = 1_281_167
    per_image = {"native": sample_cells, "256": 8 * 8, "512": 16 * 16}  # DC-AE f32 latent cells
    total_cells = imagenet * sum(per_image.values())
    print(f"disk, measured on this run's REPA catalog ({cells:,.0f} latent cells): per latent cell latents+twins "
          f"{latents:.0f} B, REPA images at {REPA_PIXELS} px per cell {repa:.0f} B, shard files in all {files:.1f} B "
          f"(Arrow framing {files - latents - repa:.1f} B); source JPEGs (synthetic, quality 90) {jpeg:.0f} B")
    print(f"disk per ImageNet-1k, native (mean {sample_cells:.1f} cells, this sample's) + 256 (64) + 512 (256) = "
          f"{total_cells / 1e6:,.0f} M latent cells, extrapolated from those bytes per cell:")
    for label, per_cell in (("latents + twins, bf16 (today)", latents),
                            ("(a) REPA images, uint8, 16 px per cell", repa),
                            ("(b) GPU decode: nothing stored (the source JPEGs stay at training time)", 0.0),
                            ("(c) RADIO-H features, bf16, per twin (computed, not written)", features)):
        print(f"  {label:<75}{per_cell * total_cells / 1e9:>8,.0f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repa-rows", type=int, default=2_000, help="rows of the REPA catalog (~19 packs an epoch)")
    parser.add_argument("--max-tokens", type=int, default=16_384)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--baseline-packs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements of the latent loaders")
    parser.add_argument("--repa-rounds", type=int, default=2, help="alternating measurements of the REPA loaders")
    parser.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                        help="a cold-cache round (needs root to drop the page cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dir", type=Path, default=None, help="keep data here and reuse it (default: a temp dir)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    root = args.dir or Path(tempfile.mkdtemp(prefix="nr-loader-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    catalog_dir, packs_path, nit_dir = root / "catalog", root / "packs.parquet", root / "nit32"
    repa_dir, repa_packs_path, images_dir, nit_repa_dir = (root / "repa_catalog", root / "repa_packs.parquet",
                                                           root / "images", root / "nit32_repa")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}")
    print(f"load average (1, 5, 15 min) before: {load_average()}")
    try:
        t0 = time.perf_counter()
        for path, rows, build in ((catalog_dir, args.rows, build_catalog),
                                  (repa_dir, args.repa_rows, lambda r, n, s: build_repa_catalog(r, images_dir, n, s))):
            if not (path / "manifest.json").exists():
                build(path, rows, args.seed)
            elif len(Catalog(path)) != rows:
                raise SystemExit(f"{path} holds {len(Catalog(path)):,} rows, not {rows:,}: pass the same --rows/"
                                 "--repa-rows or another --dir")
        for path, cat in ((packs_path, catalog_dir), (repa_packs_path, repa_dir)):
            if not path.exists() or packs_info(read_packs(path)[0])["epochs"] != [0, 1]:
                write_pack_result(path, pack_catalogs([cat], max_tokens=args.max_tokens, seed=args.seed, epochs=2))

        def first_packs(path: Path, count: int | None) -> tuple[Catalog, list[np.ndarray]]:
            table, _, (catalog,) = open_packs(path)
            epoch0 = table.filter(pc.equal(table["epoch"], 0)).sort_by("pack_id")
            return catalog, [np.asarray(r, np.int64) for r in epoch0["row_ids"].to_pylist()][:count]

        catalog, packs = first_packs(packs_path, args.baseline_packs)
        repa_catalog, repa_packs = first_packs(repa_packs_path, None)
        rows = np.concatenate(packs)
        repa_rows = np.concatenate(repa_packs)
        latent_files = dict(zip(rows.tolist(), write_nit_files(nit_dir, catalog, rows)))
        repa_files = dict(zip(repa_rows.tolist(), write_nit_files(nit_repa_dir, repa_catalog, repa_rows)))
        sources = repa_catalog.index["source"].to_pylist()
        image_files = {r: images_dir / sources[r] for r in repa_rows.tolist()}
        sides = {name: np.stack([c.index["latent_h"].to_numpy(), c.index["latent_w"].to_numpy()], 1)
                 for name, c in (("latents", catalog), ("repa", repa_catalog))}
        nit_latents = NitDataset(latent_files, None, {r: tuple(sides["latents"][r]) for r in latent_files})
        nit_repa = NitDataset(repa_files, image_files, {r: tuple(sides["repa"][r]) for r in repa_files})
        cells = sides["latents"].prod(1)
        disk = sum(p.stat().st_size for p in (catalog_dir / "shards").iterdir())
        epoch_steps = PackedDataset(packs_path).steps_in_epoch(0)
        repa_steps = PackedDataset(repa_packs_path).steps_in_epoch(0)
        print(f"data: {args.rows:,} rows, {CHANNELS}x h x w bf16 with flipped twin, tokens per image mean "
              f"{cells.mean():.1f} (min {cells.min()}, max {cells.max()}); shards {disk / 2**30:.2f} GiB; "
              f"{epoch_steps} packs at L={args.max_tokens}, {np.mean([len(p) for p in packs]):.1f} images/pack; "
              f"{len(latent_files):,} NiT files (float32 [2, C, h, w]) for the first {len(packs)} packs. REPA: "
              f"{args.repa_rows:,} rows with a source JPEG each and REPA images at {REPA_PIXELS} px per latent cell, "
              f"{repa_steps} packs an epoch, {len(repa_files):,} NiT files; prepared in {time.perf_counter() - t0:.0f} s "
              f"({root})")
        print("page cache read-ahead of the disks: " + ", ".join(
            f"{p.parent.parent.name} {p.read_text().strip()} KB" for p in Path("/sys/block").glob("*/queue/read_ahead_kb")
            if not p.parent.parent.name.startswith(("loop", "ram"))))
        workers = args.workers

        latent_loaders = {
            "nr": lambda verify=True: PackedLoader(packs_path, num_workers=workers, verify=verify),
            "nr, DataLoader transfer": lambda: DataLoader(StockTransfer(PackedDataset(packs_path), len(packs), 2),
                                                          batch_size=None, num_workers=workers),
            "NiT path": lambda: nit_loader(nit_latents, packs, workers, 2),
        }
        rounds = []
        for i in range(args.rounds):
            measured = {}
            for verify in ((True, False) if i % 2 == 0 else (False, True)):
                measured["nr" if verify else "nr unchecked"] = measure(lambda: latent_loaders["nr"](verify),
                                                                       epoch_steps)
            measured["nr, DataLoader transfer"] = measure(latent_loaders["nr, DataLoader transfer"], len(packs))
            measured["NiT path"] = measure(latent_loaders["NiT path"], len(packs))
            rounds.append(measured)
        stored_bytes = {"nr": CHANNELS * 2, "nr unchecked": CHANNELS * 2, "nr, DataLoader transfer": CHANNELS * 2,
                        "NiT path": CHANNELS * 4}
        print("== latents only, warm page cache ==")
        print_rounds(rounds, stored_bytes)
        for k, label in ((1, "second pass (steady state)"), (0, "first pass (fresh workers)")):
            print(f"{label}:")
            for name, baseline in (("nr", "NiT path"), ("nr", "nr, DataLoader transfer"),
                                   ("nr, DataLoader transfer", "NiT path")):
                print("  " + ratio_line(rounds, name, baseline, k)[0])
        for k, label in ((0, "first pass (every row checked)"), (1, "second pass (rows known intact)"),
                         (None, "both passes")):
            figures = []
            for unit in ("seconds", "cpu"):
                def spent(r, name):
                    return sum(p[unit] for p in r[name]) if k is None else r[name][k][unit]

                kept = [spent(r, "nr unchecked") / spent(r, "nr") for r in rounds]
                figures.append(f"{'wall' if unit == 'seconds' else 'CPU'} time: throughput checked / unchecked per "
                               f"round {', '.join(f'{x:.3f}' for x in kept)}, median {statistics.median(kept):.3f}, "
                               f"cost {1 - statistics.median(kept):+.1%}")
            print(f"checksum cost, {label}: " + "; ".join(figures))

        repa_loaders = {
            "nr stored REPA": lambda: PackedLoader(repa_packs_path, num_workers=workers, repa_images="stored",
                                                   repa_patch_size=REPA_PIXELS),
            "nr per-step JPEG": lambda: PackedLoader(repa_packs_path, num_workers=workers, repa_images="source"),
            "NiT REPA path": lambda: nit_loader(nit_repa, repa_packs, workers, 2),
        }
        rounds = []
        for i in range(args.repa_rounds):
            rounds.append({name: measure(make, repa_steps) for name, make in repa_loaders.items()})
        image_bytes = REPA_PIXELS**2 * 3
        print(f"== with the REPA image of every row ({REPA_PIXELS} px per latent cell), warm page cache ==")
        print_rounds(rounds, {"nr stored REPA": CHANNELS * 2 + image_bytes, "nr per-step JPEG": CHANNELS * 2 + image_bytes,
                              "NiT REPA path": CHANNELS * 4 + 4 * image_bytes})
        for k, label in ((1, "second pass (steady state)"), (0, "first pass (fresh workers)")):
            print(f"{label}:")
            for name, baseline in (("nr stored REPA", "NiT REPA path"), ("nr per-step JPEG", "NiT REPA path"),
                                   ("nr stored REPA", "nr per-step JPEG")):
                line, median = ratio_line(rounds, name, baseline, k)
                print("  " + line)
                if (name, baseline, k) == ("nr stored REPA", "NiT REPA path", 1):
                    print(f"  bar (stored REPA >= 10x NiT's REPA path, {workers} workers, warm): "
                          f"{'met' if median >= 10 else 'NOT met'}")

        if not args.cold:
            print("cold page cache: not measured (--no-cold)")
        elif not can_drop_page_cache():
            print("cold page cache: not measured (dropping the page cache needs root)")
        else:
            cold = {
                "nr": measure(lambda: PackedLoader(packs_path, num_workers=workers, steps=len(packs)), len(packs),
                              cold=True),
                "NiT path": measure(lambda: nit_loader(nit_latents, packs, workers, 1), len(packs), cold=True),
                "nr stored REPA": measure(lambda: PackedLoader(repa_packs_path, num_workers=workers, steps=repa_steps,
                                                               repa_images="stored"), repa_steps, cold=True),
                "nr per-step JPEG": measure(lambda: PackedLoader(repa_packs_path, num_workers=workers,
                                                                 steps=repa_steps, repa_images="source"),
                                            repa_steps, cold=True),
                "NiT REPA path": measure(lambda: nit_loader(nit_repa, repa_packs, workers, 1), repa_steps, cold=True),
            }
            print("== cold page cache: dropped after each loader was built, one pass ==")
            print_rounds([cold], {**stored_bytes, "nr stored REPA": CHANNELS * 2 + image_bytes,
                                  "nr per-step JPEG": CHANNELS * 2 + image_bytes,
                                  "NiT REPA path": CHANNELS * 4 + 4 * image_bytes})
            for name, baseline in (("nr", "NiT path"), ("nr stored REPA", "NiT REPA path"),
                                   ("nr per-step JPEG", "NiT REPA path")):
                line, median = ratio_line([cold], name, baseline, 0)
                print("  " + line)
                if name == "nr stored REPA":
                    print(f"  bar (stored REPA >= 3x NiT's REPA path, {workers} workers, cold): "
                          f"{'met' if median >= 3 else 'NOT met'}")
        print(f"load average (1, 5, 15 min) after: {load_average()}; above {os.cpu_count()} means other work "
              "competed for the cores")

        disk_table(repa_dir, images_dir, float(cells.mean()))
        line, first_pass_cost = interleaved_cost(packs_path, epoch_steps)
        print(line)
        print(f"bar (checksum cost <= 10% of loader throughput, first pass, pack by pack): "
              f"{'met' if first_pass_cost <= 0.10 else 'NOT met'}")
        print(checksum_speed(catalog_dir))
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
