import warnings

import pytest
import torch

from nrtrain.attention import equal_length_runs, packed_attention, prepare_attention, resolve_backend
from nrtrain.packed import packed_from_tokens

SIZES = [(2, 3), (4, 4), (4, 4), (1, 5), (3, 3), (3, 3)]
HEADS, HEAD_DIM = 3, 8


def make_pack(sizes=SIZES):
    return packed_from_tokens([torch.zeros(h * w, 1) for h, w in sizes], sizes, [0] * len(sizes))


def make_qkv(total, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(total, HEADS, HEAD_DIM, generator=g, requires_grad=True) for _ in range(3)]


def per_image_reference(q, k, v, sizes):
    """Softmax attention written out image by image: the definition the backends must meet."""
    outs, start = [], 0
    for h, w in sizes:
        sl = slice(start, start + h * w)
        scores = torch.einsum("qhd,khd->hqk", q[sl], k[sl]) / HEAD_DIM ** 0.5
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v[sl]))
        start += h * w
    return torch.cat(outs)


def run_backend(backend, q, k, v, batch):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns that it is unfused
        return packed_attention(q, k, v, prepare_attention(batch, backend))


@pytest.mark.parametrize("backend", ["sdpa-loop", "masked-sdpa"])
def test_backend_matches_per_image_softmax_forward_and_backward(backend):
    batch = make_pack()
    q, k, v = make_qkv(batch.num_tokens)
    expected = per_image_reference(q, k, v, SIZES)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), upstream)
    got = run_backend(backend, q, k, v, batch)
    assert got.shape == (batch.num_tokens, HEADS, HEAD_DIM)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    for g, e in zip(torch.autograd.grad(got, (q, k, v), upstream), expected_grads):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)


def test_sdpa_loop_and_masked_sdpa_agree_with_each_other():
    batch = make_pack([(5, 2), (1, 1), (3, 4)])
    q, k, v = make_qkv(batch.num_tokens, seed=3)
    loop = run_backend("sdpa-loop", q, k, v, batch)
    masked = run_backend("masked-sdpa", q, k, v, batch)
    torch.testing.assert_close(loop, masked, atol=1e-5, rtol=1e-5)
    g_loop = torch.autograd.grad(loop.square().sum(), (q, k, v))
    g_masked = torch.autograd.grad(masked.square().sum(), (q, k, v))
    for a, b in zip(g_loop, g_masked):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flex_forward_matches_reference_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    batch = make_pack()
    q, k, v = (x.detach() for x in make_qkv(batch.num_tokens, seed=1))
    got = run_backend("flex", q, k, v, batch)
    torch.testing.assert_close(got, per_image_reference(q, k, v, SIZES), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa-loop", "masked-sdpa"])
def test_no_leakage_between_images(backend):
    batch = make_pack()
    q, k, v = (x.detach() for x in make_qkv(batch.num_tokens, seed=2))
    before = run_backend(backend, q, k, v, batch)
    first, second = int(batch.cu_seqlens[1]), int(batch.cu_seqlens[2])
    k2, v2 = k.clone(), v.clone()
    k2[first:second] += 5.0
    v2[first:second] -= 3.0  # change only image 1
    after = run_backend(backend, q, k2, v2, batch)
    assert torch.equal(before[:first], after[:first])
    assert torch.equal(before[second:], after[second:])
    assert not torch.allclose(before[first:second], after[first:second])


def test_equal_length_runs_groups_consecutive_images():
    assert equal_length_runs([6, 16, 16, 5, 9, 9]) == ((0, 1, 6), (6, 2, 16), (38, 1, 5), (43, 2, 9))
    assert equal_length_runs([4, 4, 4]) == ((0, 3, 4),)
    assert equal_length_runs([3, 4, 3]) == ((0, 1, 3), (3, 1, 4), (7, 1, 3))


def test_resolve_backend():
    assert resolve_backend("auto", "cpu") == "sdpa-loop"
    assert resolve_backend("masked-sdpa", "cpu") == "masked-sdpa"
    with pytest.raises(ValueError, match="CUDA only"):
        resolve_backend("flash-varlen", "cpu")
    with pytest.raises(ValueError, match="CUDA only"):
        resolve_backend("torch-varlen", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        resolve_backend("flash", "cpu")
    with pytest.raises(ValueError, match="no backward on cpu"):
        resolve_backend("flex", "cpu", needs_backward=True)


def test_doctor_reports_the_backend_that_training_picks():
    """nr doctor asks attention.py, the one place that decides, for the dtype precision=auto trains in."""
    from nrtrain.environment import environment_report
    from nrtrain.model import NiT, NiTConfig

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shown = next(check.value for check in environment_report() if check.name == "attention backend")
    model = NiT.from_config(NiTConfig(in_channels=4, patch_size=1, hidden=32, depth=1, heads=2, num_classes=3))
    picked = model.use_attention(device, dtype, training=True)
    assert shown.split(" ")[0] == picked == resolve_backend("auto", device.type, dtype)


def test_cuda_kernels_refuse_fp32():
    batch = make_pack([(2, 2)])
    q, k, v = (x.detach() for x in make_qkv(4))
    meta = prepare_attention(batch, "flash-varlen")
    with pytest.raises(ValueError, match="fp16/bf16"):
        packed_attention(q, k, v, meta)
