"""Useful FLOPs of the NiT model on one pack, the numerator of MFU (shared/reference/perf.md §0).

Forward FLOPs of a pack with images of n_1..n_B tokens, T = sum n_i, D hidden, L depth,
P = C*p*p token width, M the MLP width, and 2 FLOPs per multiply-add:

  per token   2*T*( P*D                                   patch embedding
                    + L*(3*D*D + D*D + mlp)                qkv, proj, MLP (gelu: 2*D*M, swiglu: 3*D*M)
                    + D*P )                                final linear
  per image   2*B*( 256*D + D*D                           timestep MLP
                    + L*6*D*D + 2*D*D )                   adaLN of every block and of the final layer
  attention   L * sum_i 4*n_i^2*D                          QK^T and AV within each image (block-diagonal)
  REPA        2*T*(D*W + W*W + W*Z)                        projector, when the config has one and it is counted

Training counts 3x forward (backward = 2x forward; activation recomputation is not counted, so this
is MFU, not HFU). Norms, RoPE, softmax, activations and the label lookup are left out as elementwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from nrtrain.model import TIMESTEP_FEATURES, NiTConfig


def model_flops(config: NiTConfig, seqlens: Sequence[int], *, training: bool = False, repa: bool | None = None) -> int:
    """FLOPs of one forward (or, with training, forward+backward) over a pack of images of `seqlens` tokens.

    `repa` counts the REPA projector; by default it is counted when the config has one.
    """
    d, depth, p = config.hidden, config.depth, config.token_dim
    tokens, images = sum(seqlens), len(seqlens)
    mlp_macs = (2 if config.mlp == "gelu" else 3) * d * config.mlp_hidden
    per_token_macs = p * d + depth * (4 * d * d + mlp_macs) + d * p
    per_image_macs = TIMESTEP_FEATURES * d + d * d + depth * 6 * d * d + 2 * d * d
    if repa is None:
        repa = config.repa_depth is not None
    if repa:
        if config.repa_depth is None:
            raise ValueError("repa=True but the config has no REPA projector (repa_depth is None)")
        w = config.repa_hidden
        per_token_macs += d * w + w * w + w * config.repa_dim
    attention = depth * sum(4 * n * n * d for n in seqlens)
    forward = 2 * tokens * per_token_macs + 2 * images * per_image_macs + attention
    return 3 * forward if training else forward
