"""`nr sample`: class-conditional images at any size from a checkpoint, ready for an evaluator.

    summary = generate("runs/xl", SampleRequest(per_class=50, seed=0), "samples/xl-256",
                       SampleSettings(preset="nit-256", device="cuda"))

The journey of one batch (all of one size): per-image noise from each sample's seed → `transport.sample`
(ODE/SDE, CFG with an interval, RoPE extrapolation when the size is beyond training) → tokens
unpatchified → un-normalised as the model was trained (the checkpoint's data identity: per-channel
z = z_norm * std + mean with the catalogs' statistics, or scalar z = z_norm / scaling_factor, NiT's)
→ the catalog's encoder decodes → PNGs. When every rank
is done, rank 0 writes the npz, the grid and the provenance (see `sample_outputs` for the folder).

What decides a sample is `sample_plan`: sample j of a size has seed base + j and a label fixed by
the class spec. Noise is drawn per image from its seed on the CPU, and every model operation is per
image (block-diagonal attention, per-image conditioning), so a sample regenerated alone equals the
one made in a batch bit for bit on the CPU. On a GPU the matmul kernels a library picks can depend
on the batch's token count, so expect agreement to the last few bits there, not identity.

Resuming: a PNG that exists is not made again. The provenance written when a run starts records the
settings that decide the pixels; a folder holding samples of other settings is refused rather than
mixed. `count` and the sizes may change between runs (sample j does not depend on them).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from nrdata.version import code_version
from nrtrain.checkpoint import (CheckpointMismatchError, check_data_identity, checkpoint_files, data_identity,
                                file_sha256, load_model, resolve_checkpoint, verify_checkpoint)
from nrtrain.normalization import LatentScaling, run_normalization
from nrtrain.packed import unpatchify
from nrtrain.rope import RopeExtrapolation
from nrtrain.sample_outputs import (read_provenance, remove_temporaries, sample_done, sample_path, write_grid,
                                    write_npz, write_png, write_provenance)
from nrtrain.sample_plan import (SAMPLE_PRESETS, SamplePlan, SampleRequest, SizeChoice, check_sampling_memory,
                                 plan_samples, resolve_sampler, sampling_bytes)
from nrtrain.transport import ImageNoise, SamplerConfig, noise_pack, sample

PROVENANCE_FORMAT = "nr-samples/1"
MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
Progress = Callable[[int, int], None]


@dataclass
class SizeOutcome:
    size: SizeChoice
    extrapolated: bool  # RoPE extrapolation applied (the size exceeds training on an axis and a mode is set)
    beyond_training: bool  # the size exceeds the largest training size on an axis
    missing: int  # samples of the plan still without a PNG (npz and grid are written only when 0)
    npz: Path | None = None
    grid: Path | None = None


@dataclass
class SampleSummary:
    out_dir: Path
    sampler: SamplerConfig
    nfe: int  # velocity evaluations per sample (what papers call NFE)
    guided_nfe: int  # of them, how many ran the doubled CFG pack
    sizes: list[SizeOutcome]
    generated: int  # samples this rank made in this call
    skipped: int  # samples this rank found already made
    model_forwards: int  # pack-sized forward passes this rank ran
    nonfinite: list[Path]  # samples whose latent had NaN/inf (written with those values zeroed)
    warnings: list[str]
    provenance: Path | None  # rank 0 only
    seconds: float


class LatentDecoder:
    """Model tokens of same-size images → uint8 images [N, H, W, 3].

    Undoes the patchify and the run's normalisation (`LatentScaling.denormalize`: per-channel
    z = z_norm * std + mean, scalar z = z_norm / scaling_factor), then decodes with the catalog's
    encoder. The pixel encoder's latents are the pixels themselves, so they are rounded to uint8
    first and decoding is exact; a VAE gets the float latent ([N, C, h, w]; for KL VAEs that is the
    plain latent, which their decode takes in place of the stored moments).
    """

    def __init__(self, encoder, scaling: LatentScaling, patch_size: int, *, batch_size: int = 8):
        self.encoder = encoder
        self.scaling = scaling
        self.channels = len(scaling.mean)
        if self.channels != encoder.info.channels:
            raise ValueError(f"normalisation has {self.channels} channels but encoder {encoder.info.name} makes "
                             f"{encoder.info.channels}")
        self.patch_size = patch_size
        self.batch_size = batch_size
        self.is_pixel = encoder.info.name == "pixel"

    def latents(self, tokens: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """[N, C, h·p, w·p] un-normalised latents of the images in `tokens` [N·h·w, C·p·p]."""
        h, w = size
        images = tokens.float().split(h * w)
        z = torch.stack([unpatchify(t, h, w, self.channels, self.patch_size) for t in images])
        return self.scaling.denormalize(z)

    def __call__(self, tokens: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        z = self.latents(tokens, size)
        decoded = []
        for chunk in z.split(self.batch_size):
            if self.is_pixel:
                chunk = chunk.round().clamp(0, 255).to(torch.uint8).cpu().numpy()
            decoded.append(self.encoder.decode(chunk))
        return np.concatenate(decoded)


def count_evaluations(sampler: SamplerConfig) -> tuple[int, int]:
    """(NFE per sample, of which guided): from the real solver run on a one-token pack, so the count is
    the solver's own and every setting is checked before any model is loaded."""
    batch = noise_pack([(1, 1)], 1, [0], [0])
    result = sample(lambda x, t, y, b: torch.zeros_like(x), batch, torch.zeros(1, dtype=torch.int64), null_class=1,
                    **dataclasses.asdict(sampler), generator=ImageNoise([(1, 1)], 1, [0], stream="sde"),
                    model_dtype=torch.float32)
    return result.nfe, result.guided_nfe


def default_model_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class SampleSettings:
    """How `generate` makes the samples a `SampleRequest` asks for (the CLI's options, one place).

    Sampler: `preset` (a row of NiT's README, also giving the default size) with any of solver, steps,
    cfg_scale, cfg_interval, shift, heun_guidance overriding it. RoPE extrapolation (none, linear,
    dynntk, yarn; `decouple` per axis) applies to sizes larger than the checkpoint's largest training
    size, or than `rope_train_size` (H, W in pixels) when given. `dtype` is the model's (default
    bfloat16 on CUDA, float32 elsewhere); the state is integrated in `integration_dtype`. `catalogs`,
    when given, are checked against the checkpoint's data identity; `encoder_source` is where the
    decoder's weights load from, when not where the checkpoint says. Ranks own every
    `world_size`-th sample."""

    preset: str | None = None
    solver: str | None = None
    steps: int | None = None
    cfg_scale: float | None = None
    cfg_interval: tuple[float, float] | None = None
    shift: float | None = None
    heun_guidance: str | None = None
    rope_extrapolation: str = "none"
    decouple: bool = False
    rope_train_size: tuple[int, int] | None = None
    device: str | torch.device = "cpu"
    dtype: str | torch.dtype | None = None
    integration_dtype: torch.dtype = torch.float64
    batch_size: int = 16
    decode_batch_size: int = 8
    ema: bool = True
    catalogs: tuple[str | Path, ...] = ()
    encoder_source: str | None = None
    grid_count: int = 36
    rank: int = 0
    world_size: int = 1

    def sampler(self) -> SamplerConfig:
        return resolve_sampler(self.preset, solver=self.solver, steps=self.steps, cfg_scale=self.cfg_scale,
                               cfg_interval=self.cfg_interval, shift=self.shift, heun_guidance=self.heun_guidance)


@dataclass
class SamplingJob:
    """What `generate` resolved from the checkpoint, the request and the settings before any work."""

    folder: Path
    info: dict[str, Any]
    data: dict[str, Any]
    scaling: LatentScaling
    sampler: SamplerConfig
    nfe: int
    guided_nfe: int
    plan: SamplePlan
    train_tokens: tuple[int, int] | None
    rope: RopeExtrapolation | None
    device: torch.device
    model_dtype: torch.dtype
    batch_sizes: list[int]
    weights_name: str
    record: dict[str, Any]  # the settings that decide the pixels (a resume must repeat them)


def generate(checkpoint: str | Path, request: SampleRequest, out_dir: str | Path,
             settings: SampleSettings | None = None, *, encoder=None, progress: Progress | None = None,
             **options) -> SampleSummary:
    """Make the plan's samples that this rank owns and that do not exist yet; then (rank 0, after a
    barrier when torch.distributed is initialised) the npz, grid and provenance of every complete size.

    How: `settings`, or its fields as keywords (`generate(..., steps=2)`), not both. `encoder`
    replaces the one the checkpoint names (e.g. one already loaded).
    Bad requests raise ValueError (CheckpointMismatchError for a foreign catalog, CheckpointDamagedError
    for weights or a run.json that differ from what was saved) before any work; so does a size whose
    working set exceeds the memory available (a batch that does not fit is made smaller, with a warning).
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    if settings is not None and options:
        raise TypeError(f"pass the sampling settings as `settings` or as keywords, not both ({sorted(options)})")
    settings = settings or SampleSettings(**options)
    job = _prepare(checkpoint, request, settings)
    folder, plan, sampler = job.folder, job.plan, job.sampler
    previous = _check_resumable(out_dir, job.record)

    work = [(k, j) for k in range(len(plan.sizes)) for j in plan.indices][settings.rank::settings.world_size]
    todo = [(k, j) for k, j in work if not sample_done(sample_path(out_dir, plan.sizes[k].name, j))]
    warnings = [f"size {s.requested[0]}x{s.requested[1]} is not a multiple of {plan.unit} px; sampling at {s.name}"
                for s in plan.sizes if s.rounded]
    warnings += [f"size {s.name}: {b} images per model call instead of {settings.batch_size}, to fit in memory"
                 for s, b in zip(plan.sizes, job.batch_sizes) if b < settings.batch_size and len(plan.indices) > b]
    saved_encoder = job.data["encoder"]
    model = decoder = None
    if todo and encoder is None:  # a run with nothing left to make (only the npz to write) loads no weights
        encoder = _load_encoder(saved_encoder, settings.encoder_source, job.device)
    if encoder is not None:
        _check_encoder(encoder, saved_encoder, job.data.get("encoder_weights"), warnings)
    if todo:
        decoder = LatentDecoder(encoder, job.scaling, job.info["model"]["patch_size"],
                                batch_size=settings.decode_batch_size)
        model, _ = load_model(folder, ema=settings.ema, device=job.device, attention="auto")
        model = model.to(dtype=job.model_dtype)
        model.use_attention(job.device, job.model_dtype, training=False)

    out_dir.mkdir(parents=True, exist_ok=True)
    for size in plan.sizes:
        (out_dir / size.name).mkdir(exist_ok=True)
    outcomes = [SizeOutcome(size, extrapolated=job.rope is not None and _beyond(size, job.train_tokens),
                            beyond_training=_beyond(size, job.train_tokens), missing=0) for size in plan.sizes]
    record = _provenance(job, settings, outcomes, encoder.info if encoder else saved_encoder)
    if previous:
        record["created"] = previous.get("created", record["created"])
    if settings.rank == 0:
        write_provenance(out_dir, {**record, "complete": False})

    skipped = len(work) - len(todo)
    generated, forwards, nonfinite = 0, 0, []
    made_sizes = set()
    if progress:
        progress(skipped, len(work))
    for k, size in enumerate(plan.sizes):
        pending = [j for kk, j in todo if kk == k]
        velocity = functools.partial(model, extrapolation=job.rope) if outcomes[k].extrapolated else model
        for start in range(0, len(pending), job.batch_sizes[k]):
            batch = pending[start:start + job.batch_sizes[k]]
            tokens, calls = _sample_batch(velocity, model, plan, size, batch, sampler, job.model_dtype,
                                          settings.integration_dtype, job.device)
            finite = torch.isfinite(tokens).view(len(batch), -1).all(dim=1).tolist()
            images = decoder(torch.nan_to_num(tokens, nan=0.0, posinf=0.0, neginf=0.0), size.tokens)
            for j, image, ok in zip(batch, images, finite):
                path = sample_path(out_dir, size.name, j)
                write_png(path, image)
                if not ok:
                    nonfinite.append(path)
            generated += len(batch)
            forwards += calls
            made_sizes.add(k)
            if progress:
                progress(skipped + generated, len(work))

    if settings.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
    provenance = None
    if settings.rank == 0:
        for k, outcome in enumerate(outcomes):
            _finish_size(out_dir, plan, outcome, k in made_sizes, settings.grid_count, single=len(outcomes) == 1)
        if nonfinite:
            warnings.append(f"{len(nonfinite)} samples had non-finite latents (zeroed before decoding), first "
                            f"{nonfinite[0]}; try dtype float32")
        record["sizes"] = [_size_record(o) for o in outcomes]
        record["nonfinite"] = [str(p.relative_to(out_dir)) for p in nonfinite]
        record["complete"] = all(o.missing == 0 for o in outcomes)
        record["updated"] = _now()
        provenance = write_provenance(out_dir, record)
    return SampleSummary(out_dir=out_dir, sampler=sampler, nfe=job.nfe, guided_nfe=job.guided_nfe, sizes=outcomes,
                         generated=generated, skipped=skipped, model_forwards=forwards, nonfinite=nonfinite,
                         warnings=warnings, provenance=provenance, seconds=time.perf_counter() - started)


def _prepare(checkpoint: str | Path, request: SampleRequest, settings: SampleSettings) -> SamplingJob:
    """Every check that needs no weights, then the weights' checksum: a bad request fails here."""
    device = torch.device(settings.device)
    folder = resolve_checkpoint(checkpoint)
    info = verify_checkpoint(folder, [], use="sample")  # run.json alone here; the weights below
    data = _data_identity(info, folder)
    model_config = info["model"]
    patch_size, channels = int(model_config["patch_size"]), int(model_config["in_channels"])
    saved_encoder = data["encoder"]
    if channels != saved_encoder["channels"] or patch_size != data["patch_size"]:
        raise CheckpointMismatchError(f"{folder}: the model takes {channels}-channel latents with patch {patch_size} "
                                      f"but its data identity says {saved_encoder['channels']} channels, patch "
                                      f"{data['patch_size']}; the run.json was edited or belongs to other weights")
    scaling = LatentScaling.from_record(data["normalization"])

    sampler = settings.sampler()
    preset = settings.preset
    plan = plan_samples(request, factor=int(saved_encoder["factor"]), patch_size=patch_size,
                        num_classes=int(model_config["num_classes"]),
                        default_size=SAMPLE_PRESETS[preset].size if preset else None)
    train_tokens = tuple(int(v) // patch_size for v in data["max_latent_hw"]) if data.get("max_latent_hw") else None
    rope_train_size = settings.rope_train_size
    if rope_train_size is not None:  # pixels, as every size nr sample takes; RoPE counts tokens
        unit = int(saved_encoder["factor"]) * patch_size
        if len(rope_train_size) != 2 or min(rope_train_size) < unit:
            raise ValueError(f"rope train size {rope_train_size}: give HxW in pixels, each at least one unit "
                             f"({unit} px)")
        train_tokens = (int(rope_train_size[0]) // unit, int(rope_train_size[1]) // unit)
    rope = _rope(settings.rope_extrapolation, settings.decouple, train_tokens, folder)
    if settings.catalogs:
        _check_catalogs(settings.catalogs, data, patch_size, folder)
    model_dtype = _model_dtype(settings.dtype, device)
    if settings.batch_size < 1 or settings.decode_batch_size < 1:
        raise ValueError(f"batch sizes must be >= 1, got batch_size={settings.batch_size}, "
                         f"decode_batch_size={settings.decode_batch_size}")
    if settings.world_size < 1 or not 0 <= settings.rank < settings.world_size:
        raise ValueError(f"rank {settings.rank} is not in 0..world_size-1 (world_size {settings.world_size})")
    nfe, guided_nfe = count_evaluations(sampler)
    batch_sizes = _batch_sizes(plan, model_config, patch_size * patch_size * channels, model_dtype, sampler,
                               settings.batch_size, device)
    saved_ema = (folder / "ema.safetensors").is_file() or "ema.safetensors" in (checkpoint_files(info) or {})
    weights_name = "ema.safetensors" if settings.ema and saved_ema else "model.safetensors"  # a lost EMA is named below
    # one read of the weights gives both the provenance hash and the check against the saved one
    weights_sha256 = file_sha256(folder / weights_name) if (folder / weights_name).is_file() else None
    verify_checkpoint(folder, [weights_name], use="sample", digests={weights_name: weights_sha256 or ""})
    sampler_record = {**dataclasses.asdict(sampler), "cfg_interval": list(sampler.cfg_interval)}
    if sampler.solver != "heun":  # decides nothing then; left out so that older sample folders still resume
        del sampler_record["heun_guidance"]
    record = {
        "checkpoint_sha256": weights_sha256, "weights": weights_name,
        "sampler": sampler_record,
        "integration_dtype": str(settings.integration_dtype).removeprefix("torch."),
        "model_dtype": str(model_dtype).removeprefix("torch."),
        "rope": {"mode": settings.rope_extrapolation, "decouple": settings.decouple,
                 # an override decides pixels; the checkpoint's own size is recorded in the provenance
                 **({"train_size_tokens": list(train_tokens)} if rope_train_size is not None else {})},
        "base_seed": plan.base_seed, "classes": {k: plan.class_spec[k] for k in ("mode", "classes")},
        "encoder": {k: saved_encoder.get(k) for k in ("name", "factor", "channels", "quantity")},
    }
    if scaling.mode == "scalar":  # per-channel runs keep the record older sample folders hold
        record["normalization"] = {"mode": "scalar", "scaling_factor": scaling.scaling_factor}
    return SamplingJob(folder=folder, info=info, data=data, scaling=scaling, sampler=sampler, nfe=nfe,
                       guided_nfe=guided_nfe, plan=plan, train_tokens=train_tokens, rope=rope, device=device,
                       model_dtype=model_dtype, batch_sizes=batch_sizes, weights_name=weights_name, record=record)


def _sample_batch(velocity, model, plan: SamplePlan, size: SizeChoice, batch: list[int], sampler: SamplerConfig,
                  model_dtype: torch.dtype, integration_dtype: torch.dtype,
                  device: torch.device) -> tuple[torch.Tensor, int]:
    """Tokens [N·h·w, D] at t = 0 for samples `batch` of one size, and the pack-sized forwards it took."""
    token_sizes = [size.tokens] * len(batch)
    seeds = [plan.seed(j) for j in batch]
    labels = [plan.labels[j] for j in batch]
    token_dim = model.config.token_dim
    noise = noise_pack(token_sizes, token_dim, seeds, labels).to(device)
    sde_noise = ImageNoise(token_sizes, token_dim, seeds, stream="sde") if sampler.solver == "euler-maruyama" else None
    result = sample(velocity, noise, noise.labels, null_class=model.null_class, **dataclasses.asdict(sampler),
                    generator=sde_noise, dtype=integration_dtype, model_dtype=model_dtype)
    return result.tokens, result.nfe + result.guided_nfe


def _finish_size(out_dir: Path, plan: SamplePlan, outcome: SizeOutcome, made_now: bool, grid_count: int,
                 single: bool) -> None:
    """npz and grid of one size when all its samples exist; stale ones removed when some are missing."""
    size = outcome.size
    paths = [sample_path(out_dir, size.name, j) for j in range(plan.count)]
    outcome.missing = sum(not sample_done(p) for p in paths)
    npz = out_dir / ("samples.npz" if single else f"samples-{size.name}.npz")
    grid = out_dir / ("grid.png" if single else f"grid-{size.name}.png")
    remove_temporaries(out_dir / size.name)
    remove_temporaries(out_dir)
    if outcome.missing:
        npz.unlink(missing_ok=True)
        grid.unlink(missing_ok=True)
        return
    if made_now or _npz_count(npz) != plan.count:
        write_npz(npz, paths, plan.labels, size.used)
    if made_now or not grid.is_file():
        # class-balanced labels interleave (j % K), so K columns put one class in each column
        columns = len(set(plan.labels)) if plan.class_spec["mode"] == "per-class" else None
        write_grid(grid, paths[:grid_count], columns=columns)
    outcome.npz, outcome.grid = npz, grid


def _npz_count(path: Path) -> int | None:
    """Images in an npz's arr_0, read from its header alone (None when there is no readable one)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive, archive.open("arr_0.npy") as member:
            np.lib.format.read_magic(member)
            shape, _, _ = np.lib.format.read_array_header_1_0(member)
            return shape[0]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def _data_identity(info: dict[str, Any], folder: Path) -> dict[str, Any]:
    data = info.get("data")
    needed = ("encoder", "normalization", "patch_size")
    if not isinstance(data, dict) or any(k not in data for k in needed) or "model" not in info:
        raise CheckpointMismatchError(f"{folder}/run.json lacks the model config or the data identity "
                                      f"({', '.join(needed)}); sampling needs them to decode. Was it written by "
                                      f"`nr train`?")
    return data


def _rope(mode: str, decouple: bool, train_tokens: tuple[int, int] | None, folder: Path) -> RopeExtrapolation | None:
    if mode == "none":
        RopeExtrapolation(mode, train_tokens, decouple)  # still checks the mode name
        return None
    if train_tokens is None:
        raise CheckpointMismatchError(f"{folder}/run.json records no max_latent_hw (the largest training size), "
                                      f"which RoPE extrapolation {mode!r} starts from; use --rope-extrapolation none")
    return RopeExtrapolation(mode, train_tokens, decouple)


def _beyond(size: SizeChoice, train_tokens: tuple[int, int] | None) -> bool:
    return train_tokens is not None and (size.tokens[0] > train_tokens[0] or size.tokens[1] > train_tokens[1])


def _check_catalogs(catalogs: Sequence[str | Path], data: dict[str, Any], patch_size: int, folder: Path) -> None:
    """The catalogs hold latents the model reads, normalised in the run's own mode (in scalar mode
    with its factor: the catalogs' statistics and recorded factor do not enter)."""
    from nrdata.catalog import Catalog

    opened = [Catalog(c) for c in catalogs]
    saved = LatentScaling.from_record(data["normalization"])
    current = data_identity(opened, saved if saved.mode == "scalar" else run_normalization(opened), patch_size)
    check_data_identity(data, current, where=f"checkpoint {folder} with catalogs {', '.join(map(str, catalogs))}")


def _model_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return default_model_dtype(device)
    if isinstance(dtype, torch.dtype):
        if dtype not in MODEL_DTYPES.values():
            raise ValueError(f"model dtype {dtype} is not one of {', '.join(MODEL_DTYPES)}")
        return dtype
    if dtype not in MODEL_DTYPES:
        raise ValueError(f"unknown model dtype {dtype!r}; choose one of {', '.join(MODEL_DTYPES)}")
    return MODEL_DTYPES[dtype]


def _load_encoder(saved: dict[str, Any], source: str | None, device: torch.device):
    from nrdata.encoders import load_encoder

    if saved["name"] == "pixel":
        return load_encoder("pixel", factor=int(saved["factor"]))
    return load_encoder(saved["name"], source or saved.get("source") or None, device=device)


def _check_encoder(encoder, saved: dict[str, Any], saved_weights: str | None, warnings: list[str]) -> None:
    loaded = encoder.info
    if (loaded.name, loaded.factor, loaded.channels) != (saved["name"], saved["factor"], saved["channels"]):
        raise CheckpointMismatchError(f"encoder {loaded.name} (f{loaded.factor} c{loaded.channels}) is not the one "
                                      f"the model was trained on ({saved['name']} f{saved['factor']} "
                                      f"c{saved['channels']})")
    weights = getattr(encoder, "weights_id", "")
    if saved_weights and weights:  # the weights' content decides, wherever they were read from
        if weights != saved_weights:
            warnings.append(f"the decoder's weights ({weights}) are not those the catalog was encoded with "
                            f"({saved_weights}); the images will not match the latents the model learned")
    elif loaded.revision != saved.get("revision"):
        warnings.append(f"encoder weights revision {loaded.revision} differs from the one the catalog was encoded "
                        f"with ({saved.get('revision')})")


def _check_resumable(out_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The provenance of earlier samples in `out_dir`, refused when their settings differ from these."""
    previous = read_provenance(out_dir) if out_dir.is_dir() else None
    if previous is None:
        return None
    before = previous.get("settings", {})
    changed = [key for key in sorted(set(before) | set(settings)) if before.get(key) != settings.get(key)]
    if changed:
        key = changed[0]
        raise ValueError(f"{out_dir} holds samples made with other settings ({key}: {before.get(key)} there, "
                         f"{settings.get(key)} now); choose another output folder, or repeat the settings "
                         f"to resume")
    return previous


def _batch_sizes(plan: SamplePlan, model_config: dict[str, Any], token_dim: int, model_dtype: torch.dtype,
                 sampler: SamplerConfig, batch_size: int, device: torch.device) -> list[int]:
    """Images per model call for each size: `batch_size`, or fewer where that would not fit in memory.
    Refuses (ValueError) a size of which one image does not fit, before any weights load."""
    available = available_memory(device)
    model_bytes = torch.finfo(model_dtype).bits // 8
    sizes = []
    for size in plan.sizes:
        per_image = sampling_bytes(size.tokens[0] * size.tokens[1], token_dim=token_dim,
                                   hidden=int(model_config["hidden"]),
                                   mlp_ratio=float(model_config.get("mlp_ratio", 4.0)), model_bytes=model_bytes,
                                   unit=plan.unit, guided=sampler.cfg_scale > 1)
        sizes.append(check_sampling_memory(size, per_image=per_image, available=available, batch_size=batch_size,
                                           where=str(device)))
    return sizes


def available_memory(device: torch.device) -> int | None:
    """Bytes a sampling run may use on `device`: most of what is free now (None when unknown)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.9 * free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(0.9 * int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:
        return int(0.9 * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _size_record(outcome: SizeOutcome) -> dict[str, Any]:
    size = outcome.size
    return {"requested": list(size.requested), "used": list(size.used), "tokens": list(size.tokens),
            "rounded": size.rounded, "folder": size.name, "beyond_training": outcome.beyond_training,
            "rope_extrapolated": outcome.extrapolated, "missing": outcome.missing,
            "npz": outcome.npz.name if outcome.npz else None, "grid": outcome.grid.name if outcome.grid else None}


def _provenance(job: SamplingJob, settings: SampleSettings, outcomes: list[SizeOutcome],
                encoder_info) -> dict[str, Any]:
    record, sampler, plan, info, data = job.record, job.sampler, job.plan, job.info, job.data
    reference = SAMPLE_PRESETS[settings.preset] if settings.preset else None
    scaling = job.scaling
    return {
        "format": PROVENANCE_FORMAT,
        "settings": record,
        "checkpoint": {"path": str(job.folder), "step": info.get("step"), "weights": record["weights"],
                       "ema": record["weights"] == "ema.safetensors", "sha256": record["checkpoint_sha256"],
                       "model": info["model"], "catalogs": data.get("catalogs"),
                       **({"imported": info["imported"]} if info.get("imported") else {})},
        "sampler": {"preset": settings.preset, "solver": sampler.solver, "steps": sampler.steps, "nfe": job.nfe,
                    "guided_nfe": job.guided_nfe, "cfg_scale": sampler.cfg_scale,
                    "cfg_interval": list(sampler.cfg_interval), "shift": sampler.shift,
                    "heun_guidance": sampler.heun_guidance if sampler.solver == "heun" else None,
                    "integration_dtype": record["integration_dtype"],
                    "reference": ({"source": "NiT README, NiT-XL-1000K", "size": list(reference.size),
                                   "fid": reference.reference_fid} if reference else None)},
        "dtype": record["model_dtype"],
        "rope": {"mode": record["rope"]["mode"], "decouple": record["rope"]["decouple"],
                 "train_size_tokens": list(job.train_tokens) if job.train_tokens else None},
        "seed": {"base": plan.base_seed, "rule": "sample j of every size uses seed base + j; its start and SDE "
                 "noise are PCG64 streams of SeedSequence([seed, 0]) and ([seed, 1])"},
        "classes": plan.class_spec,
        "labels": list(plan.labels),
        "count": plan.count,
        "total": plan.count * len(plan.sizes),
        "sizes": [_size_record(o) for o in outcomes],
        "encoder": encoder_info if isinstance(encoder_info, dict) else dataclasses.asdict(encoder_info),
        "normalization": {"mode": scaling.mode, "scaling_factor": scaling.scaling_factor,
                          "mean": list(scaling.mean), "std": list(scaling.std),
                          "convention": ("z = z_norm / scaling_factor" if scaling.mode == "scalar" else
                                         "z = z_norm * std + mean")},
        "device": str(job.device), "world_size": settings.world_size, "batch_size": settings.batch_size,
        "torch": torch.__version__, "code_version": code_version(), "created": _now(),
    }
