"""Block-diagonal attention over a packed sequence: each token attends only to tokens of its own image.

Backends (picked once per run, checked against each other in tests/test_attention.py):
  flash-varlen  flash_attn.flash_attn_varlen_func; CUDA, fp16/bf16 (NiT's kernel).
  torch-varlen  torch.nn.attention.varlen.varlen_attn, PyTorch's own flash kernel; CUDA, fp16/bf16.
  sdpa-loop     one SDPA call per run of equal-length images, on slices: no mask, no padding. The CPU
                path, 7-8x faster there than a masked SDPA (shared/reference/deps.md 3d).
  masked-sdpa   one SDPA call with a [T, T] block-diagonal bool mask: the plain reference, O(T^2) memory.
  flex          flex_attention with a document mask; compiled on CUDA, eager and forward-only on CPU.

What a backend needs about the pack (offsets, host-side lengths, a mask) is built once per forward
by `prepare_attention` and shared by every layer, so no layer reads anything back from the device.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nrtrain.packed import PackedBatch

BACKENDS = ("flash-varlen", "torch-varlen", "sdpa-loop", "masked-sdpa", "flex")
HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AttentionMeta:
    """Per-pack facts one backend needs, built once per forward by `prepare_attention`."""

    backend: str
    cu_seqlens: torch.Tensor  # [B+1] int32 on the tokens' device
    max_seqlen: int
    runs: tuple[tuple[int, int, int], ...] = ()  # sdpa-loop: (first token, images, tokens per image)
    mask: torch.Tensor | None = None  # masked-sdpa: [T, T] bool, True where attention is allowed
    block_mask: object | None = None  # flex: a BlockMask over the pack


def choose_backend(device_type: str, dtype: torch.dtype, *, compiled: bool = False) -> tuple[str, str]:
    """(backend, why) that "auto" means for attention in `dtype` on a device type.

    The order follows shared/reference/deps.md 3d: on CUDA in fp16/bf16 the varlen kernels (flash-attn
    where installed, else PyTorch's own); elsewhere a loop of SDPA over the pack's images (7-8x faster
    than a masked SDPA on CPU). The SDPA loop plans each pack in Python, so under torch.compile it
    would recompile for every pack: compiled runs take flex on CUDA and the masked SDPA on CPU.
    """
    half = dtype in HALF_DTYPES
    if device_type == "cuda" and half:
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash-varlen", "flash-attn is installed"
        if importlib.util.find_spec("torch.nn.attention.varlen") is not None:
            return "torch-varlen", "flash-attn not installed; torch.nn.attention.varlen on CUDA"
    where = f"{device_type} in {str(dtype).removeprefix('torch.')}"
    if compiled:
        if device_type == "cuda":
            return "flex", f"torch.compile on {where}: flex_attention with a document mask"
        return "masked-sdpa", f"torch.compile on {where}: one SDPA with a block-diagonal mask"
    if device_type == "cuda":
        return "sdpa-loop", f"the varlen kernels need fp16/bf16; per-image SDPA on {where}"
    return "sdpa-loop", f"no varlen kernel on {where}; per-image SDPA"


@functools.lru_cache(maxsize=None)
def resolve_backend(name: str, device_type: str, dtype: torch.dtype = torch.float32, *,
                    needs_backward: bool = False, compiled: bool = False) -> str:
    """The backend to use for `name` ("auto" or one of BACKENDS) for attention computed in `dtype`
    (the autocast dtype under autocast, else the model's) on a device type ("cuda", "cpu").

    Raises ValueError naming the missing piece and what to use instead when the backend cannot run there.
    """
    if name == "auto":
        return choose_backend(device_type, dtype, compiled=compiled)[0]
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose 'auto' or one of {BACKENDS}")
    if name in ("flash-varlen", "torch-varlen"):
        if device_type != "cuda":
            raise ValueError(f"attention backend {name} runs on CUDA only, not {device_type}; "
                             "use sdpa-loop there (or attention=auto)")
        if dtype not in HALF_DTYPES:
            raise ValueError(f"attention backend {name} needs fp16/bf16 but the model computes in "
                             f"{str(dtype).removeprefix('torch.')}; train with precision=bf16 or sample with "
                             "--dtype bfloat16, or use attention=auto (sdpa-loop in fp32)")
    if name == "flash-varlen" and importlib.util.find_spec("flash_attn") is None:
        raise ValueError("attention backend flash-varlen needs the flash-attn package "
                         "(pip install flash-attn --no-build-isolation), or use torch-varlen")
    if name == "torch-varlen" and importlib.util.find_spec("torch.nn.attention.varlen") is None:
        raise ValueError(f"attention backend torch-varlen needs torch.nn.attention.varlen, absent in torch "
                         f"{torch.__version__}; upgrade torch or use flash-varlen")
    if name == "flex":
        if importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
            raise ValueError(f"attention backend flex needs torch.nn.attention.flex_attention, absent in torch "
                             f"{torch.__version__}")
        if needs_backward and device_type != "cuda":
            raise ValueError(f"attention backend flex has no backward on {device_type}; train with sdpa-loop there")
    if name == "sdpa-loop" and compiled:
        raise ValueError("attention backend sdpa-loop plans every pack in Python, so torch.compile would "
                         "recompile for each pack; with compile use attention=auto (masked-sdpa on CPU, "
                         "flex or the varlen kernels on CUDA)")
    return name


def compute_dtype(device_type: str, parameter_dtype: torch.dtype) -> torch.dtype:
    """The dtype attention sees: autocast's when it is on for the device, else the parameters'."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return parameter_dtype


def prepare_attention(batch: PackedBatch, backend: str) -> AttentionMeta:
    """What `backend` needs to attend within the images of `batch`; call once per forward."""
    common = dict(backend=backend, cu_seqlens=batch.cu_seqlens, max_seqlen=int(batch.max_seqlen))
    if backend in ("flash-varlen", "torch-varlen"):
        return AttentionMeta(**common)
    if backend == "sdpa-loop":
        return AttentionMeta(**common, runs=equal_length_runs(batch.seqlens()))
    ids = batch.image_ids
    if backend == "masked-sdpa":
        return AttentionMeta(**common, mask=ids[:, None] == ids[None, :])
    if backend == "flex":
        from torch.nn.attention.flex_attention import create_block_mask

        def same_image(b, h, q_index, kv_index):
            return ids[q_index] == ids[kv_index]

        total = batch.num_tokens
        return AttentionMeta(**common, block_mask=create_block_mask(same_image, None, None, total, total,
                                                                    device=ids.device))
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def equal_length_runs(seqlens: list[int]) -> tuple[tuple[int, int, int], ...]:
    """Group consecutive images of equal length: (first token, images, tokens per image) per group."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for n in seqlens:
        if runs and runs[-1][2] == n:
            first, count, _ = runs[-1]
            runs[-1] = (first, count + 1, n)
        else:
            runs.append((start, 1, n))
        start += n
    return tuple(runs)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMeta) -> torch.Tensor:
    """Softmax attention of q, k, v [T, H, head_dim] within each image; returns [T, H, head_dim]."""
    backend = meta.backend
    if backend == "sdpa-loop":
        return sdpa_loop(q, k, v, meta.runs)
    if backend == "masked-sdpa":
        return sdpa_over_pack(q, k, v, attn_mask=meta.mask)
    if backend == "flex":
        return flex_over_pack(q, k, v, meta.block_mask)
    if q.dtype not in HALF_DTYPES:
        raise ValueError(f"attention backend {backend} needs fp16/bf16 q, k, v, got {q.dtype}; "
                         "use attention=auto, which picks sdpa-loop for fp32")
    if backend == "flash-varlen":
        from flash_attn import flash_attn_varlen_func

        return flash_attn_varlen_func(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen)
    if backend == "torch-varlen":
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, meta.cu_seqlens, meta.cu_seqlens, meta.max_seqlen, meta.max_seqlen)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def sdpa_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              runs: tuple[tuple[int, int, int], ...]) -> torch.Tensor:
    heads, head_dim = q.shape[1], q.shape[2]
    outputs = []
    for first, count, n in runs:
        end = first + count * n

        def images(x):  # [count*n, H, Dh] → [count, H, n, Dh]
            return x[first:end].unflatten(0, (count, n)).transpose(1, 2)

        out = F.scaled_dot_product_attention(images(q), images(k), images(v))
        outputs.append(out.transpose(1, 2).reshape(count * n, heads, head_dim))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


def sdpa_over_pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, attn_mask: torch.Tensor) -> torch.Tensor:
    as_batch = lambda x: x.transpose(0, 1)[None]  # noqa: E731  [T, H, Dh] → [1, H, T, Dh]
    out = F.scaled_dot_product_attention(as_batch(q), as_batch(k), as_batch(v), attn_mask=attn_mask)
    return out[0].transpose(0, 1)


def flex_over_pack(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask) -> torch.Tensor:
    as_batch = lambda x: x.transpose(0, 1)[None]  # noqa: E731
    # inside a compiled block dynamo lowers flex_attention itself; a nested compiled callable would break the graph
    kernel = flex_attention_op() if torch.compiler.is_compiling() else flex_kernel(q.device.type)
    out = kernel(as_batch(q), as_batch(k), as_batch(v), block_mask=block_mask)
    return out[0].transpose(0, 1)


def flex_attention_op():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


@functools.lru_cache(maxsize=None)
def flex_kernel(device_type: str):
    """flex_attention, compiled on CUDA (eager flex materialises the full score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=True) if device_type == "cuda" else flex_attention
