"""The packed batch: several images' tokens in one sequence, and what the model needs to keep them apart.

This is the one structure the loader, the model, the objective and the samplers share. Tokens of
an image are its latent patchified row-major (token k = row * w + col, with h, w in tokens), each
token the (C, p, p) block flattened in that order, the layout of a Conv2d patch embedding's weight.
Images follow each other; `cu_seqlens` marks where each starts.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [T, C*p*p] float: the (normalised) latents of every image, patchified
    sizes: torch.Tensor  # [B, 2] int64: (h, w) of each image in tokens
    cu_seqlens: torch.Tensor  # [B+1] int32: token offsets, cu_seqlens[0] == 0, cu_seqlens[-1] == T
    max_seqlen: int  # longest image in tokens; computed once per pack, never read back per attention call
    positions: torch.Tensor  # [T, 2] int64: (row, col) of each token inside its image
    image_ids: torch.Tensor  # [T] int64: which image each token belongs to (0..B-1)
    labels: torch.Tensor  # [B] int64: class ids (the null class for unconditional)
    row_ids: torch.Tensor | None = None  # [B] int64: merged catalog row ids, for provenance
    # uint8 [H, W, 3] per image, the pixels its latent was encoded from (flipped with it), for REPA;
    # host-side only: `to` and `pin_memory` leave them where they are
    images: list[np.ndarray] | None = None
    # tokens per image as Python ints, captured when the batch leaves the CPU, so that FLOP counts and the
    # per-image attention plan never read `sizes` back from the GPU (a host sync per micro-step)
    host_seqlens: tuple[int, ...] | None = None

    @property
    def num_images(self) -> int:
        return int(self.sizes.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def seqlens(self) -> list[int]:
        """Tokens per image as Python ints: the host-side copy when the batch has one, else read from
        `sizes` (free on the CPU, a device sync on a GPU)."""
        if self.host_seqlens is not None:
            return list(self.host_seqlens)
        return [int(h) * int(w) for h, w in self.sizes.tolist()]

    def to(self, device: torch.device | str, *, dtype: torch.dtype | None = None,
           non_blocking: bool = False) -> PackedBatch:
        host = self.host_seqlens
        if host is None and self.sizes.device.type == "cpu":
            host = tuple(self.seqlens())
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        tokens = self.tokens.to(device, dtype=dtype or self.tokens.dtype, non_blocking=non_blocking)
        return replace(self, tokens=tokens, sizes=move(self.sizes), cu_seqlens=move(self.cu_seqlens),
                       positions=move(self.positions), image_ids=move(self.image_ids), labels=move(self.labels),
                       row_ids=move(self.row_ids), host_seqlens=host)

    def with_tokens(self, tokens: torch.Tensor) -> PackedBatch:
        return replace(self, tokens=tokens)

    def pin_memory(self) -> PackedBatch:
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return replace(self, tokens=pin(self.tokens), sizes=pin(self.sizes), cu_seqlens=pin(self.cu_seqlens),
                       positions=pin(self.positions), image_ids=pin(self.image_ids), labels=pin(self.labels),
                       row_ids=pin(self.row_ids))


def patchify(latent: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[C, h*p, w*p] → [h*w, C*p*p], tokens row-major, each token in (C, p, p) order."""
    c, hp, wp = latent.shape
    p = patch_size
    if hp % p or wp % p:
        raise ValueError(f"latent {hp}x{wp} is not a multiple of patch size {p}")
    h, w = hp // p, wp // p
    return latent.reshape(c, h, p, w, p).permute(1, 3, 0, 2, 4).reshape(h * w, c * p * p)


def unpatchify(tokens: torch.Tensor, h: int, w: int, channels: int, patch_size: int) -> torch.Tensor:
    """[h*w, C*p*p] → [C, h*p, w*p], the inverse of `patchify`."""
    p = patch_size
    return tokens.reshape(h, w, channels, p, p).permute(2, 0, 3, 1, 4).reshape(channels, h * p, w * p)


def check_cu_seqlens(cu_seqlens: torch.Tensor, num_tokens: int) -> None:
    """Raise ValueError unless cu_seqlens is int32, starts at 0, strictly increases and ends at T."""
    if cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be a 1-D int32 tensor of B+1 >= 2 offsets, got "
                         f"{cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    c = cu_seqlens.detach().cpu()
    if int(c[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, starts at {int(c[0])}")
    steps = c[1:] - c[:-1]
    if bool((steps <= 0).any()):
        bad = int(torch.nonzero(steps <= 0)[0, 0])
        raise ValueError(f"cu_seqlens must strictly increase (no empty image): image {bad} has {int(steps[bad])} tokens")
    if int(c[-1]) != num_tokens:
        raise ValueError(f"cu_seqlens ends at {int(c[-1])} but the pack has {num_tokens} tokens")


def pack_latents(latents: list[torch.Tensor], labels: list[int] | torch.Tensor, patch_size: int, *,
                 row_ids: list[int] | torch.Tensor | None = None) -> PackedBatch:
    """Build a PackedBatch from per-image latents [C, h*p, w*p] (already normalised)."""
    if not latents:
        raise ValueError("a pack needs at least one image")
    token_lists, sizes = [], []
    for latent in latents:
        _, hp, wp = latent.shape
        sizes.append((hp // patch_size, wp // patch_size))
        token_lists.append(patchify(latent, patch_size))
    return packed_from_tokens(token_lists, sizes, labels, row_ids=row_ids)


def packed_from_tokens(token_lists: list[torch.Tensor], sizes: list[tuple[int, int]],
                       labels: list[int] | torch.Tensor, *, row_ids: list[int] | torch.Tensor | None = None) -> PackedBatch:
    """Build a PackedBatch from per-image token tensors [h*w, D] and their (h, w)."""
    lengths = [h * w for h, w in sizes]
    for (h, w), tokens in zip(sizes, token_lists):
        if tokens.shape[0] != h * w:
            raise ValueError(f"an image of {h}x{w} tokens has {tokens.shape[0]} token rows")
    sizes_t = torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2)
    lengths_t = sizes_t[:, 0] * sizes_t[:, 1]
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths_t, 0).to(torch.int32)
    positions = torch.cat([grid_positions(h, w) for h, w in sizes])
    image_ids = torch.repeat_interleave(torch.arange(len(lengths)), lengths_t)
    labels_t = torch.as_tensor(labels, dtype=torch.int64).reshape(-1)
    rows = None if row_ids is None else torch.as_tensor(row_ids, dtype=torch.int64).reshape(-1)
    batch = PackedBatch(tokens=torch.cat(token_lists), sizes=sizes_t, cu_seqlens=cu, max_seqlen=max(lengths),
                        positions=positions, image_ids=image_ids, labels=labels_t, row_ids=rows,
                        host_seqlens=tuple(lengths))
    check_cu_seqlens(batch.cu_seqlens, batch.num_tokens)
    return batch


def grid_positions(h: int, w: int) -> torch.Tensor:
    """[h*w, 2] (row, col) of each token of an h×w image, row-major."""
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    return torch.stack([rows, cols], dim=1)
