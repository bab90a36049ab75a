import math

import pytest
import torch

from nrtrain.packed import packed_from_tokens
from nrtrain.transport import (FlowMatchingLoss, interpolate, reduction_weights, sample_t, score_from_velocity,
                               shift_t, velocity_target)
from nrtrain.transport.path import per_token

NULL = 10


def make_pack(sizes, dim=4, seed=0, labels=None):
    g = torch.Generator().manual_seed(seed)
    tokens = [torch.randn(h * w, dim, generator=g) for h, w in sizes]
    labels = list(range(len(sizes))) if labels is None else labels
    return packed_from_tokens(tokens, sizes, labels)


class Oracle:
    """Knows the clean tokens, so it can return scale * (true v) + a per-image offset, and REPA features
    equal to sign[image] * the targets."""

    def __init__(self, clean, offsets=None, scale=1.0, repa_signs=None, repa_targets=None):
        self.clean, self.offsets, self.scale = clean, offsets, scale
        self.repa_signs, self.repa_targets = repa_signs, repa_targets
        self.calls = []

    def __call__(self, x, t, y, batch, return_repa=False):
        self.calls.append((x, t, y, batch))
        v = (x - self.clean) / t[batch.image_ids][:, None]
        v = self.scale * v
        if self.offsets is not None:
            v = v + torch.tensor(self.offsets)[batch.image_ids][:, None]
        if not return_repa:
            return v
        return v, self.repa_targets * torch.tensor(self.repa_signs)[batch.image_ids][:, None]


# ---------------------------------------------------------------- path

def test_path_ends_and_velocity_is_the_time_derivative():
    x, noise = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    assert torch.equal(interpolate(x, noise, 0.0), x)
    assert torch.equal(interpolate(x, noise, 1.0), noise)
    h = 1e-6
    derivative = (interpolate(x, noise, 0.3 + h) - interpolate(x, noise, 0.3 - h)) / (2 * h)
    assert torch.allclose(derivative, velocity_target(x, noise), atol=1e-8)


def test_per_token_gives_each_token_its_images_t():
    batch = make_pack([(1, 2), (2, 2)])
    column = per_token(torch.tensor([0.25, 0.75]), batch.image_ids)
    assert column.shape == (6, 1)
    assert column.squeeze(1).tolist() == [0.25] * 2 + [0.75] * 4
    x_t = interpolate(batch.tokens, torch.zeros_like(batch.tokens), column)
    assert torch.allclose(x_t[:2], 0.75 * batch.tokens[:2]) and torch.allclose(x_t[2:], 0.25 * batch.tokens[2:])


def test_score_from_velocity_matches_the_gaussian_score():
    # data ~ N(0, s²) per channel: x_t ~ N(0, (1-t)² s² + t²), and the exact v is E[noise - x | x_t].
    s, t = 0.7, 0.35
    x_t = torch.randn(50, 2, dtype=torch.float64)
    var_t = (1 - t) ** 2 * s ** 2 + t ** 2
    v = (t - (1 - t) * s ** 2) / var_t * x_t
    assert torch.allclose(score_from_velocity(x_t, v, t), -x_t / var_t)


def test_logit_normal_t_statistics_and_determinism():
    t = sample_t(20000, torch.Generator().manual_seed(1))
    assert t.shape == (20000,) and bool(((t > 0) & (t < 1)).all())
    assert abs(float(t.median()) - 0.5) < 0.02
    logits = torch.log(t / (1 - t))
    assert abs(float(logits.mean())) < 0.03 and abs(float(logits.std()) - 1) < 0.03
    shifted = sample_t(20000, torch.Generator().manual_seed(1), mean=1.0, std=0.5)
    assert abs(float(shifted.median()) - 1 / (1 + math.exp(-1))) < 0.02
    assert torch.equal(t, sample_t(20000, torch.Generator().manual_seed(1)))
    assert not torch.equal(t, sample_t(20000, torch.Generator().manual_seed(2)))


def test_uniform_t_and_unknown_kind():
    t = sample_t(20000, torch.Generator().manual_seed(3), kind="uniform")
    assert bool(((t >= 0) & (t < 1)).all()) and abs(float(t.mean()) - 0.5) < 0.01
    with pytest.raises(ValueError, match="logit-normal, uniform"):
        sample_t(4, torch.Generator(), kind="beta")


def test_shift_keeps_ends_is_monotone_and_one_is_identity():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.3, 2.0, 3.0):
        shifted = shift_t(t, s)
        assert float(shifted[0]) == 0.0 and float(shifted[-1]) == 1.0
        assert bool((shifted[1:] > shifted[:-1]).all())
    assert torch.equal(shift_t(t, 1.0), t) and shift_t(t, None) is t
    assert bool((shift_t(t, 3.0)[1:-1] > t[1:-1]).all())  # s > 1 moves towards noise (t = 1)
    assert float(shift_t(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="> 0"):
        shift_t(t, 0.0)


def test_shift_matches_lightningdit_in_its_own_convention():
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    u = 1 - t  # LightningDiT's time: 0 = noise
    theirs = 0.3 * u / (1 + (0.3 - 1) * u)
    assert torch.allclose(1 - shift_t(t, 1 / 0.3), theirs)


# ---------------------------------------------------------------- loss

def test_image_and_token_reductions_differ_as_computed_by_hand():
    batch = make_pack([(1, 1), (1, 3)])
    model = Oracle(batch.tokens, offsets=[1.0, 3.0])  # per-token squared error: 1 for image 0, 9 for image 1
    by_image = FlowMatchingLoss(null_class=NULL, class_dropout_prob=0.0)(model, batch, torch.Generator().manual_seed(0))
    by_token = FlowMatchingLoss(null_class=NULL, reduction="token", class_dropout_prob=0.0)(
        model, batch, torch.Generator().manual_seed(0))
    assert float(by_image.loss) == pytest.approx((1 + 9) / 2, rel=1e-4)
    assert float(by_token.loss) == pytest.approx((1 + 3 * 9) / 4, rel=1e-4)
    assert torch.allclose(by_image.per_image, torch.tensor([1.0, 9.0]), rtol=1e-4)
    assert by_image.direction is None and by_image.repa is None
    assert set(by_image.scalars()) == {"loss", "mse"}


def test_reduction_weights_sum_to_one_and_weigh_images_equally():
    batch = make_pack([(2, 3), (1, 1), (2, 2)])
    weights = reduction_weights(batch, "image")
    assert float(weights.sum()) == pytest.approx(1.0)
    per_image = torch.zeros(3).index_add_(0, batch.image_ids, weights)
    assert torch.allclose(per_image, torch.full((3,), 1 / 3))
    assert torch.allclose(reduction_weights(batch, "token"), torch.full((11,), 1 / 11))
    with pytest.raises(ValueError, match="image, token"):
        reduction_weights(batch, "pixel")


def test_direction_loss_is_zero_for_the_target_and_two_for_its_opposite():
    batch = make_pack([(2, 2), (1, 3)], dim=8)
    loss = FlowMatchingLoss(null_class=NULL, class_dropout_prob=0.0, direction_loss=True, direction_weight=0.5)
    exact = loss(Oracle(batch.tokens), batch, torch.Generator().manual_seed(0))
    assert float(exact.direction) == pytest.approx(0.0, abs=1e-5) and float(exact.mse) == pytest.approx(0.0, abs=1e-6)
    longer = loss(Oracle(batch.tokens, scale=2.0), batch, torch.Generator().manual_seed(0))
    assert float(longer.direction) == pytest.approx(0.0, abs=1e-5) and float(longer.mse) > 0.1
    opposite = loss(Oracle(batch.tokens, scale=-1.0), batch, torch.Generator().manual_seed(0))
    assert float(opposite.direction) == pytest.approx(2.0, abs=1e-5)
    assert float(opposite.loss) == pytest.approx(float(opposite.mse) + 0.5 * 2.0, rel=1e-5)


def test_repa_term_aligns_per_token_and_follows_the_reduction():
    batch = make_pack([(1, 1), (1, 3)])
    targets = torch.randn(4, 6, generator=torch.Generator().manual_seed(5))
    model = Oracle(batch.tokens, repa_signs=[1.0, -1.0], repa_targets=targets)  # image 0 aligned, image 1 opposite
    by_image = FlowMatchingLoss(null_class=NULL, class_dropout_prob=0.0, repa_weight=0.5)(
        model, batch, torch.Generator().manual_seed(0), repa_targets=targets)
    by_token = FlowMatchingLoss(null_class=NULL, reduction="token", class_dropout_prob=0.0, repa_weight=0.5)(
        model, batch, torch.Generator().manual_seed(0), repa_targets=targets)
    assert float(by_image.repa) == pytest.approx((0 + 2) / 2, abs=1e-5)
    assert float(by_token.repa) == pytest.approx((0 + 3 * 2) / 4, abs=1e-5)
    assert float(by_image.loss) == pytest.approx(float(by_image.mse) + 0.5 * 1.0, abs=1e-5)
    assert torch.allclose(by_image.per_image, torch.tensor([0.0, 1.0]), atol=1e-5)


def test_repa_configuration_errors_name_the_fix():
    batch = make_pack([(1, 2)])
    model = Oracle(batch.tokens)
    with pytest.raises(ValueError, match="no repa_targets"):
        FlowMatchingLoss(null_class=NULL, repa_weight=1.0)(model, batch, torch.Generator())
    with pytest.raises(ValueError, match="repa_weight is 0"):
        FlowMatchingLoss(null_class=NULL)(model, batch, torch.Generator(), repa_targets=torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"\[T=2, repa_dim\]"):
        FlowMatchingLoss(null_class=NULL, repa_weight=1.0)(model, batch, torch.Generator(),
                                                           repa_targets=torch.zeros(3, 3))


def test_label_dropout_rate_and_determinism():
    batch = make_pack([(1, 1)] * 4000, dim=2, labels=[3] * 4000)
    loss = FlowMatchingLoss(null_class=NULL, class_dropout_prob=0.1)
    model = Oracle(batch.tokens)
    first = loss(model, batch, torch.Generator().manual_seed(7))
    seen = model.calls[-1][2]
    assert abs(float(first.dropped.float().mean()) - 0.1) < 0.03
    assert torch.equal(seen, torch.where(first.dropped, torch.tensor(NULL), torch.tensor(3)))
    assert torch.equal(model.calls[-1][3].labels, seen)
    again = loss(model, batch, torch.Generator().manual_seed(7))
    other = loss(model, batch, torch.Generator().manual_seed(8))
    assert torch.equal(first.dropped, again.dropped) and torch.equal(first.t, again.t)
    assert torch.equal(first.loss, again.loss)
    assert not torch.equal(first.dropped, other.dropped)
    never = FlowMatchingLoss(null_class=NULL, class_dropout_prob=0.0)(model, batch, torch.Generator())
    assert not bool(never.dropped.any())


def test_model_sees_the_noisy_tokens_on_the_path_and_gets_gradients():
    batch = make_pack([(2, 3), (1, 2)], dim=4)
    net = torch.nn.Linear(4, 4)
    seen = {}

    def model(x, t, y, packed):
        seen.update(x=x, t=t, packed=packed)
        return net(x) + t[packed.image_ids][:, None]

    terms = FlowMatchingLoss(null_class=NULL, class_dropout_prob=0.0, direction_loss=True)(
        model, batch, torch.Generator().manual_seed(0))
    terms.loss.backward()
    assert net.weight.grad is not None and float(net.weight.grad.abs().sum()) > 0
    assert seen["packed"].tokens is seen["x"] and not torch.equal(seen["x"], batch.tokens)
    assert torch.equal(seen["t"], terms.t) and terms.t.shape == (2,)
    # x_t lies on the segment from the clean tokens to some noise: recover the noise and check x_t.
    t_col = seen["t"][batch.image_ids][:, None]
    noise = (seen["x"] - (1 - t_col) * batch.tokens) / t_col
    assert torch.allclose(interpolate(batch.tokens, noise, t_col), seen["x"], atol=1e-6)
    assert abs(float(noise.std()) - 1) < 0.5


def test_non_finite_predictions_reach_the_loss():
    batch = make_pack([(1, 2), (1, 1)])

    def model(x, t, y, packed):
        v = torch.zeros_like(x)
        v[1, 0] = float("nan")
        return v

    terms = FlowMatchingLoss(null_class=NULL)(model, batch, torch.Generator().manual_seed(0))
    assert not bool(torch.isfinite(terms.loss))
    with pytest.raises(ValueError, match="one velocity per token"):
        FlowMatchingLoss(null_class=NULL)(lambda x, t, y, b: x[:, :2], batch, torch.Generator())
