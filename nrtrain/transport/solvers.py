"""Samplers: integrate the learned velocity field from noise (t = 1) to data (t = 0).

The solvers (`euler`, `heun`, `euler_maruyama`) take any field f(x, t) -> v and a time grid; they
know nothing of models, packs or guidance. `sample` ties them to a model through `GuidedField`.

Precision: the state is integrated in float64 by default (NiT's choice: over 250 small steps the
float32 rounding of x + dt v is visible); each model call gets x cast to the model's dtype and t in
float32 (in bf16, t near 1 would round to steps of 1/256), and its output is cast back before the update. Pass `dtype=torch.float32` where float64 is slow.

Noise is drawn per image (`ImageNoise`), each image from its own seeded stream on the CPU, so
image i's noise, and therefore its sample, is the same alone or in any batch and on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from nrtrain.packed import PackedBatch, packed_from_tokens
from nrtrain.transport.cfg import GuidedField
from nrtrain.transport.path import score_from_velocity, shift_t

SOLVERS = ("euler", "heun", "euler-maruyama")
# which time decides whether Heun's corrector evaluation is guided (see `heun`)
HEUN_GUIDANCE = ("corrector", "step-start")
SDE_LAST_T = 0.04  # NiT's SDE grid stops at 0.04 and takes one deterministic step to 0
_STREAMS = {"start": 0, "sde": 1}

Field = Callable[[torch.Tensor, float], torch.Tensor]


class NoiseSource(Protocol):
    def draw(self) -> torch.Tensor: ...


class ImageNoise:
    """One random stream per image: `draw()` returns the next [T, channels] float32 CPU noise.

    Image i's stream is numpy PCG64 seeded by SeedSequence([seeds[i], stream]): any non-negative
    seed, independent streams for the start noise ("start") and the SDE's step noise ("sde"), and
    the same numbers on every machine. `channels` is the token width (latent channels × patch²).
    """

    def __init__(self, sizes: Sequence[Sequence[int]] | torch.Tensor, channels: int, seeds: Sequence[int], *,
                 stream: str = "start"):
        if stream not in _STREAMS:
            raise ValueError(f"unknown noise stream {stream!r}; choose one of {', '.join(_STREAMS)}")
        sizes = torch.as_tensor(sizes, dtype=torch.int64).reshape(-1, 2).tolist()
        seeds = [int(seed) for seed in seeds]
        if len(seeds) != len(sizes):
            raise ValueError(f"{len(seeds)} seeds for {len(sizes)} images; give one seed per image")
        if any(seed < 0 for seed in seeds):
            raise ValueError(f"seeds must be non-negative, got {min(seeds)}")
        self.lengths = [h * w for h, w in sizes]
        self.channels = channels
        self.generators = [np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, _STREAMS[stream]])))
                           for seed in seeds]

    def draw(self) -> torch.Tensor:
        return torch.cat([torch.from_numpy(generator.standard_normal((length, self.channels), dtype=np.float32))
                          for generator, length in zip(self.generators, self.lengths)])


def noise_for(sizes: Sequence[Sequence[int]] | torch.Tensor, channels: int, seeds: Sequence[int]) -> torch.Tensor:
    """The start noise [T, channels] (float32, CPU) of images of `sizes` (h, w in tokens), one seed each."""
    return ImageNoise(sizes, channels, seeds, stream="start").draw()


def noise_pack(sizes: Sequence[Sequence[int]], channels: int, seeds: Sequence[int],
               labels: Sequence[int] | torch.Tensor) -> PackedBatch:
    """A PackedBatch (CPU) whose tokens are `noise_for(sizes, channels, seeds)`: what `sample` starts from."""
    sizes = [tuple(size) for size in torch.as_tensor(sizes, dtype=torch.int64).reshape(-1, 2).tolist()]
    tokens = noise_for(sizes, channels, seeds)
    return packed_from_tokens(list(tokens.split([h * w for h, w in sizes])), sizes, labels)


def time_grid(solver: str, steps: int, shift: float | None = None) -> torch.Tensor:
    """The float64 grid from 1 (noise) to 0 (data), `steps` intervals, shifted by `shift_t` if asked.

    ODE solvers: linspace(1, 0, steps + 1). Euler–Maruyama (NiT): linspace(1, 0.04, steps) then 0.
    The shift maps every point, so 1 and 0 stay the ends.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {', '.join(SOLVERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if solver == "euler-maruyama":
        grid = torch.cat([torch.linspace(1.0, SDE_LAST_T, steps, dtype=torch.float64),
                          torch.zeros(1, dtype=torch.float64)])
    else:
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_t(grid, shift)


def euler(field: Field, x: torch.Tensor, grid: Sequence[float]) -> torch.Tensor:
    """Euler ODE: x += (t_next - t) v(x, t). One evaluation per interval."""
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = x + (t_next - t_cur) * field(x, t_cur)
    return x


def heun(field: Field, x: torch.Tensor, grid: Sequence[float], guidance: str = "corrector") -> torch.Tensor:
    """Heun (trapezoidal predictor–corrector); the last interval is a plain Euler step, as in NiT/EDM,
    which avoids evaluating the model at t = 0. 2 · intervals - 1 evaluations.

    `guidance` says which time decides whether the corrector's evaluation (at t_next) is guided:
    "corrector" (nr's default) asks the CFG interval about t_next itself; "step-start" (NiT's
    sampler) asks about the step's start t_cur, so predictor and corrector of one step are guided
    alike. They differ only on steps that cross an edge of the interval, whose corrector one rule
    guides and the other does not. The field must take `guide_at` for "step-start" (`GuidedField`
    does)."""
    if guidance not in HEUN_GUIDANCE:
        raise ValueError(f"unknown heun guidance {guidance!r}; choose one of {', '.join(HEUN_GUIDANCE)}")
    last = len(grid) - 2
    for step, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t_cur
        v_cur = field(x, t_cur)
        predicted = x + dt * v_cur
        if step == last:
            x = predicted
            continue
        v_next = field(predicted, t_next) if guidance == "corrector" else field(predicted, t_next, guide_at=t_cur)
        x = x + dt * 0.5 * (v_cur + v_next)
    return x


def euler_maruyama(field: Field, x: torch.Tensor, grid: Sequence[float],
                   noise: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Euler–Maruyama on the reverse SDE with diffusion g² = 2t (NiT/REPA), last interval deterministic.

    drift = v - ½ g² score, with the score from v (`score_from_velocity`); each step but the last adds
    sqrt(2t) sqrt(|dt|) ε with ε = noise(). The last step (to t = 0) takes the drift alone.
    """
    last = len(grid) - 2
    for step, (t_cur, t_next) in enumerate(zip(grid[:-1], grid[1:])):
        dt = t_next - t_cur
        v = field(x, t_cur)
        drift = v - t_cur * score_from_velocity(x, v, t_cur)
        x = x + dt * drift
        if step != last:
            x = x + (2 * t_cur * abs(dt)) ** 0.5 * noise().to(x)
    return x


@dataclass(frozen=True)
class SamplerConfig:
    """Everything that decides a sample set besides the weights, seeds and labels; field names match
    `sample`'s keywords, so `sample(..., **dataclasses.asdict(config))` works and the same dict is the
    provenance to store next to the images."""
    solver: str = "euler"
    steps: int = 50
    cfg_scale: float = 1.0
    cfg_interval: tuple[float, float] = (0.0, 1.0)
    shift: float | None = None
    heun_guidance: str = "corrector"  # heun only: which time decides the corrector's guidance (`heun`)


# NiT-XL (1000K steps) README settings, named after the table rows they reproduce. None uses Heun;
# should a user switch one to it, NiT's sampler guides the corrector by the step's start.
NIT_PRESETS = {
    "nit-256": SamplerConfig("euler-maruyama", 250, 2.25, (0.0, 0.7), heun_guidance="step-start"),
    "nit-512": SamplerConfig("euler-maruyama", 250, 2.05, (0.0, 0.7), heun_guidance="step-start"),
    "nit-768": SamplerConfig("euler", 50, 3.0, (0.0, 0.7), heun_guidance="step-start"),
    "nit-1024": SamplerConfig("euler", 50, 3.0, (0.0, 0.8), heun_guidance="step-start"),
}


@dataclass
class SampleResult:
    tokens: torch.Tensor  # [T, D] float32: the samples at t = 0, in the noise pack's geometry
    nfe: int  # velocity-field evaluations (the NFE papers report)
    guided_nfe: int  # how many of them ran the doubled (CFG) pack; pack-sized forwards = nfe + guided_nfe
    grid: torch.Tensor  # the float64 time grid used


@torch.no_grad()
def sample(model, noise_batch: PackedBatch, labels: torch.Tensor, *, null_class: int, solver: str = "euler",
           steps: int = 50, cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
           shift: float | None = None, heun_guidance: str = "corrector",
           generator: torch.Generator | NoiseSource | None = None, dtype: torch.dtype = torch.float64,
           model_dtype: torch.dtype | None = None) -> SampleResult:
    """Integrate from `noise_batch.tokens` (t = 1) to t = 0 with the model's velocity.

    `generator` feeds the SDE's step noise (ignored by the ODE solvers): an `ImageNoise(...,
    stream="sde")` keeps every image reproducible on its own; a torch.Generator draws for the whole
    pack. `model_dtype` defaults to the dtype of the model's first floating parameter (float32 for a
    plain function).
    `heun_guidance`: which time decides the guidance of Heun's corrector (see `heun`).
    """
    grid = time_grid(solver, steps, shift)
    field = GuidedField(model, noise_batch, labels, cfg_scale=cfg_scale, cfg_interval=cfg_interval,
                        null_class=null_class, model_dtype=model_dtype or _parameter_dtype(model))
    x = noise_batch.tokens.to(dtype)
    points = grid.tolist()
    if solver == "euler":
        x = euler(field, x, points)
    elif solver == "heun":
        x = heun(field, x, points, heun_guidance)
    else:
        x = euler_maruyama(field, x, points, _step_noise(generator, x))
    return SampleResult(tokens=x.float(), nfe=field.nfe, guided_nfe=field.guided_nfe, grid=grid)


def _step_noise(generator: torch.Generator | NoiseSource | None, like: torch.Tensor) -> Callable[[], torch.Tensor]:
    if generator is None:
        raise ValueError("the euler-maruyama solver needs a generator for its step noise: pass "
                         "generator=ImageNoise(sizes, channels, seeds, stream='sde') or a torch.Generator")
    if isinstance(generator, torch.Generator):
        return lambda: torch.randn(like.shape, generator=generator, device=generator.device)

    def draw() -> torch.Tensor:
        noise = generator.draw()
        if noise.shape != like.shape:
            raise ValueError(f"the SDE noise source drew {tuple(noise.shape)} for a pack of {tuple(like.shape)}; "
                             f"build it with the same sizes and channels as the noise pack")
        return noise
    return draw


def _parameter_dtype(model) -> torch.dtype:
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            if parameter.is_floating_point():
                return parameter.dtype
    return torch.float32
