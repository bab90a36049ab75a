import pytest
import torch

from nrtrain.packed import check_cu_seqlens, pack_latents, patchify, unpatchify


@pytest.mark.parametrize("p", [1, 2])
def test_patchify_round_trip_and_conv_order(p):
    latent = torch.randn(4, 6 * p, 3 * p)
    tokens = patchify(latent, p)
    assert tokens.shape == (18, 4 * p * p)
    assert torch.equal(unpatchify(tokens, 6, 3, 4, p), latent)
    conv = torch.nn.Conv2d(4, 5, p, stride=p)
    expected = conv(latent[None])[0].flatten(1).T  # [h*w, 5], row-major tokens
    got = tokens @ conv.weight.reshape(5, -1).T + conv.bias
    assert torch.allclose(got, expected, atol=1e-5)


def test_pack_latents_offsets_positions_and_ids():
    batch = pack_latents([torch.randn(2, 2, 3), torch.randn(2, 4, 1)], [7, 9], 1, row_ids=[10, 11])
    assert batch.cu_seqlens.tolist() == [0, 6, 10]
    assert batch.cu_seqlens.dtype == torch.int32
    assert batch.max_seqlen == 6
    assert batch.positions[:6].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    assert batch.positions[6:].tolist() == [[0, 0], [1, 0], [2, 0], [3, 0]]
    assert batch.image_ids.tolist() == [0] * 6 + [1] * 4
    assert batch.labels.tolist() == [7, 9] and batch.seqlens() == [6, 4]


@pytest.mark.parametrize("cu, message", [
    (torch.tensor([0, 3, 3, 5], dtype=torch.int32), "strictly increase"),
    (torch.tensor([1, 3, 5], dtype=torch.int32), "start at 0"),
    (torch.tensor([0, 3, 4], dtype=torch.int32), "ends at 4"),
    (torch.tensor([0, 3, 5], dtype=torch.int64), "int32"),
])
def test_check_cu_seqlens_rejects(cu, message):
    with pytest.raises(ValueError, match=message):
        check_cu_seqlens(cu, 5)
