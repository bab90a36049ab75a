"""Moving a PackedBatch from a DataLoader worker to the training process: one shared buffer per batch.

Every tensor of a batch is a view of one byte buffer (64-byte aligned spans, `batch_layout`), so a
batch crosses processes as one buffer; the stored REPA images of a batch (uint8, see
`nrtrain.repa`) are one more span of the same buffer, handed out as [H, W, 3] views. A new
shared-memory segment per batch costs more than building the batch (creating, mapping and faulting
in 2.6 MB on both sides), so `PackedLoader` gives its workers a pool of slots allocated once
(`SlotPool`): a worker fills a free slot, the training process reads the batch in place, and the
slot is freed when the last tensor or image of that batch is garbage. A worker that finds its slot
still held falls back to a new segment (`InBuffer`): holding batches for longer (keeping a list of
them) costs speed, never correctness, and nothing ever waits on the pool. Images decoded per step
from source files (`repa_images="source"`) are not in the buffer: they travel pickled beside it.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from nrtrain.packed import PackedBatch

BATCH_DTYPES = {"tokens": torch.float32, "positions": torch.int64, "image_ids": torch.int64, "sizes": torch.int64,
                "labels": torch.int64, "row_ids": torch.int64, "cu_seqlens": torch.int32}
REPA_SPAN = "repa_images"  # uint8 bytes of a batch's stored REPA images, image after image


def batch_layout(num_tokens: int, num_images: int, token_dim: int, repa_bytes: int = 0) -> tuple[dict, int]:
    """({span name: (byte offset, shape)}, total bytes) of one batch's buffer."""
    shapes = {"tokens": (num_tokens, token_dim), "positions": (num_tokens, 2), "image_ids": (num_tokens,),
              "sizes": (num_images, 2), "labels": (num_images,), "row_ids": (num_images,),
              "cu_seqlens": (num_images + 1,)}
    spans, size = {}, 0
    for name, dtype in BATCH_DTYPES.items():
        spans[name] = (size, shapes[name])
        size += -(-math.prod(shapes[name]) * dtype.itemsize // 64) * 64
    if repa_bytes:
        spans[REPA_SPAN] = (size, (repa_bytes,))
        size += -(-repa_bytes // 64) * 64
    return spans, size


def batch_views(buffer: torch.Tensor, spans: dict, max_seqlen: int, images: list[np.ndarray] | None = None,
                image_shapes: list[tuple[int, int]] | None = None) -> PackedBatch:
    """The PackedBatch whose tensors are views of `buffer`; its images are `images` as given, or
    views of the REPA span of the given (H, W) shapes, one after the other."""
    views = {}
    for name, (start, shape) in spans.items():
        if name != REPA_SPAN:
            dtype = BATCH_DTYPES[name]
            views[name] = buffer[start: start + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
    if image_shapes is not None:
        start = spans[REPA_SPAN][0]
        data = buffer[start: start + spans[REPA_SPAN][1][0]].numpy()
        images, at = [], 0
        for h, w in image_shapes:
            images.append(data[at: at + h * w * 3].reshape(h, w, 3))
            at += h * w * 3
    return PackedBatch(max_seqlen=max_seqlen, images=images, **views)


class SlotPool:
    """Per worker, `slots` shared byte buffers of `capacity` bytes and a busy flag for each."""

    def __init__(self, workers: int, slots: int, capacity: int) -> None:
        self.buffers = torch.empty((workers, slots, capacity), dtype=torch.uint8).share_memory_()
        self.busy = torch.zeros((workers, slots), dtype=torch.int8).share_memory_()
        self._busy = self.busy.numpy()

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._busy = self.busy.numpy()

    def __getstate__(self) -> dict:
        return {"buffers": self.buffers, "busy": self.busy}

    def claim(self, worker: int, n: int) -> int | None:
        """The slot for a worker's n-th batch, or None while the training process still holds it."""
        slot = n % self._busy.shape[1]
        if self._busy[worker, slot]:
            return None
        self._busy[worker, slot] = 1
        return slot

    def slot(self, worker: int, slot: int) -> torch.Tensor:
        return self.buffers[worker, slot]

    def release(self, worker: int, slot: int) -> None:
        self._busy[worker, slot] = 0


POOLS: dict[str, SlotPool] = {}  # pools of the loaders iterating in this process, by key


class InSlot:
    """A batch in a pool slot: pickled as where it is, unpickled (in the training process) as views
    of the slot that free it when the last of them is gone."""

    def __init__(self, key: str, worker: int, slot: int, spans: dict, size: int, max_seqlen: int,
                 images: list[np.ndarray] | None, image_shapes: list[tuple[int, int]] | None) -> None:
        self.args = (key, worker, slot, spans, size, max_seqlen, images, image_shapes)

    def __reduce__(self):
        return _batch_from_slot, self.args


def _batch_from_slot(key: str, worker: int, slot: int, spans: dict, size: int, max_seqlen: int,
                     images: list[np.ndarray] | None, image_shapes: list[tuple[int, int]] | None) -> PackedBatch:
    pool = POOLS[key]
    memory = pool.slot(worker, slot)[:size].numpy()  # a view object of its own, alive as long as the batch
    weakref.finalize(memory, pool.release, worker, slot)
    return batch_views(torch.frombuffer(memory, dtype=torch.uint8), spans, max_seqlen, images, image_shapes)


class InBuffer:
    """A batch in its own shared buffer: pickled as that one buffer, unpickled as a PackedBatch."""

    def __init__(self, storage: torch.UntypedStorage, spans: dict, max_seqlen: int,
                 images: list[np.ndarray] | None, image_shapes: list[tuple[int, int]] | None) -> None:
        self.args = (torch.empty(0, dtype=torch.uint8).set_(storage), spans, max_seqlen, images, image_shapes)

    def __reduce__(self):
        return batch_views, self.args
