"""What a sampling run makes, decided before any model is loaded: sizes, labels, seeds, sampler.

A run makes `count` samples at each requested size. Sample j (0 <= j < count) at any size has
    seed  = base_seed + j
    label = the class spec's label for j (see `class_label`)
and is written as `{H}x{W}/{j:06d}.png`. Nothing about sample j depends on `count`, on the other
sizes, on the batch it ran in or on the rank that ran it, so any sample can be regenerated alone
(`indices=[j]`, or `count=1` with `seed=base_seed + j` and the same label) and a run can be extended
to a larger count later.

Sizes are given in pixels (H, W) and mapped with `nrdata.policies.legal_size` to the nearest multiple
of one unit (encoder factor × patch size) per side; a side below one unit is refused rather than
rounded up, because a model asked for 8 px and handed 32 px would silently answer another question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from nrdata.policies import legal_size
from nrtrain.transport import NIT_PRESETS, SamplerConfig
from nrtrain.transport.solvers import HEUN_GUIDANCE, SOLVERS

# tags the label stream apart from the solvers' noise streams of the same seed
_LABEL_STREAM = 0x6C61626C  # "labl"
RANDOM_CLASSES = "random"
# 2048 x 2048 tokens (65536 px a side at f32): far beyond any trained size, and a bound that stops a
# typo such as 100000x100000 before it asks for terabytes
MAX_TOKENS_PER_IMAGE = 1 << 22
GIB = 1 << 30


@dataclass(frozen=True)
class SamplePreset:
    """One row of NiT's README sampling table (NiT-XL-1000K): the sampler settings and the size
    (H, W) they were tuned for, with the FID that row reports."""

    sampler: SamplerConfig
    size: tuple[int, int]
    reference_fid: float


def _ode(cfg_scale: float, high: float) -> SamplerConfig:
    return SamplerConfig("euler", 50, cfg_scale, (0.0, high), heun_guidance="step-start")


# README "Resolution" is read as height × width, the order of NiT's --height/--width and folder names.
SAMPLE_PRESETS: dict[str, SamplePreset] = {
    "nit-256": SamplePreset(NIT_PRESETS["nit-256"], (256, 256), 2.16),
    "nit-512": SamplePreset(NIT_PRESETS["nit-512"], (512, 512), 1.57),
    "nit-768": SamplePreset(NIT_PRESETS["nit-768"], (768, 768), 4.05),
    "nit-1024": SamplePreset(NIT_PRESETS["nit-1024"], (1024, 1024), 4.52),
    "nit-1536": SamplePreset(_ode(3.5, 0.9), (1536, 1536), 6.51),
    "nit-2048": SamplePreset(_ode(4.5, 0.9), (2048, 2048), 24.76),
    "nit-320x960": SamplePreset(_ode(4.0, 0.9), (320, 960), 16.85),
    "nit-432x768": SamplePreset(_ode(2.75, 0.7), (432, 768), 4.11),
    "nit-480x640": SamplePreset(_ode(2.75, 0.7), (480, 640), 3.72),
    "nit-640x480": SamplePreset(_ode(2.5, 0.7), (640, 480), 3.41),
    "nit-768x432": SamplePreset(_ode(2.85, 0.7), (768, 432), 5.27),
    "nit-960x320": SamplePreset(_ode(4.5, 0.9), (960, 320), 9.90),
}


def resolve_sampler(preset: str | None = None, *, solver: str | None = None, steps: int | None = None,
                    cfg_scale: float | None = None, cfg_interval: Sequence[float] | None = None,
                    shift: float | None = None, heun_guidance: str | None = None) -> SamplerConfig:
    """The preset's settings (or SamplerConfig's defaults) with every given keyword taking precedence.
    NiT's presets guide Heun's corrector by the step's start, as NiT's sampler does."""
    if preset is not None and preset not in SAMPLE_PRESETS:
        raise ValueError(f"unknown sampling preset {preset!r}; choose one of {', '.join(SAMPLE_PRESETS)}")
    base = SAMPLE_PRESETS[preset].sampler if preset else SamplerConfig()
    config = SamplerConfig(solver=solver or base.solver, steps=base.steps if steps is None else int(steps),
                           cfg_scale=base.cfg_scale if cfg_scale is None else float(cfg_scale),
                           cfg_interval=base.cfg_interval if cfg_interval is None else
                           tuple(float(v) for v in cfg_interval),
                           shift=base.shift if shift is None else float(shift),
                           heun_guidance=heun_guidance or base.heun_guidance)
    if config.solver not in SOLVERS:
        raise ValueError(f"unknown solver {config.solver!r}; choose one of {', '.join(SOLVERS)}")
    if config.steps < 1:
        raise ValueError(f"steps must be >= 1, got {config.steps}")
    if config.heun_guidance not in HEUN_GUIDANCE:
        raise ValueError(f"unknown heun guidance {config.heun_guidance!r}; choose one of {', '.join(HEUN_GUIDANCE)}")
    if config.cfg_scale < 1:
        raise ValueError(f"cfg scale must be >= 1 (1 = no guidance), got {config.cfg_scale}")
    low, high = config.cfg_interval if len(config.cfg_interval) == 2 else (None, None)
    if low is None or not 0 <= low <= high <= 1:
        raise ValueError(f"cfg interval must be two numbers 0 <= low <= high <= 1 (t = 1 is noise), "
                         f"got {config.cfg_interval}")
    return config


def parse_size(text: str) -> tuple[int, int]:
    """'512x768' (height x width) or '512' (square) → (H, W)."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+))?\s*", text)
    if not match:
        raise ValueError(f"size {text!r} is not HxW (e.g. 256x256, 432x768) or a single number")
    height = int(match.group(1))
    return height, int(match.group(2) or height)


@dataclass(frozen=True)
class SampleRequest:
    """What to sample, in the user's terms.

    sizes: (H, W) in pixels; empty means the preset's size.
    classes: "random" (uniform, drawn from each sample's seed), or a list of class ids. A list is
        cycled (label j = classes[j % len]) and, without count or per_class, gives one sample each.
    per_class: N samples of each listed class (all classes when classes is "random"), for FID runs;
        labels interleave (j % K) so that any prefix of the run is as balanced as it can be.
    count: samples per size. seed: the base seed (sample j uses seed + j).
    indices: make only these j (regenerate some samples of a run); the rest of the plan stays.
    """

    sizes: tuple[tuple[int, int], ...] = ()
    count: int | None = None
    classes: str | tuple[int, ...] = RANDOM_CLASSES
    per_class: int | None = None
    seed: int = 0
    indices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class SizeChoice:
    requested: tuple[int, int]  # (H, W) pixels as asked
    used: tuple[int, int]  # (H, W) pixels generated: multiples of the unit
    tokens: tuple[int, int]  # (h, w) in model tokens
    rounded: bool

    @property
    def name(self) -> str:
        return f"{self.used[0]}x{self.used[1]}"


@dataclass(frozen=True)
class SamplePlan:
    sizes: tuple[SizeChoice, ...]
    count: int
    labels: tuple[int, ...]  # label of sample j, the same at every size
    base_seed: int
    indices: tuple[int, ...]  # the j this run makes
    unit: int  # pixels per token side
    class_spec: dict  # how labels were chosen, for the provenance

    def seed(self, j: int) -> int:
        return self.base_seed + j


def class_label(j: int, seed: int, classes: str | tuple[int, ...], num_classes: int) -> int:
    """Label of sample j with seed `seed`: uniform from the seed's own stream for "random", else cycled."""
    if classes == RANDOM_CLASSES:
        stream = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _LABEL_STREAM])))
        return int(stream.integers(num_classes))
    return int(classes[j % len(classes)])


def plan_samples(request: SampleRequest, *, factor: int, patch_size: int, num_classes: int,
                 default_size: tuple[int, int] | None = None) -> SamplePlan:
    """Check a request against the model's geometry and class count, and fix every sample's size,
    label and seed. Raises ValueError naming the bad value and the fix."""
    unit = factor * patch_size
    sizes = tuple(tuple(int(v) for v in size) for size in request.sizes) or (
        (tuple(default_size),) if default_size else ())
    if not sizes:
        raise ValueError("no size to sample at: give one or more sizes (HxW in pixels) or a preset")
    choices = []
    for height, width in sizes:
        if height < unit or width < unit:
            raise ValueError(f"size {height}x{width} is below one unit ({unit} px = encoder factor {factor} × "
                             f"patch {patch_size}); ask for at least {unit}x{unit}")
        used_w, used_h = legal_size(width, height, factor=factor, patch=patch_size)
        choice = SizeChoice((height, width), (used_h, used_w), (used_h // unit, used_w // unit),
                            rounded=(used_h, used_w) != (height, width))
        if choice.used not in [c.used for c in choices]:
            choices.append(choice)

    classes = request.classes
    if classes != RANDOM_CLASSES:
        if isinstance(classes, str):
            raise ValueError(f"classes must be {RANDOM_CLASSES!r} or a list of class ids, got {classes!r}")
        classes = tuple(int(c) for c in classes)
        if not classes:
            raise ValueError("an empty class list; give class ids or use 'random'")
        bad = [c for c in classes if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"class id {bad[0]} is outside 0..{num_classes - 1} (the model has {num_classes} "
                             f"classes); pick ids in that range")
    count = _count(request, classes, num_classes)
    if request.seed < 0:
        raise ValueError(f"seed must be >= 0, got {request.seed}")
    if request.per_class is not None:
        classes = classes if classes != RANDOM_CLASSES else tuple(range(num_classes))
    labels = tuple(class_label(j, request.seed + j, classes, num_classes) for j in range(count))
    indices = tuple(range(count)) if request.indices is None else tuple(sorted(set(request.indices)))
    outside = [j for j in indices if not 0 <= j < count]
    if outside:
        raise ValueError(f"sample index {outside[0]} is outside 0..{count - 1}; raise count or drop the index")
    spec = {"mode": "per-class" if request.per_class is not None else
            ("random" if classes == RANDOM_CLASSES else "list"),
            "classes": classes if classes == RANDOM_CLASSES else list(classes),
            "per_class": request.per_class}
    return SamplePlan(sizes=tuple(choices), count=count, labels=labels, base_seed=int(request.seed),
                      indices=indices, unit=unit, class_spec=spec)


def _count(request: SampleRequest, classes, num_classes: int) -> int:
    if request.per_class is not None:
        if request.per_class < 1:
            raise ValueError(f"per_class must be >= 1, got {request.per_class}")
        per_class = request.per_class * (num_classes if classes == RANDOM_CLASSES else len(classes))
        if request.count is not None and request.count != per_class:
            raise ValueError(f"count {request.count} contradicts per_class {request.per_class} "
                             f"({per_class} samples); give one of them")
        return per_class
    if request.count is None:
        if classes == RANDOM_CLASSES:
            raise ValueError("random classes need a count (samples per size)")
        return len(classes)
    if request.count < 1:
        raise ValueError(f"count must be >= 1, got {request.count}")
    return request.count


def sampling_bytes(tokens: int, *, token_dim: int, hidden: int, mlp_ratio: float, model_bytes: int, unit: int,
                   guided: bool = True) -> int:
    """A rough working set of sampling one image of `tokens` tokens, in bytes (linear in the tokens).

    The float32 start noise, the float64 state with the solver's velocities and temporaries (Heun
    holds two), one forward's widest activations per token (residual, qkv, MLP) in the model's
    dtype, doubled for the guided pack, and the decoded float image. Attention kernels that keep a
    tokens² matrix (CPU math SDPA) need more; this is a floor that refuses the impossible early."""
    noise_and_state = token_dim * (4 + 5 * 8)
    forward = (2 if guided else 1) * hidden * model_bytes * (4 + mlp_ratio)
    decoded = unit * unit * 3 * 4
    return int(tokens * (noise_and_state + forward + decoded))


def check_sampling_memory(size: SizeChoice, *, per_image: int, available: int | None, batch_size: int,
                          where: str) -> int:
    """The batch size this size can run at (<= batch_size); ValueError naming the size and the limit
    when one image is above MAX_TOKENS_PER_IMAGE or does not fit in `available` bytes."""
    tokens = size.tokens[0] * size.tokens[1]
    label = f"size {size.requested[0]}x{size.requested[1]}"
    if tokens > MAX_TOKENS_PER_IMAGE:
        raise ValueError(f"{label} is {size.tokens[0]}x{size.tokens[1]} = {tokens:,} tokens per image, above the "
                         f"limit of {MAX_TOKENS_PER_IMAGE:,} tokens (sampling one would need about "
                         f"{per_image / GIB:,.0f} GiB); choose a smaller --size")
    if available is not None and per_image > available:
        raise ValueError(f"{label} ({tokens:,} tokens per image) needs about {per_image / GIB:,.1f} GiB to sample "
                         f"one image, more than the {available / GIB:,.1f} GiB available on {where}; choose a "
                         "smaller --size")
    if available is None:
        return batch_size
    return max(1, min(batch_size, available // max(1, per_image)))
