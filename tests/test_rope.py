import math

import pytest
import torch

from nrtrain.packed import packed_from_tokens
from nrtrain.rope import (RopeExtrapolation, apply_rope, base_inverse_frequencies, rope_coordinates, rope_cos_sin,
                          rotate_half)

HEAD_DIM = 16


def pack(sizes):
    return packed_from_tokens([torch.zeros(h * w, 1) for h, w in sizes], sizes, [0] * len(sizes))


def cos_sin(batch, grid="rowcol", extrapolation=None, head_dim=HEAD_DIM):
    coords = rope_coordinates(batch.positions, batch.sizes, batch.image_ids, grid)
    return rope_cos_sin(coords, batch.sizes, batch.image_ids, head_dim, extrapolation=extrapolation)


def test_nit_grid_on_2x3_gives_documented_coordinates():
    batch = pack([(2, 3)])
    coords = rope_coordinates(batch.positions, batch.sizes, batch.image_ids, "nit")
    # token k = row*3 + col gets (k % 2, k // 2)
    assert coords.tolist() == [[0, 0], [1, 0], [0, 1], [1, 1], [0, 2], [1, 2]]
    assert rope_coordinates(batch.positions, batch.sizes, batch.image_ids, "rowcol").tolist() == \
        [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]


def test_nit_grid_matches_meshgrid_xy_construction_in_a_pack():
    sizes = [(2, 3), (4, 4), (3, 1), (5, 2)]
    batch = pack(sizes)
    expected = torch.cat([torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="xy")).reshape(2, -1).T
                          for h, w in sizes])
    assert torch.equal(rope_coordinates(batch.positions, batch.sizes, batch.image_ids, "nit"), expected)


def test_rotate_half_turns_interleaved_pairs():
    x = torch.arange(1.0, 7.0)
    assert rotate_half(x).tolist() == [-2.0, 1.0, -4.0, 3.0, -6.0, 5.0]


def test_first_half_follows_axis0_second_half_axis1():
    coords = torch.tensor([[3, 0], [0, 5]])
    sizes = torch.tensor([[8, 8]])
    cos, sin = rope_cos_sin(coords, sizes, torch.zeros(2, dtype=torch.long), HEAD_DIM)
    half = HEAD_DIM // 2
    assert torch.equal(cos[0, half:], torch.ones(half)) and torch.equal(sin[0, half:], torch.zeros(half))
    assert torch.equal(cos[1, :half], torch.ones(half)) and torch.equal(sin[1, :half], torch.zeros(half))
    inverse = base_inverse_frequencies(HEAD_DIM, 10000.0)
    torch.testing.assert_close(sin[0, :half], torch.sin(3 * inverse).repeat_interleave(2))
    torch.testing.assert_close(sin[1, half:], torch.sin(5 * inverse).repeat_interleave(2))
    assert inverse[0] == 1.0 and inverse.numel() == HEAD_DIM // 4


@pytest.mark.parametrize("grid", ["rowcol", "nit"])
def test_rotation_preserves_norm_of_every_pair(grid):
    batch = pack([(3, 5), (4, 2)])
    cos, sin = cos_sin(batch, grid)
    x = torch.randn(batch.num_tokens, 2, HEAD_DIM)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.unflatten(-1, (-1, 2)).norm(dim=-1), x.unflatten(-1, (-1, 2)).norm(dim=-1))
    assert not torch.allclose(x, y)


def test_apply_rope_keeps_dtype():
    batch = pack([(2, 2)])
    cos, sin = cos_sin(batch)
    x = torch.randn(4, 1, HEAD_DIM, dtype=torch.bfloat16)
    assert apply_rope(x, cos, sin).dtype == torch.bfloat16


def test_rowcol_scores_depend_only_on_offset():
    sizes = torch.tensor([[32, 32]])
    q, k = torch.randn(HEAD_DIM), torch.randn(HEAD_DIM)

    def score(p, r):
        coords = torch.tensor([p, r])
        cos, sin = rope_cos_sin(coords, sizes, torch.zeros(2, dtype=torch.long), HEAD_DIM)
        rq = apply_rope(q.reshape(1, 1, -1), cos[:1], sin[:1])
        rk = apply_rope(k.reshape(1, 1, -1), cos[1:], sin[1:])
        return float((rq * rk).sum())

    base = score((2, 3), (5, 1))
    for shift in [(1, 0), (0, 7), (10, 12), (20, 4)]:
        shifted = score((2 + shift[0], 3 + shift[1]), (5 + shift[0], 1 + shift[1]))
        assert math.isclose(base, shifted, rel_tol=1e-4, abs_tol=1e-4)
    assert not math.isclose(base, score((2, 3), (6, 1)), rel_tol=1e-3)


@pytest.mark.parametrize("mode", ["linear", "dynntk", "yarn"])
@pytest.mark.parametrize("decouple", [False, True])
def test_extrapolation_is_plain_rope_at_or_below_training_size(mode, decouple):
    batch = pack([(8, 6), (4, 8), (2, 2)])
    plain = cos_sin(batch)
    stretched = cos_sin(batch, extrapolation=RopeExtrapolation(mode, train_size=(8, 8), decouple=decouple))
    for a, b in zip(plain, stretched):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["linear", "dynntk", "yarn"])
def test_extrapolation_changes_angles_beyond_training_size(mode):
    batch = pack([(16, 16)])
    plain = cos_sin(batch)[1]
    stretched = cos_sin(batch, extrapolation=RopeExtrapolation(mode, train_size=(8, 8)))[1]
    assert not torch.allclose(plain, stretched)


def test_linear_interpolation_maps_positions_back_into_training_range():
    batch_big, batch_small = pack([(16, 16)]), pack([(8, 8)])
    cos_big, sin_big = cos_sin(batch_big, extrapolation=RopeExtrapolation("linear", train_size=(8, 8)))
    cos_small, sin_small = cos_sin(batch_small)
    # token (2r, 2c) of the 16x16 image, stretched by s=2, turns like token (r, c) of the 8x8 one
    big = (batch_big.positions[:, 0] % 2 == 0) & (batch_big.positions[:, 1] % 2 == 0)
    torch.testing.assert_close(cos_big[big], cos_small)
    torch.testing.assert_close(sin_big[big], sin_small)


def test_dynntk_keeps_the_fastest_pair_and_slows_the_others():
    batch = pack([(16, 16)])
    plain_cos, _ = cos_sin(batch)
    ntk_cos, _ = cos_sin(batch, extrapolation=RopeExtrapolation("dynntk", train_size=(8, 8)))
    torch.testing.assert_close(ntk_cos[:, 0], plain_cos[:, 0])  # pair 0 has inverse frequency 1 under any base
    assert not torch.allclose(ntk_cos[:, 2], plain_cos[:, 2])


def test_yarn_scales_magnitude():
    batch = pack([(16, 8)])
    cos, sin = cos_sin(batch, extrapolation=RopeExtrapolation("yarn", train_size=(8, 8)))
    magnitude = 0.1 * math.log(2.0) + 1
    torch.testing.assert_close(cos.square() + sin.square(), torch.full_like(cos, magnitude ** 2))


def test_decouple_stretches_only_the_axis_beyond_training():
    batch = pack([(8, 16)])  # axis 0 at training size, axis 1 twice it
    half = HEAD_DIM // 2
    plain = cos_sin(batch)[0]
    coupled = cos_sin(batch, extrapolation=RopeExtrapolation("linear", train_size=(8, 8)))[0]
    decoupled = cos_sin(batch, extrapolation=RopeExtrapolation("linear", train_size=(8, 8), decouple=True))[0]
    torch.testing.assert_close(decoupled[:, :half], plain[:, :half])
    assert not torch.allclose(coupled[:, :half], plain[:, :half])
    torch.testing.assert_close(decoupled[:, half:], coupled[:, half:])


def test_extrapolation_rejects_bad_settings():
    with pytest.raises(ValueError, match="train_size"):
        RopeExtrapolation("yarn")
    with pytest.raises(ValueError, match="unknown RoPE extrapolation"):
        RopeExtrapolation("ntk")
    with pytest.raises(ValueError, match="unknown RoPE grid"):
        rope_coordinates(torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2, dtype=torch.long),
                         torch.zeros(1, dtype=torch.long), "xy")
