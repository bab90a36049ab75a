import math
from dataclasses import asdict

import pytest
import torch

from nrtrain.packed import check_cu_seqlens, packed_from_tokens
from nrtrain.transport import (NIT_PRESETS, ImageNoise, double_for_cfg, noise_for, noise_pack, sample, shift_t,
                               time_grid)
from nrtrain.transport.solvers import euler, heun

NULL = 5


class PerImageModel:
    """v = a x + b t + c[y]: each image's velocity depends only on its own tokens, time and label.
    Records (number of images, labels, x dtype, t dtype) of every call."""

    def __init__(self, a=-0.5, b=0.3, label_shift=None):
        self.a, self.b = a, b
        self.label_shift = torch.linspace(-1, 1, NULL + 1) if label_shift is None else label_shift
        self.calls = []

    def __call__(self, x, t, y, batch):
        self.calls.append((batch.num_images, y.clone(), x.dtype, t.dtype))
        assert batch.tokens is x and x.shape[0] == batch.num_tokens
        per_image = self.b * t.float() + self.label_shift.to(x.device)[y]
        return self.a * x + per_image[batch.image_ids][:, None].to(x.dtype)


class GaussianDataModel:
    """The exact velocity field when every data channel is N(mean, std²): v = E[noise - x | x_t]."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, x, t, y, batch):
        t = t.double()[batch.image_ids][:, None]
        x = x.double()
        var_t = (1 - t) ** 2 * self.std ** 2 + t ** 2
        centred = x - (1 - t) * self.mean
        expected_noise = t / var_t * centred
        expected_x = self.mean + (1 - t) * self.std ** 2 / var_t * centred
        return (expected_noise - expected_x).float()


class ZeroNoise:
    def __init__(self, shape):
        self.shape = shape

    def draw(self):
        return torch.zeros(self.shape)


SIZES = [(2, 3), (1, 4), (3, 3)]


def noise_batch(sizes=SIZES, dim=4, seeds=(11, 12, 13), labels=(1, 2, 3)):
    return noise_pack(sizes, dim, list(seeds), list(labels))


# ---------------------------------------------------------------- grids and ODE solvers

def test_time_grids():
    ode = time_grid("euler", 4)
    assert ode.dtype == torch.float64 and ode.tolist() == [1.0, 0.75, 0.5, 0.25, 0.0]
    sde = time_grid("euler-maruyama", 5)
    assert len(sde) == 6 and sde[0] == 1.0 and sde[-1] == 0.0 and float(sde[-2]) == pytest.approx(0.04)
    shifted = time_grid("heun", 4, shift=3.0)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0 and torch.allclose(shifted, shift_t(ode, 3.0))
    assert bool((shifted[1:-1] > ode[1:-1]).all())
    with pytest.raises(ValueError, match="euler, heun, euler-maruyama"):
        time_grid("rk4", 4)
    with pytest.raises(ValueError, match=">= 1"):
        time_grid("euler", 0)


def test_one_euler_step_by_hand():
    batch = noise_batch()
    model = PerImageModel()
    result = sample(model, batch, batch.labels, null_class=NULL, steps=1)
    per_image = model.b * 1.0 + model.label_shift[batch.labels]
    velocity = model.a * batch.tokens + per_image[batch.image_ids][:, None]
    assert torch.allclose(result.tokens, batch.tokens - velocity, atol=1e-6)
    assert result.nfe == 1 and result.guided_nfe == 0 and result.tokens.dtype == torch.float32
    assert result.grid.tolist() == [1.0, 0.0]


def test_heun_beats_euler_and_converges_at_second_order():
    lam = 1.3
    x1 = torch.tensor([1.0, -2.0], dtype=torch.float64)
    exact = x1 * math.exp(-lam)  # dx/dt = lam x, integrated from t = 1 down to 0

    def error(solver, steps):
        return float((solver(lambda x, t: lam * x, x1, time_grid("euler", steps).tolist()) - exact).abs().max())

    assert error(heun, 8) < error(euler, 8) / 5
    assert error(heun, 16) / error(heun, 32) > 3.5  # second order: halving h quarters the error
    assert error(euler, 16) / error(euler, 32) < 2.5


def test_heun_evaluation_count():
    batch = noise_batch()
    result = sample(PerImageModel(), batch, batch.labels, null_class=NULL, solver="heun", steps=6)
    assert result.nfe == 2 * 6 - 1


# ---------------------------------------------------------------- Euler–Maruyama

def test_euler_maruyama_without_noise_is_the_drift_update_on_nits_grid():
    batch = noise_batch()
    model = PerImageModel()
    steps = 7
    result = sample(model, batch, batch.labels, null_class=NULL, solver="euler-maruyama", steps=steps,
                    generator=ZeroNoise(batch.tokens.shape))
    x = batch.tokens.double()
    grid = [1.0 - k * (1.0 - 0.04) / (steps - 1) for k in range(steps)] + [0.0]
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        v = model(x, torch.full((3,), t_cur, dtype=torch.float64), batch.labels, batch.with_tokens(x))
        # drift = v - ½ (2t) score with score = -(x + (1-t) v) / t, i.e. (2 - t) v + x
        x = x + (t_next - t_cur) * ((2 - t_cur) * v + x)
    assert torch.allclose(result.tokens.double(), x, atol=1e-5)
    assert result.nfe == steps


@pytest.mark.parametrize("solver, steps", [("euler", 60), ("heun", 20), ("euler-maruyama", 120)])
def test_solvers_carry_noise_to_the_data_distribution(solver, steps):
    sizes, mean, std = [(40, 50), (40, 50)], 1.5, 0.5
    batch = noise_pack(sizes, 2, [1, 2], [0, 0])
    result = sample(GaussianDataModel(mean, std), batch, batch.labels, null_class=NULL, solver=solver, steps=steps,
                    generator=ImageNoise(sizes, 2, [1, 2], stream="sde"))
    assert abs(float(result.tokens.mean()) - mean) < 0.03
    assert abs(float(result.tokens.std()) - std) < 0.03


def test_euler_maruyama_needs_a_matching_noise_source():
    batch = noise_batch()
    with pytest.raises(ValueError, match="needs a generator"):
        sample(PerImageModel(), batch, batch.labels, null_class=NULL, solver="euler-maruyama", steps=3)
    with pytest.raises(ValueError, match="same sizes and channels"):
        sample(PerImageModel(), batch, batch.labels, null_class=NULL, solver="euler-maruyama", steps=3,
               generator=ImageNoise(SIZES[:2], 4, [1, 2], stream="sde"))


# ---------------------------------------------------------------- classifier-free guidance

def test_double_for_cfg_geometry():
    batch = packed_from_tokens([torch.randn(6, 2), torch.randn(4, 2)], [(2, 3), (1, 4)], [7, 8], row_ids=[20, 21])
    doubled = double_for_cfg(batch, NULL)
    check_cu_seqlens(doubled.cu_seqlens, doubled.num_tokens)
    assert doubled.cu_seqlens.tolist() == [0, 6, 10, 16, 20]
    assert doubled.sizes.tolist() == [[2, 3], [1, 4]] * 2 and doubled.max_seqlen == 6
    assert doubled.image_ids.tolist() == [0] * 6 + [1] * 4 + [2] * 6 + [3] * 4
    assert doubled.labels.tolist() == [7, 8, NULL, NULL] and doubled.row_ids.tolist() == [20, 21, 20, 21]
    assert torch.equal(doubled.positions, torch.cat([batch.positions, batch.positions]))
    assert torch.equal(doubled.tokens, torch.cat([batch.tokens, batch.tokens]))


def test_cfg_runs_the_doubled_pack_only_inside_the_interval():
    batch = noise_batch()
    model = PerImageModel()
    # grid 1.0, 0.9, ..., 0.1 evaluated: t <= 0.55 are 0.5 .. 0.1, five guided calls
    result = sample(model, batch, batch.labels, null_class=NULL, steps=10, cfg_scale=2.0, cfg_interval=(0.0, 0.55))
    images_per_call = [n for n, *_ in model.calls]
    assert images_per_call == [3] * 5 + [6] * 5
    assert result.nfe == 10 and result.guided_nfe == 5
    assert model.calls[-1][1].tolist() == [1, 2, 3, NULL, NULL, NULL]
    assert model.calls[0][1].tolist() == [1, 2, 3]
    unguided = PerImageModel()
    sample(unguided, batch, batch.labels, null_class=NULL, steps=10, cfg_scale=1.0)
    assert [n for n, *_ in unguided.calls] == [3] * 10


def test_cfg_combines_conditional_and_unconditional_velocities():
    batch = noise_batch()
    model = PerImageModel(a=0.0, b=0.0)  # v = c[y] only
    scale = 3.0
    result = sample(model, batch, batch.labels, null_class=NULL, steps=1, cfg_scale=scale)
    c = model.label_shift
    guided = c[NULL] + scale * (c[batch.labels] - c[NULL])
    assert torch.allclose(result.tokens, batch.tokens - guided[batch.image_ids][:, None], atol=1e-6)
    outside = sample(PerImageModel(a=0.0, b=0.0), batch, batch.labels, null_class=NULL, steps=1, cfg_scale=scale,
                     cfg_interval=(0.0, 0.7))  # the single evaluation is at t = 1, outside
    assert torch.allclose(outside.tokens, batch.tokens - c[batch.labels][batch.image_ids][:, None], atol=1e-6)


def test_cfg_arguments_are_checked():
    batch = noise_batch()
    with pytest.raises(ValueError, match="cfg_scale must be >= 1"):
        sample(PerImageModel(), batch, batch.labels, null_class=NULL, cfg_scale=0.5)
    with pytest.raises(ValueError, match="low <= high"):
        sample(PerImageModel(), batch, batch.labels, null_class=NULL, cfg_scale=2.0, cfg_interval=(0.8, 0.2))
    with pytest.raises(ValueError, match=r"labels must be \[B=3\]"):
        sample(PerImageModel(), batch, batch.labels[:2], null_class=NULL)


# ---------------------------------------------------------------- dtypes, noise and reproducibility

def test_model_gets_its_own_dtype_and_integration_stays_wide():
    class Bf16Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(-0.5, dtype=torch.bfloat16))
            self.seen = []

        def forward(self, x, t, y, batch):
            self.seen.append((x.dtype, t.dtype))
            return self.scale * x

    batch = noise_batch()
    model = Bf16Model()
    result = sample(model, batch, batch.labels, null_class=NULL, steps=4, cfg_scale=1.5)
    assert set(model.seen) == {(torch.bfloat16, torch.float32)}  # t stays float32 (see GuidedField)
    assert result.tokens.dtype == torch.float32 and bool(torch.isfinite(result.tokens).all())
    # four Euler steps of dt = -1/4 on v = -x/2 multiply x by (1 + 1/8) each; labels do not matter here
    assert torch.allclose(result.tokens, batch.tokens * 1.125 ** 4, rtol=2e-2, atol=1e-2)


def test_noise_for_is_per_image():
    together = noise_for(SIZES, 4, [11, 12, 13])
    assert together.shape == (6 + 4 + 9, 4) and together.dtype == torch.float32
    assert torch.equal(noise_for([SIZES[1]], 4, [12]), together[6:10])
    assert not torch.equal(noise_for([SIZES[1]], 4, [14]), together[6:10])
    start = ImageNoise([SIZES[1]], 4, [12]).draw()
    sde = ImageNoise([SIZES[1]], 4, [12], stream="sde").draw()
    assert torch.equal(start, together[6:10]) and not torch.equal(start, sde)
    with pytest.raises(ValueError, match="one seed per image"):
        noise_for(SIZES, 4, [1, 2])
    with pytest.raises(ValueError, match="non-negative"):
        noise_for(SIZES[:1], 4, [-1])


@pytest.mark.parametrize("solver", ["euler", "euler-maruyama"])
def test_same_seeds_same_samples(solver):
    def run(seeds):
        batch = noise_batch(seeds=seeds)
        return sample(PerImageModel(), batch, batch.labels, null_class=NULL, solver=solver, steps=8, cfg_scale=2.0,
                      cfg_interval=(0.0, 0.7), generator=ImageNoise(SIZES, 4, seeds, stream="sde")).tokens

    assert torch.equal(run([11, 12, 13]), run([11, 12, 13]))
    assert not torch.equal(run([11, 12, 13]), run([11, 12, 14]))


def test_torch_generator_drives_the_sde_reproducibly():
    batch = noise_batch()

    def run(seed):
        return sample(PerImageModel(), batch, batch.labels, null_class=NULL, solver="euler-maruyama", steps=5,
                      generator=torch.Generator().manual_seed(seed)).tokens

    assert torch.equal(run(3), run(3)) and not torch.equal(run(3), run(4))


@pytest.mark.parametrize("solver", ["heun", "euler-maruyama"])
def test_one_image_alone_equals_the_same_image_in_a_batch(solver):
    seeds, labels = [11, 12, 13], [1, 2, 3]
    options = dict(null_class=NULL, solver=solver, steps=10, cfg_scale=2.5, cfg_interval=(0.0, 0.7), shift=2.0)
    batch = noise_pack(SIZES, 4, seeds, labels)
    together = sample(PerImageModel(), batch, batch.labels,
                      generator=ImageNoise(SIZES, 4, seeds, stream="sde"), **options).tokens
    alone_batch = noise_pack(SIZES[1:2], 4, seeds[1:2], labels[1:2])
    alone = sample(PerImageModel(), alone_batch, alone_batch.labels,
                   generator=ImageNoise(SIZES[1:2], 4, seeds[1:2], stream="sde"), **options).tokens
    assert torch.allclose(alone, together[6:10], atol=1e-6, rtol=0)


def test_nit_presets_run_through_sample():
    batch = noise_batch()
    for name, preset in NIT_PRESETS.items():
        model = PerImageModel()
        result = sample(model, batch, batch.labels, null_class=NULL,
                        generator=ImageNoise(SIZES, 4, [1, 2, 3], stream="sde"), **asdict(preset))
        assert result.nfe == preset.steps, name
        low, high = preset.cfg_interval
        assert result.guided_nfe == sum(low <= t <= high for t in result.grid[:-1].tolist()), name


def test_heun_guidance_rules_differ_only_on_steps_crossing_the_interval_edge():
    """NiT guides the corrector by the step's start; nr by default by the corrector's own time."""
    def field(x, t, guide_at=None):  # guided velocity 2, unguided 1: the update counts guided evaluations
        decided = t if guide_at is None else guide_at
        return torch.full_like(x, 2.0 if decided <= 0.6 else 1.0)

    x = torch.zeros(1, 1, dtype=torch.float64)
    grid = [1.0, 0.8, 0.6, 0.4, 0.0]  # step 0.8 -> 0.6 crosses into the interval [0, 0.6]
    # by hand: per step x += dt * (v_cur + v_next) / 2, the last step Euler
    ours = -0.2 * (1 + 1) / 2 - 0.2 * (1 + 2) / 2 - 0.2 * (2 + 2) / 2 - 0.4 * 2
    nits = -0.2 * (1 + 1) / 2 - 0.2 * (1 + 1) / 2 - 0.2 * (2 + 2) / 2 - 0.4 * 2
    assert heun(field, x, grid).item() == pytest.approx(ours)
    assert heun(field, x, grid, "step-start").item() == pytest.approx(nits)
    with pytest.raises(ValueError, match="unknown heun guidance"):
        heun(field, x, grid, "start")

    # through sample and GuidedField: steps 1, .75, .5, .25, 0 with the interval [0, 0.7]
    batch = noise_batch()
    counts = {}
    for rule in ("corrector", "step-start"):
        result = sample(PerImageModel(), batch, batch.labels, null_class=NULL, solver="heun", steps=4, cfg_scale=2.0,
                        cfg_interval=(0.0, 0.7), heun_guidance=rule)
        counts[rule] = result.guided_nfe
    # predictors at .5 and .25 are guided under both; correctors at .5 (step from .75) and .25 only under ours
    assert counts == {"corrector": 4, "step-start": 3}
