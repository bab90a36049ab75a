"""The flow-matching objective on a packed batch: draw t and noise, ask the model for v, score it.

Reductions. Every per-token quantity (MSE over channels, 1 - cos of the direction, 1 - cos of the
REPA alignment) is turned into a scalar by one weight per token:

- "image" (default): mean over each image's tokens, then mean over the pack's images. Each image in a
  pack weighs 1/B whatever its size, so a 1024² image does not count 16× a 256² one and the model is
  trained on the data's distribution of images, not of pixels, which is what a fixed-resolution DiT
  optimises. (Across packs an image weighs 1/B of its own pack; packs are filled to a token budget, so
  packs of small images spread the same step over more images.)
- "token": mean over all tokens of the pack (NiT's). An image weighs in proportion to its token count.

Randomness. t, the noise and the label dropout come, in that order, from the one `torch.Generator`
passed to each call, so a run is reproducible, and resumable by saving `generator.get_state()` with
the checkpoint. Draws happen on the generator's device; give the trainer a generator on the training
device to keep them there.

Non-finite values are not masked (NiT zeroes NaNs with nan_to_num, which hides a diverging run): a
NaN or inf anywhere reaches `loss`, and the trainer stops on a non-finite loss.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from nrtrain.packed import PackedBatch
from nrtrain.transport.path import interpolate, per_token, sample_t, velocity_target

REDUCTIONS = ("image", "token")


@dataclass
class LossTerms:
    loss: torch.Tensor  # scalar, differentiable: mse + direction_weight * direction + repa_weight * repa
    mse: torch.Tensor  # scalar, detached
    direction: torch.Tensor | None  # scalar, detached; None when the direction loss is off
    repa: torch.Tensor | None  # scalar, detached; None when REPA is off
    per_image: torch.Tensor  # [B] detached: each image's weighted total, averaged over its own tokens
    t: torch.Tensor  # [B] the time drawn for each image
    dropped: torch.Tensor  # [B] bool: labels replaced by the null class this step

    def scalars(self) -> dict[str, torch.Tensor]:
        """The enabled scalar terms by name, detached, for logging (still tensors: no device sync)."""
        named = {"loss": self.loss.detach(), "mse": self.mse, "direction": self.direction, "repa": self.repa}
        return {name: value for name, value in named.items() if value is not None}


def reduction_weights(batch: PackedBatch, reduction: str) -> torch.Tensor:
    """[T] float32 weights summing to 1 that turn a per-token quantity into the pack's scalar."""
    device = batch.tokens.device
    if reduction == "token":
        return torch.full((batch.num_tokens,), 1.0 / batch.num_tokens, device=device)
    if reduction == "image":
        counts = (batch.sizes[:, 0] * batch.sizes[:, 1]).to(device=device, dtype=torch.float32)
        return (1.0 / (counts * batch.num_images))[batch.image_ids.to(device)]
    raise ValueError(f"unknown loss reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")


def drop_labels(labels: torch.Tensor, prob: float, null_class: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace each label by `null_class` with probability `prob` (CFG training); returns (labels, dropped)."""
    if prob == 0:
        return labels, torch.zeros_like(labels, dtype=torch.bool)
    draws = torch.rand(labels.shape[0], generator=generator, device=generator.device)
    dropped = (draws < prob).to(labels.device)
    return torch.where(dropped, torch.full_like(labels, null_class), labels), dropped


class FlowMatchingLoss:
    """Linear-path, v-prediction flow matching with optional direction (cosine) loss and REPA.

    `null_class` is the class id the model reserves for "no class" (num_classes). REPA is on when
    `repa_weight > 0`; each call must then pass `repa_targets` [T, repa_dim], the frozen encoder's
    features for every token in pack order, and the model is called with `return_repa=True`.
    """

    def __init__(self, *, null_class: int, reduction: str = "image", class_dropout_prob: float = 0.1,
                 direction_loss: bool = False, direction_weight: float = 1.0, repa_weight: float = 0.0,
                 t_sampling: str = "logit-normal", t_mean: float = 0.0, t_std: float = 1.0):
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown loss reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
        if not 0 <= class_dropout_prob < 1:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}")
        if repa_weight < 0:
            raise ValueError(f"repa_weight must be >= 0, got {repa_weight}")
        self.null_class = null_class
        self.reduction = reduction
        self.class_dropout_prob = class_dropout_prob
        self.direction_loss = direction_loss
        self.direction_weight = direction_weight
        self.repa_weight = repa_weight
        self.t_sampling = t_sampling
        self.t_mean = t_mean
        self.t_std = t_std

    @property
    def uses_repa(self) -> bool:
        return self.repa_weight > 0

    def __call__(self, model, batch: PackedBatch, generator: torch.Generator, *,
                 repa_targets: torch.Tensor | None = None) -> LossTerms:
        self._check_repa_targets(batch, repa_targets)
        device = batch.tokens.device
        t = sample_t(batch.num_images, generator, self.t_sampling, self.t_mean, self.t_std).to(device)
        x = batch.tokens.float()
        noise = torch.randn(x.shape, generator=generator, device=generator.device).to(device)
        x_t = interpolate(x, noise, per_token(t, batch.image_ids))
        target = velocity_target(x, noise)
        labels, dropped = drop_labels(batch.labels, self.class_dropout_prob, self.null_class, generator)
        # The model sees the noisy tokens in the batch too, so nothing can read the clean latents.
        noisy = replace(batch, tokens=x_t, labels=labels)
        if self.uses_repa:
            prediction, projected = model(x_t, t, labels, noisy, return_repa=True)
        else:
            prediction, projected = model(x_t, t, labels, noisy), None
        if prediction.shape != target.shape:
            raise ValueError(f"the model returned {tuple(prediction.shape)} for a pack of "
                             f"{tuple(target.shape)} tokens; it must predict one velocity per token")
        prediction = prediction.float()

        weights = reduction_weights(batch, self.reduction)
        per_token_mse = (prediction - target).square().mean(dim=-1)
        mse = (weights * per_token_mse).sum()
        loss, per_token_total = mse, per_token_mse
        direction = repa = None
        if self.direction_loss:
            per_token_direction = 1 - F.cosine_similarity(prediction, target, dim=-1)
            direction = (weights * per_token_direction).sum()
            loss = loss + self.direction_weight * direction
            per_token_total = per_token_total + self.direction_weight * per_token_direction
        if self.uses_repa:
            if projected.shape != repa_targets.shape:
                raise ValueError(f"the model's REPA projection is {tuple(projected.shape)} but repa_targets "
                                 f"is {tuple(repa_targets.shape)}; the projector's output width must match "
                                 f"the encoder's feature width")
            per_token_repa = 1 - F.cosine_similarity(projected.float(), repa_targets.float(), dim=-1)
            repa = (weights * per_token_repa).sum()
            loss = loss + self.repa_weight * repa
            per_token_total = per_token_total + self.repa_weight * per_token_repa

        return LossTerms(loss=loss, mse=mse.detach(),
                         direction=None if direction is None else direction.detach(),
                         repa=None if repa is None else repa.detach(),
                         per_image=_per_image_mean(per_token_total.detach(), batch), t=t, dropped=dropped)

    def _check_repa_targets(self, batch: PackedBatch, repa_targets: torch.Tensor | None) -> None:
        if self.uses_repa and repa_targets is None:
            raise ValueError(f"REPA is on (repa_weight={self.repa_weight}) but no repa_targets were given; "
                             f"pass the encoder features [T, repa_dim] or set repa_weight=0")
        if not self.uses_repa and repa_targets is not None:
            raise ValueError("repa_targets were given but repa_weight is 0, so they would be ignored; "
                             "set repa_weight > 0 or stop computing the targets")
        if repa_targets is not None and (repa_targets.dim() != 2 or repa_targets.shape[0] != batch.num_tokens):
            raise ValueError(f"repa_targets must be [T={batch.num_tokens}, repa_dim], got {tuple(repa_targets.shape)}")


def _per_image_mean(per_token_values: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
    device = per_token_values.device
    counts = (batch.sizes[:, 0] * batch.sizes[:, 1]).to(device=device, dtype=per_token_values.dtype)
    sums = torch.zeros(batch.num_images, device=device, dtype=per_token_values.dtype)
    return sums.index_add_(0, batch.image_ids.to(device), per_token_values) / counts
