"""Classifier-free guidance on a packed batch, and the velocity field the solvers integrate.

Guidance runs the pack doubled: the conditional images followed by the same images with the null
class, in one PackedBatch, so one model call returns both velocities (NiT's `[x, x]`, `[y, null]`).
The doubled geometry is built once per sampling call; each step only swaps in the tokens.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from nrtrain.packed import PackedBatch


def double_for_cfg(batch: PackedBatch, null_class: int) -> PackedBatch:
    """The pack followed by a copy of itself whose labels are all `null_class` (2B images, 2T tokens)."""
    num_tokens, num_images = batch.num_tokens, batch.num_images
    labels = torch.cat([batch.labels, torch.full_like(batch.labels, null_class)])
    row_ids = None if batch.row_ids is None else torch.cat([batch.row_ids, batch.row_ids])
    return PackedBatch(tokens=torch.cat([batch.tokens, batch.tokens]), sizes=torch.cat([batch.sizes, batch.sizes]),
                       cu_seqlens=torch.cat([batch.cu_seqlens, batch.cu_seqlens[1:] + num_tokens]),
                       max_seqlen=batch.max_seqlen, positions=torch.cat([batch.positions, batch.positions]),
                       image_ids=torch.cat([batch.image_ids, batch.image_ids + num_images]),
                       labels=labels, row_ids=row_ids,
                       host_seqlens=None if batch.host_seqlens is None else batch.host_seqlens * 2)


class GuidedField:
    """v(x, t) for a whole pack: the model's velocity, guided with scale s where low <= t <= high.

    Inside the interval: one call on the doubled pack and v = v_u + s (v_c - v_u). Outside it, or
    with s = 1: one call on the conditional pack only. t = 1 is noise, so NiT's interval (0, 0.7)
    leaves the first, noisiest part of sampling unguided. x is cast to `model_dtype` for the model
    (t is handed over in float32); its output is cast back to the dtype of x (the integration dtype) before combining.
    Counts: `nfe` velocity evaluations, `guided_nfe` of them on the doubled pack.
    """

    def __init__(self, model, batch: PackedBatch, labels: torch.Tensor, *, cfg_scale: float,
                 cfg_interval: tuple[float, float], null_class: int, model_dtype: torch.dtype):
        low, high = cfg_interval
        if cfg_scale < 1:
            raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance), got {cfg_scale}; for unconditional "
                             f"samples pass the null class {null_class} as labels")
        if not 0 <= low <= high <= 1:
            raise ValueError(f"cfg_interval must satisfy 0 <= low <= high <= 1, got {cfg_interval}")
        labels = labels.to(batch.tokens.device)
        if labels.shape != (batch.num_images,):
            raise ValueError(f"labels must be [B={batch.num_images}], got {tuple(labels.shape)}")
        self.model = model
        self.cfg_scale = cfg_scale
        self.cfg_interval = (low, high)
        self.model_dtype = model_dtype
        self.batch = replace(batch, labels=labels)
        self.doubled = double_for_cfg(self.batch, null_class) if cfg_scale > 1 else None
        self.nfe = 0
        self.guided_nfe = 0

    def guided_at(self, t: float) -> bool:
        low, high = self.cfg_interval
        return self.doubled is not None and low <= t <= high

    def __call__(self, x: torch.Tensor, t: float, guide_at: float | None = None) -> torch.Tensor:
        """v(x, t), guided when `guide_at` (default t) lies in the interval (Heun's NiT rule asks
        about the step's start for its corrector)."""
        self.nfe += 1
        x_in = x.to(self.model_dtype)
        if not self.guided_at(t if guide_at is None else guide_at):
            return self._velocity(x_in, t, self.batch).to(x.dtype)
        self.guided_nfe += 1
        both = self._velocity(torch.cat([x_in, x_in]), t, self.doubled).to(x.dtype)
        conditional, unconditional = both.split(x.shape[0])
        return unconditional + self.cfg_scale * (conditional - unconditional)

    def _velocity(self, x_in: torch.Tensor, t: float, geometry: PackedBatch) -> torch.Tensor:
        # t stays float32 whatever the model's dtype: in bf16, t near 1 would round to steps of 1/256,
        # about the spacing of a 250-step grid, and neighbouring steps would get the same embedding
        times = torch.full((geometry.num_images,), t, dtype=torch.float32, device=x_in.device)
        return self.model(x_in, times, geometry.labels, geometry.with_tokens(x_in))
