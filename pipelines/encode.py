"""`nr encode` on Ray Data: CPU decode/resize tasks → encoder actor pool (GPUs, or CPU) → catalog writer.

    work items ──map_batches(decode_resize, tasks)──► pixels per variant
               ──map_batches(EncodeActor, actor pool)──► latents (same-shape batches, pixel budget)
               ──iter_batches──► CatalogWriter in the driver (atomic shards, resumable)

The driver is the only writer, so the catalog needs to be reachable from the driver alone; workers
need the source images. Items are sorted by their native output size (read from image headers in
a first pass) so consecutive images share a shape and the encoder sees full batches. Every
per-image failure is a row in the errors table; only a failure rate above the threshold stops a run.

Started by `nr encode`: on a laptop it starts an embedded Ray sized to the machine; inside a Ray
job (`ray job submit -- nr encode ...`) or with `--ray-address auto` it joins the running cluster.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from nrdata.catalog import CatalogWriter, LatentRow, Manifest, stored_array
from nrdata.encoding import DEFAULT_BATCH_PIXELS, PreparedImage, catalog_manifest, encode_prepared, prepare_item
from nrdata.images import DEFAULT_MAX_PIXELS, ImageDecodeError, image_size
from nrdata.policies import ResolutionPolicy, parse_policy
from nrdata.sources import SourceItem, list_source, spread_limit
from nrdata.version import code_version


class EncodeAborted(RuntimeError):
    """More images failed than the run's failure-rate threshold allows."""


@dataclass(frozen=True)
class EncoderSpec:
    """What every encoder actor builds; plain data so that Ray can ship it."""

    name: str = "pixel"
    source: str | None = None  # hub id or local path; None = the encoder's default hub id
    dtype: str | None = None  # storage dtype; None = the encoder's default
    factor: int = 8  # pixel encoder only


def load_encoder(spec: EncoderSpec, device: str = "cpu"):
    from nrdata.encoders import load_encoder as load

    return load(spec.name, spec.source, device=device, dtype=spec.dtype,
                factor=spec.factor if spec.name == "pixel" else None)


@dataclass
class EncodeConfig:
    source: str  # ImageNet-style folder or CSV/Parquet file list
    out: str  # catalog folder
    encoder: EncoderSpec = field(default_factory=EncoderSpec)
    policies: tuple[str, ...] = ("native",)  # specs for nrdata.policies.parse_policy
    patch_size: int = 1  # native sizes are multiples of factor × patch
    flip: bool = True
    repa_pixels: int = 0  # > 0: store each latent's REPA view at this many pixels per latent cell
    batch_pixels: int = DEFAULT_BATCH_PIXELS
    images_per_call: int = 64  # prepared images handed to an encoder actor at once
    limit: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_failure_rate: float = 0.05
    failure_rate_after: int = 500  # images seen before the threshold applies
    ray_address: str | None = None  # None: the job's cluster if inside one, else an embedded Ray
    encoders: int | None = None  # actors; default one per GPU, else one
    gpus_per_encoder: float | None = None  # default 1 when the cluster has GPUs
    shard_rows: int = 2048
    commit_seconds: float = 120.0
    notes: dict = field(default_factory=dict)


@dataclass
class EncodeProgress:
    done: int = 0  # (image, variant) units finished, encoded or failed
    total: int = 0
    encoded: int = 0
    failed: int = 0
    decode_seconds: float = 0.0  # summed over decode tasks
    decode_units: int = 0
    encode_seconds: float = 0.0  # summed over encoder actors
    encode_units: int = 0
    started: float = field(default_factory=time.perf_counter)

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    @property
    def images_per_second(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def decode_rate(self) -> float:
        """Images per second of one decode worker (time inside decode/resize only)."""
        return self.decode_units / self.decode_seconds if self.decode_seconds else 0.0

    @property
    def encode_rate(self) -> float:
        """Images per second of one encoder actor (time inside the encoder only)."""
        return self.encode_units / self.encode_seconds if self.encode_seconds else 0.0


@dataclass
class EncodeSummary:
    catalog: str
    items: int  # source images listed (after --limit)
    encoded: int  # rows committed by this run
    skipped: int  # (image, variant) already in the catalog
    failed: int  # error rows recorded by this run
    seconds: float
    progress: EncodeProgress
    ray: dict


# -- stage 0: header sizes, to sort items by output shape -------------------------------------------

def probe_sizes(batch: pa.Table) -> pa.Table:
    widths, heights = [], []
    for path, key in zip(batch["path"].to_pylist(), batch["key"].to_pylist()):
        try:
            w, h = image_size(path, name=key)
        except ImageDecodeError:
            w = h = -1  # decode will record the error; sort it last
        widths.append(w)
        heights.append(h)
    return pa.table({"key": batch["key"], "width": pa.array(widths, pa.int64()), "height": pa.array(heights, pa.int64())})


def sort_key(policies: list[ResolutionPolicy], width: int, height: int) -> tuple[int, int]:
    if width < 0:
        return (1 << 62, 0)
    shaped = [p for p in policies if p.kind != "center-crop"]
    if not shaped:
        return (0, 0)
    w, h = shaped[0].output_size(width, height)
    return (h, w)


# -- stage 1: decode and resize (CPU tasks) ------------------------------------------------------

PREPARED_SCHEMA = pa.schema([
    ("key", pa.string()), ("variant", pa.string()), ("label", pa.int64()), ("class_name", pa.string()),
    ("orig_w", pa.int64()), ("orig_h", pa.int64()), ("height", pa.int64()), ("width", pa.int64()),
    ("pixels", pa.large_binary()), ("units", pa.int64()), ("stage", pa.string()), ("message", pa.string()),
    ("seconds", pa.float64()),
])


def decode_resize(batch: pa.Table, *, policies: list[dict], max_pixels: int) -> pa.Table:
    by_variant = {p["variant"]: ResolutionPolicy.from_dict({k: v for k, v in p.items() if k != "variant"})
                  for p in policies}
    rows = []
    for item in batch.to_pylist():
        start = time.perf_counter()
        source = SourceItem(Path(item["path"]), item["key"], item["label"], item["class_name"])
        prepared = prepare_item(source, [by_variant[v] for v in item["variants"]], max_pixels=max_pixels)
        seconds = (time.perf_counter() - start) / max(1, len(item["variants"]))
        for key, variant, stage, message in prepared.errors:
            units = len(item["variants"]) if variant is None else 1
            rows.append({"key": key, "variant": variant, "label": item["label"], "class_name": item["class_name"],
                         "units": units, "stage": stage, "message": message, "seconds": seconds})
        for image in prepared.images:
            rows.append({"key": image.key, "variant": image.variant, "label": image.label,
                         "class_name": image.class_name, "orig_w": image.orig_w, "orig_h": image.orig_h,
                         "height": image.pixels.shape[0], "width": image.pixels.shape[1],
                         "pixels": image.pixels.tobytes(), "units": 1, "seconds": seconds})
    return pa.Table.from_pylist(rows, schema=PREPARED_SCHEMA)


# -- stage 2: encode (actor pool) ---------------------------------------------------------------

ENCODED_SCHEMA = pa.schema([
    ("key", pa.string()), ("variant", pa.string()), ("label", pa.int64()), ("class_name", pa.string()),
    ("orig_w", pa.int64()), ("orig_h", pa.int64()), ("image_h", pa.int64()), ("image_w", pa.int64()),
    ("latent", pa.large_binary()), ("latent_flip", pa.large_binary()), ("shape", pa.list_(pa.int64())),
    ("repa_image", pa.large_binary()), ("units", pa.int64()), ("stage", pa.string()), ("message", pa.string()),
    ("decode_seconds", pa.float64()), ("encode_seconds", pa.float64()),
])


CPU_BATCH_PIXELS = 2 * 384 * 512  # an ImageNet photo and its mirror


class EncodeActor:
    """Holds one encoder on its device for the life of the actor (model load and warm-up happen once)."""

    def __init__(self, spec: EncoderSpec, *, flip: bool, batch_pixels: int, repa_pixels: int = 0) -> None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu":  # Ray starts workers with one OpenMP thread; use the CPUs this actor holds
            import ray

            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.encoder = load_encoder(spec, device)
        self.flip = flip
        self.repa_pixels = repa_pixels
        # on a CPU a big batch is slower per image than a small one (it no longer fits the caches)
        self.batch_pixels = batch_pixels if device == "cuda" else min(batch_pixels, CPU_BATCH_PIXELS)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out: list[dict[str, Any]] = []
        images: list[PreparedImage] = []
        decode_seconds: dict[tuple[str, str], float] = {}
        for row in batch.to_pylist():
            if row["stage"] is not None:  # failed upstream: pass the error through
                out.append({**{k: row[k] for k in ("key", "variant", "label", "class_name", "units", "stage",
                                                   "message")}, "decode_seconds": row["seconds"]})
                continue
            pixels = np.frombuffer(row["pixels"], np.uint8).reshape(row["height"], row["width"], 3)
            images.append(PreparedImage(row["key"], row["variant"], pixels, row["label"], row["class_name"],
                                        row["key"], row["orig_w"], row["orig_h"]))
            decode_seconds[(row["key"], row["variant"])] = row["seconds"]
        start = time.perf_counter()
        rows, errors = encode_prepared(self.encoder, images, flip=self.flip, batch_pixels=self.batch_pixels,
                                       repa_pixels=self.repa_pixels)
        per_image = (time.perf_counter() - start) / max(1, len(images))
        dtype = self.encoder.dtype
        for r in rows:
            latent = stored_array(r.latent, dtype)
            out.append({"key": r.key, "variant": r.variant, "label": r.label, "class_name": r.class_name,
                        "orig_w": r.orig_w, "orig_h": r.orig_h, "image_h": r.image_h, "image_w": r.image_w,
                        "latent": latent.tobytes(), "shape": list(latent.shape), "units": 1,
                        "latent_flip": None if r.latent_flip is None else stored_array(r.latent_flip, dtype).tobytes(),
                        "repa_image": None if r.repa_image is None else r.repa_image.tobytes(),
                        "decode_seconds": decode_seconds[(r.key, r.variant)], "encode_seconds": per_image})
        for key, variant, stage, message in errors:
            out.append({"key": key, "variant": variant, "units": 1, "stage": stage, "message": message,
                        "decode_seconds": decode_seconds.get((key, variant), 0.0), "encode_seconds": per_image})
        return pa.Table.from_pylist(out, schema=ENCODED_SCHEMA)


# -- the driver ---------------------------------------------------------------------------------

def connect_ray(address: str | None) -> dict:
    """Join the given cluster, the job's cluster, or start an embedded one that fits this machine."""
    import ray

    if ray.is_initialized():
        return {"mode": "existing", "address": ray.get_runtime_context().gcs_address}
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")
        return {"mode": "cluster", "address": address}
    # token auth only protects a shared cluster; the embedded one lives and dies with this process.
    # Its core worker's C++ log would otherwise warn about Ray Data's own actor arguments on every run.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    total = _memory_bytes()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING",
             object_store_memory=int(min(4 << 30, max(512 << 20, total // 5))))
    return {"mode": "embedded", "address": ray.get_runtime_context().gcs_address}


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def _pending_work(items: list[SourceItem], policies: list[ResolutionPolicy],
                  writer: CatalogWriter) -> tuple[list[dict], int]:
    work, skipped = [], 0
    for item in items:
        wanted = [p.variant for p in policies if not writer.has(item.key, p.variant)]
        skipped += len(policies) - len(wanted)
        if wanted:
            work.append({"path": str(item.path), "key": item.key, "label": item.label,
                         "class_name": item.class_name, "variants": wanted})
    return work, skipped


def _blocks(n: int) -> int:
    return max(1, min(n // 32, 20_000))


def _sort_by_shape(work: list[dict], policies: list[ResolutionPolicy]) -> list[dict]:
    import ray.data

    if all(p.kind == "center-crop" for p in policies) or len(work) < 2:
        return work
    sizes = {}
    probed = ray.data.from_items([{"path": w["path"], "key": w["key"]} for w in work],
                                 override_num_blocks=_blocks(len(work)))
    for table in probed.map_batches(probe_sizes, batch_format="pyarrow", batch_size=256, num_cpus=0.5) \
            .iter_batches(batch_format="pyarrow", batch_size=None):
        sizes.update(zip(table["key"].to_pylist(), zip(table["width"].to_pylist(), table["height"].to_pylist())))
    return sorted(work, key=lambda w: sort_key(policies, *sizes.get(w["key"], (-1, -1))))


def _actor_resources(config: EncodeConfig) -> tuple[int, float, float]:
    """(actors, gpus each, cpus each) for the encoder pool."""
    import ray

    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    per = config.gpus_per_encoder if config.gpus_per_encoder is not None else (1.0 if gpus else 0.0)
    actors = config.encoders or (max(1, int(gpus // per)) if per else 1)
    total = resources.get("CPU", 1)
    if per:
        cpus = 1.0 if total > 2 * actors else 0.5
    else:  # encoding on CPUs: half of them for the encoders' torch threads, half for decoding
        cpus = max(0.5, float(int(total / 2 / actors)))
    # never all CPUs: Ray hangs when the actors hold every CPU and no task is left to feed them
    return actors, per, cpus


def _rebuild_row(record: dict[str, Any], dtype: np.dtype, repa_pixels: int) -> LatentRow:
    shape = tuple(record["shape"])
    latent = np.frombuffer(record["latent"], dtype).reshape(shape)
    twin = None if record["latent_flip"] is None else np.frombuffer(record["latent_flip"], dtype).reshape(shape)
    repa = None
    if record["repa_image"] is not None:
        repa = np.frombuffer(record["repa_image"], np.uint8).reshape(shape[-2] * repa_pixels, shape[-1] * repa_pixels, 3)
    return LatentRow(key=record["key"], variant=record["variant"], latent=latent, latent_flip=twin,
                     label=record["label"], class_name=record["class_name"], source=record["key"],
                     orig_w=record["orig_w"], orig_h=record["orig_h"], image_w=record["image_w"],
                     image_h=record["image_h"], repa_image=repa)


def run_manifest(config: EncodeConfig, encoder) -> tuple[list[ResolutionPolicy], Manifest]:
    """The policies a run encodes and the manifest it asks for (the writer grows an existing catalog
    by it, or refuses it)."""
    unit = encoder.info.factor * config.patch_size
    policies = [parse_policy(spec, unit=unit) for spec in config.policies]
    if config.repa_pixels < 0:
        raise ValueError(f"--repa-pixels must be >= 0 (0: store no REPA images), got {config.repa_pixels}")
    manifest = catalog_manifest(encoder, policies, flip=config.flip, source_root=str(Path(config.source).resolve()),
                                repa_pixels=config.repa_pixels,
                                notes={**config.notes, "made_by": "nr encode", "code_version": code_version()})
    return policies, manifest


def run_encode(config: EncodeConfig, *, on_progress: Callable[[EncodeProgress], None] | None = None) -> EncodeSummary:
    """Encode `config.source` into the catalog at `config.out`; re-running resumes where it stopped."""
    import ray

    items = spread_limit(list_source(config.source), config.limit)
    probe_encoder = load_encoder(config.encoder, "cpu")  # only for what the manifest records
    policies, manifest = run_manifest(config, probe_encoder)
    dtype = np.dtype("uint16") if manifest.dtype == "bfloat16" else np.dtype(manifest.dtype)
    del probe_encoder
    progress = EncodeProgress()
    started = time.perf_counter()
    with CatalogWriter(config.out, manifest, shard_rows=config.shard_rows,
                       commit_seconds=config.commit_seconds) as writer:
        work, skipped = _pending_work(items, policies, writer)
        progress.total = sum(len(w["variants"]) for w in work)
        ray_info = {"mode": "not started"}
        try:
            if work:
                ray_info = connect_ray(config.ray_address)
                _stream(config, manifest, work, policies, writer, progress, dtype, ray_info, on_progress)
        finally:
            if ray_info["mode"] == "embedded":
                ray.shutdown()
    # after close(), which committed the last shard
    return EncodeSummary(catalog=str(config.out), items=len(items), encoded=writer.summary.committed,
                         skipped=skipped, failed=writer.summary.errors, seconds=time.perf_counter() - started,
                         progress=progress, ray=ray_info)


def _stream(config: EncodeConfig, manifest, work: list[dict], policies: list[ResolutionPolicy],
            writer: CatalogWriter, progress: EncodeProgress, dtype: np.dtype, ray_info: dict,
            on_progress: Callable[[EncodeProgress], None] | None) -> None:
    import ray

    _configure_data_context()
    work = _sort_by_shape(work, policies)
    actors, gpus, cpus = _actor_resources(config)
    ray_info.update(actors=actors, gpus_per_actor=gpus, cpus_per_actor=cpus)
    dataset = (
        ray.data.from_items(work, override_num_blocks=_blocks(len(work)))
        .map_batches(decode_resize, fn_kwargs={"policies": list(manifest.policies),
                                               "max_pixels": config.max_pixels},
                     batch_format="pyarrow", batch_size=8, num_cpus=1)
        .map_batches(EncodeActor, fn_constructor_kwargs={"spec": config.encoder, "flip": config.flip,
                                                         "batch_pixels": config.batch_pixels,
                                                         "repa_pixels": config.repa_pixels},
                     batch_format="pyarrow", batch_size=config.images_per_call,
                     compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                     num_gpus=gpus or None, num_cpus=cpus)
    )
    failures: Counter[str] = Counter()
    for table in dataset.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=2):
        for record in table.to_pylist():
            progress.done += record["units"]
            progress.decode_seconds += record["decode_seconds"] or 0.0
            progress.decode_units += 1
            if record["encode_seconds"] is not None:
                progress.encode_seconds += record["encode_seconds"]
                progress.encode_units += 1
            if record["stage"] is not None:
                progress.failed += record["units"]
                message = record["message"].removeprefix(f"{record['key']}: ")
                failures[f"{record['stage']}: {message[:80]}"] += 1
                writer.add_error(record["key"], record["stage"], record["message"],
                                 variant=record["variant"], source=record["key"])
            elif writer.add(_rebuild_row(record, dtype, manifest.repa_pixels)):
                progress.encoded += 1
            else:
                progress.failed += 1  # refused by the writer: non-finite values
        _check_failure_rate(config, progress, failures)
        if on_progress:
            on_progress(progress)


def _configure_data_context() -> None:
    import ray.data

    # Ray Data logs every execution and the disabled bars at INFO/WARNING; the CLI reports progress itself
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # nr draws its own
    ctx.print_on_execution_start = False
    ctx.enable_auto_log_stats = False
    # per-image errors are caught inside the stages; anything raised is a bug and should stop the run
    ctx.max_errored_blocks = 0


def _check_failure_rate(config: EncodeConfig, progress: EncodeProgress, failures: Counter[str]) -> None:
    if progress.done < config.failure_rate_after or progress.failed <= config.max_failure_rate * progress.done:
        return
    common = ", ".join(f"{n}x {message}" for message, n in failures.most_common(3))
    raise EncodeAborted(
        f"{progress.failed} of {progress.done} images failed ({progress.failed / progress.done:.1%} > "
        f"--max-failure-rate {config.max_failure_rate:.1%}); most common: {common}. What was encoded is kept; "
        f"see `nr catalog errors {config.out}`, fix the source, and re-run the same command to resume."
    )
