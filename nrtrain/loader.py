"""The packed data loader: a packs file and its catalogs in, one PackedBatch per training step out.

    loader = PackedLoader("packs.parquet", rank=rank, world_size=world_size, seed=0, steps=400_000)
    loader.load_state_dict(checkpoint["loader"])          # optional: resume where a run stopped
    for batch in loader:                                  # PackedBatch, tokens float32
        ...
        checkpoint["loader"] = loader.state_dict()        # the cursor of the next batch

What a rank reads, in order. The packs file holds one packing per epoch. For each epoch, rank `r`
trains the packs the file assigned to it step by step (its `step`/`rank` columns) when the file
was balanced for this world size, else the packs are balanced here the same way, by attention
cost (`nrdata.packing.balance_ranks`, with the file's packing seed): every rank gets the same
number of steps, ranks never share a pack, and the `P mod W` left-over packs sit the epoch out.
Epochs follow in the file's order. Asking for more epochs (or steps) than the file holds reuses its
packings again, with the steps in a new order and new random draws.

What a batch is. Latents are memory-mapped views of the catalogs' shards (no file per image),
converted to float32; a stored flipped twin is taken with probability 1/2; for moments catalogs a
latent is sampled, z = mean + exp(logvar / 2) * eps; then z_norm = (z - mean) / std with the
statistics of the manifests (pooled when several catalogs, see `nrtrain.normalization`), and patchified with the
model's patch size, which must be the one the packs were built for. With `repa_images` a batch
also carries each image's pixels for REPA (`PackedBatch.images`, uint8 [H, W, 3]), mirrored when the
flip draw took the twin, so the pixels always match the latent: "stored" reads the REPA images the
catalogs keep beside the latents (`nr encode --repa-pixels`), memory-mapped like them and copied into
the batch's buffer by one compiled pass; "source" decodes each row's source image and resizes it by
its row's policy at every step (`nrtrain.repa.SourcePixels`, under the manifests' source_root or
`image_root`), for catalogs encoded without them.

Randomness. Every draw of a pack comes from one generator seeded by (seed, epoch, pack_id) (see
`pack_generator`), so a batch is a function of its cursor alone: it does not depend on the number
of workers, on which worker built it, or on whether the run was resumed.

Workers. With k DataLoader workers, worker w builds steps w, w+k, ...; the DataLoader collects
them round robin, so batches arrive in step order. The cursor is counted in the main process as
batches are handed out, which is what makes `state_dict()` exact. A batch is built by one compiled
pass over the shard maps (`_fill_pack`) into a shared-memory slot that the training process reads
in place (`nrtrain.batch_transfer`).

Damaged data. Before a latent's values enter a batch, its bytes are checked against the CRC-32 the
writer recorded, inside the same compiled pass (`nrdata.catalog.checksum`, PCLMULQDQ-folded on
x86): the half read (latent or twin) against the shard's CRC of that half, which the loader has
checked, when it was built, to chain into the index's checksum of the row. Shards written before
they kept per-half CRCs are checked on both halves at once. A half is checked the first time this
rank reads it: flags in shared memory, common to the rank's workers, remember what was found
intact, so later epochs pay a byte lookup (`bench/loader_throughput.py` measures both). A mismatch
stops the batch with a CorruptLatentError naming the shard file, the row and its key, so no
training step ever sees a damaged latent. Structural damage (an index part copied, deleted or
truncated, a shard missing, truncated, or whose offsets disagree with the index) is refused when
the loader is built, before any batch (`nrdata.catalog.reader`). Stored REPA images are checked
the same way, against the CRC-32 their shard keeps.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from numba import njit
from numba.typed import List
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nrdata.catalog import Catalog, CatalogIntegrityError, Normalization, layout
from nrdata.catalog.checksum import crc32, crc32_combine_gen, crc32_combine_op
from nrdata.catalog.reader import CorruptLatentError, ShardView, rows_by_shard
from nrdata.packing.catalog_packs import open_packs
from nrdata.packing.packs_file import packs_info
from nrdata.packing.ranks import balance_ranks
from nrtrain.batch_transfer import POOLS, REPA_SPAN, InBuffer, InSlot, SlotPool, batch_layout, batch_views
from nrtrain.latent_kernels import DTYPE_CODES, ITEMSIZES, decode, sample_moments, write_tokens
from nrtrain.normalization import pooled_normalization
from nrtrain.packed import PackedBatch
from nrtrain.repa import SourcePixels, stored_repa_rows

# Tags that keep the loader's random streams apart from each other and from the packer's.
_PACK_STREAM = 0x6C6F6164  # "load"
_ORDER_STREAM = 0x6F726472  # "ordr"


def pack_generator(seed: int, epoch: int, pack_id: int) -> np.random.Generator:
    """The generator of every draw made for one pack in one epoch.

    Draw order: first `random(B) < 0.5` for the B images in pack order (an image takes its flipped
    twin when the draw is true and the twin is stored), then one `standard_normal(N, dtype=float32)`
    whose consecutive [C, h, w] blocks are the noise of the moments images, in pack order (the same
    numbers as one such draw per image).
    """
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch), int(pack_id), _PACK_STREAM]))


def _column(table: pa.Table, name: str, fill: int | None = None) -> np.ndarray:
    column = table.column(name)
    if fill is not None:
        column = pc.fill_null(column, fill)
    return column.to_numpy()


def _rank_packs(table: pa.Table, epoch: int, world_size: int, rank: int) -> np.ndarray:
    """Rows of the packs table that `rank` trains in `epoch`, in step order."""
    rows = np.flatnonzero(_column(table, "epoch") == epoch)
    rows = rows[np.argsort(_column(table, "pack_id")[rows], kind="stable")]
    info = packs_info(table)
    balanced_for = dict(zip(info.get("epochs", []), info.get("world_size", [])))
    ranks = _column(table, "rank", -1)[rows]
    if balanced_for.get(epoch) == world_size and (ranks >= 0).any():
        steps = _column(table, "step", -1)[rows]
        counts = np.bincount(ranks[ranks >= 0], minlength=world_size)
        mine = rows[ranks == rank]
        order = np.argsort(steps[ranks == rank], kind="stable")
        if counts.size != world_size or (counts != counts[0]).any() or not np.array_equal(
                steps[ranks == rank][order], np.arange(counts[0])):
            raise ValueError(f"the packs file's step/rank columns of epoch {epoch} do not give every one of "
                             f"{world_size} ranks steps 0..S-1 (packs per rank: {counts.tolist()}); re-run `nr pack`")
        return mine[order]
    assignment = balance_ranks(_column(table, "cost")[rows], _column(table, "tokens")[rows], world_size,
                               seed=int(info.get("seed", 0)), epoch=int(epoch))
    return rows[assignment.rank_packs(rank)]


def _packs_digest(table: pa.Table) -> str:
    """Identifies the packs a cursor points into (which rows, in which pack, in which epoch)."""
    digest = hashlib.blake2b(digest_size=8)
    for name in ("epoch", "pack_id"):
        digest.update(np.ascontiguousarray(_column(table, name)).tobytes())
    row_ids = table.column("row_ids").combine_chunks()
    digest.update(np.ascontiguousarray(row_ids.flatten().to_numpy()).tobytes())
    digest.update(np.ascontiguousarray(row_ids.value_lengths().to_numpy()).tobytes())
    return digest.hexdigest()


class PackedDataset(IterableDataset):
    """The packs of one rank as PackedBatches; iterate it directly or through `PackedLoader`.

    `catalogs` overrides the catalog paths recorded in the packs file (catalogs that moved).
    `patch_size` defaults to the one the packs were built for and must equal it. `epochs` counts
    epochs to read (default: those the file holds); `steps` stops after that many batches
    counted from the first step of the first epoch. Positions run 0 .. num_steps - 1.
    `repa_images` adds each image's pixels to every batch (REPA): "stored" from the catalogs'
    REPA images (every catalog must store them; with `repa_patch_size`, the REPA encoder's patch size,
    at repa_patch_size / patch_size pixels per latent cell), "source" decoded from the source images
    under `image_root` when given, else under each catalog's source_root. `verify=False` skips the
    checksum of the rows read (see "Damaged data" above; for measuring what the check costs).
    """

    def __init__(self, packs: str | Path, *, catalogs: list[str | Path] | None = None, patch_size: int | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epochs: int | None = None,
                 steps: int | None = None, repa_images: str | None = None, image_root: str | Path | None = None,
                 repa_patch_size: int | None = None, verify: bool = True) -> None:
        super().__init__()
        if repa_images not in (None, "stored", "source"):
            raise ValueError(f"repa_images must be None, 'stored' or 'source', got {repa_images!r}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        table, metadata, opened = open_packs(packs, catalogs)
        self.packs_path = Path(packs)
        self.rank, self.world_size, self.seed = int(rank), int(world_size), int(seed)

        packed_for = int(metadata.get("patch_size", 1))
        self.patch_size = packed_for if patch_size is None else int(patch_size)
        if self.patch_size != packed_for:
            raise ValueError(f"{packs}: packs were built for patch size {packed_for} (pack token counts and the "
                             f"max_tokens budget are in those tokens) but the model uses {self.patch_size}; re-run "
                             f"`nr pack ... --patch-size {self.patch_size}`")
        self.catalogs = opened  # checked against the packs' fingerprints by open_packs
        self.normalization: Normalization = pooled_normalization(opened)
        self.channels = opened[0].manifest.encoder.channels
        self.token_dim = self.channels * self.patch_size**2
        self.digest = _packs_digest(table)
        self._codes = np.array([DTYPE_CODES[c.manifest.dtype] for c in opened], np.int64)
        self._moments = np.array([c.manifest.encoder.quantity == "moments" for c in opened])
        self.set_normalization(self.normalization)
        self._rows, self._shard_paths = _row_table(opened, self.patch_size, self._moments)
        self._catalog_starts = np.cumsum([0] + [len(c) for c in opened])
        self.verify = bool(verify)
        # halves found intact by this rank so far (bit 1: latent, bit 2: twin, bit 4: the stored REPA
        # image); shared memory, so that forked workers share it
        self._verified = torch.zeros(len(self._rows["crc"]), dtype=torch.uint8).share_memory_()
        self._buffers: List | None = None  # the shards' bytes, memory-mapped by each process itself
        self._source_pixels = SourcePixels(opened, image_root) if repa_images == "source" else None
        self._repa = (stored_repa_rows(opened, self.patch_size, repa_patch_size)
                      if repa_images == "stored" else None)
        self._repa_buffers: List | None = None  # the shards' REPA images, memory-mapped by each process itself

        row_ids = table.column("row_ids").combine_chunks()
        self._pack_rows = row_ids.flatten().to_numpy()
        self._pack_offsets = np.concatenate([[0], np.cumsum(row_ids.value_lengths().to_numpy())]).astype(np.int64)
        self._pack_ids = _column(table, "pack_id")
        self.file_epochs = sorted(int(e) for e in np.unique(_column(table, "epoch")))
        self._schedule = [_rank_packs(table, e, self.world_size, self.rank) for e in self.file_epochs]
        per_epoch = np.array([len(s) for s in self._schedule], np.int64)
        if per_epoch.sum() == 0:
            raise ValueError(f"{packs}: {table.num_rows} packs cannot give each of {world_size} ranks a step")
        self._epoch_starts = np.concatenate([[0], np.cumsum(per_epoch)])
        self.num_steps = self._bounded(epochs, steps)
        self.start = 0  # position the next iteration starts at
        self.pool_key: str | None = None  # set by PackedLoader for the workers it starts
        self.batch_capacity = batch_layout(int(pc.max(table["tokens"]).as_py()), int(pc.max(table["images"]).as_py()),
                                           self.token_dim, self._most_repa_bytes())[1]
        if self.num_steps:  # loads the compiled kernels now, before any worker forks
            self.batch(0)

    def set_normalization(self, stats) -> None:
        """Normalise with `stats` (anything with per-channel `mean` and `std`, e.g. a scalar run's
        LatentScaling) in place of the catalogs' pooled statistics. Call before iterating: workers
        take the vectors with them when they start."""
        self.normalization = stats
        self._mean = np.asarray(stats.mean, np.float32)
        self._inv_std = (1.0 / np.asarray(stats.std, np.float64)).astype(np.float32)

    def _bounded(self, epochs: int | None, steps: int | None) -> int:
        if epochs is not None and epochs < 1 or steps is not None and steps < 0:
            raise ValueError(f"epochs must be >= 1 and steps >= 0, got epochs={epochs}, steps={steps}")
        if epochs is None and steps is not None:
            return int(steps)
        n = len(self.file_epochs) if epochs is None else int(epochs)
        total = self.position(n, 0)
        return total if steps is None else min(total, int(steps))

    # -- cursor ----------------------------------------------------------------------------

    def steps_in_epoch(self, epoch: int) -> int:
        i = epoch % len(self.file_epochs)
        return int(self._epoch_starts[i + 1] - self._epoch_starts[i])

    def cursor(self, position: int) -> tuple[int, int]:
        """(epoch, step inside the epoch) of the batch at `position`; epochs count from 0."""
        per_cycle = int(self._epoch_starts[-1])
        cycle, rest = divmod(int(position), per_cycle)
        i = int(np.searchsorted(self._epoch_starts, rest, side="right")) - 1
        return cycle * len(self.file_epochs) + i, rest - int(self._epoch_starts[i])

    def position(self, epoch: int, step: int) -> int:
        """The inverse of `cursor`; (epoch, 0) with epoch one past the last is the end of a pass."""
        cycle, i = divmod(int(epoch), len(self.file_epochs))
        if not 0 <= step < max(self.steps_in_epoch(epoch), 1):
            raise ValueError(f"epoch {epoch} has {self.steps_in_epoch(epoch)} steps for rank {self.rank}; step {step} "
                             "is not one of them")
        return cycle * int(self._epoch_starts[-1]) + int(self._epoch_starts[i]) + int(step)

    def _packs_row(self, epoch: int, step: int) -> int:
        n = len(self.file_epochs)
        schedule = self._schedule[epoch % n]
        if epoch >= n:  # a reused packing: same steps, new order (the same on every rank)
            order = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, _ORDER_STREAM]))
            step = int(order.permutation(len(schedule))[step])
        return int(schedule[step])

    # -- batches ---------------------------------------------------------------------------

    def batch(self, position: int) -> PackedBatch:
        """The batch at `position`, built from scratch (what iteration yields there)."""
        return self._batch(position, None)[0]

    def _batch(self, position: int, slot: torch.Tensor | None) -> tuple[PackedBatch, dict, int]:
        if not 0 <= position < self.num_steps:
            raise IndexError(f"position {position} is outside 0..{self.num_steps - 1}")
        epoch, step = self.cursor(position)
        packs_row = self._packs_row(epoch, step)
        row_ids = self._pack_rows[self._pack_offsets[packs_row]: self._pack_offsets[packs_row + 1]]
        return self.build(row_ids, pack_generator(self.seed, epoch, int(self._pack_ids[packs_row])), slot)

    def build(self, row_ids: np.ndarray, generator: np.random.Generator,
              slot: torch.Tensor | None = None) -> tuple[PackedBatch, dict, int]:
        """One PackedBatch of merged `row_ids`, drawing flips and moments noise from `generator`.

        Written into `slot` (bytes) when one is given, else into a new buffer (in shared memory
        inside a DataLoader worker). Returns (batch, its layout, its bytes).
        """
        rows = self._rows
        draws = generator.random(len(row_ids))
        noise = generator.standard_normal(int(rows["noise"][row_ids].sum()), dtype=np.float32)
        repa_bytes = 0 if self._repa is None else int(self._repa["nbytes"][row_ids].sum())
        spans, size = batch_layout(int(rows["tokens"][row_ids].sum()), len(row_ids), self.token_dim, repa_bytes)
        if slot is not None and size > slot.numel():
            raise ValueError(f"a batch of {size} bytes does not fit a slot of {slot.numel()}")
        if slot is None:
            slot = torch.empty(size, dtype=torch.uint8)
            if get_worker_info() is not None:  # fill shared memory directly rather than copy into it when sent
                slot.share_memory_()
        batch = batch_views(slot, spans, 0)
        longest = _fill_pack(
            self._shard_buffers(), row_ids, rows["catalog"], rows["h"], rows["w"], rows["flip"], rows["shard"],
            rows["offset"], rows["label"], rows["crc"], rows["halves"], self._verified.numpy(), self.verify, self._codes,
            self._moments, draws, noise, self.patch_size, self.channels, self._mean, self._inv_std,
            batch.tokens.numpy().reshape(-1), batch.positions.numpy(), batch.image_ids.numpy(), batch.sizes.numpy(),
            batch.labels.numpy(), batch.row_ids.numpy(), batch.cu_seqlens.numpy())
        if longest < 0:
            self._refuse_row(int(row_ids[-longest - 1]))
        batch.max_seqlen = longest
        flips = (draws < 0.5) & rows["flip"][row_ids]
        if self._source_pixels is not None:
            batch.images = [self._source_pixels.pixels(r, flip=f) for r, f in zip(row_ids.tolist(), flips.tolist())]
        if self._repa is not None:
            repa = self._repa
            start = spans[REPA_SPAN][0]
            bad = _copy_repa_images(self._repa_shard_buffers(), row_ids, rows["shard"], repa["offset"], repa["h"],
                                    repa["w"], repa["crc"], self._verified.numpy(), self.verify, flips,
                                    slot[start: start + repa_bytes].numpy())
            if bad >= 0:
                self._refuse_repa_image(int(row_ids[bad]))
            batch = batch_views(slot, spans, longest, image_shapes=self.image_shapes(row_ids))
        return batch, spans, size

    def image_shapes(self, row_ids: np.ndarray) -> list[tuple[int, int]] | None:
        """(H, W) of the stored REPA images of `row_ids`, as a batch's REPA span holds them; None without."""
        if self._repa is None:
            return None
        return list(zip(self._repa["h"][row_ids].tolist(), self._repa["w"][row_ids].tolist()))

    def _most_repa_bytes(self) -> int:
        """The largest REPA span of any pack (0 without stored REPA images): what a pool slot must hold."""
        if self._repa is None or not len(self._pack_rows):
            return 0
        per_row = self._repa["nbytes"][self._pack_rows]
        return int(np.add.reduceat(per_row, self._pack_offsets[:-1][np.diff(self._pack_offsets) > 0]).max())

    def _repa_shard_buffers(self) -> List:
        """Every shard's REPA image bytes, in shard-number order."""
        if self._repa_buffers is None:
            buffers = List()
            for path in self._shard_paths:
                buffers.append(ShardView(path).repa[1])
            self._repa_buffers = buffers
        return self._repa_buffers

    def _refuse_repa_image(self, row: int) -> None:
        k = int(np.searchsorted(self._catalog_starts, row, side="right")) - 1
        catalog, local = self.catalogs[k], row - int(self._catalog_starts[k])
        entry = catalog.index.slice(local, 1).to_pylist()[0]
        raise CorruptLatentError(
            f"shard {catalog.root / layout.SHARD_DIR / entry['shard']} row {entry['shard_row']} (catalog row {local}, "
            f"key {entry['key']}): its REPA image does not match the checksum recorded when it was written; run "
            f"`nr catalog validate {catalog.root}`, then restore the shard from a backup or re-encode the catalog")

    def _refuse_row(self, row: int) -> None:
        """Raise the CorruptLatentError of merged row `row`, whose checksum the compiled pass found wrong."""
        k = int(np.searchsorted(self._catalog_starts, row, side="right")) - 1
        catalog, local = self.catalogs[k], row - int(self._catalog_starts[k])
        catalog.verify_row(local)  # zlib agrees before a run is stopped: raises CorruptLatentError
        raise RuntimeError(f"the loader's checksum of row {local} of {catalog.root} disagrees with zlib's, which finds "
                           "the row intact; this is a bug in nr (pass verify=False to the loader to go on)")

    def _shard_buffers(self) -> List:
        """Latent and twin bytes of every shard (2s and 2s+1; an empty array where no twins are stored)."""
        if self._buffers is None:
            none = np.empty(0, np.uint8)
            none.flags.writeable = False  # one element type for the typed list: read-only like the maps
            buffers = List()
            for path in self._shard_paths:
                view = ShardView(path)
                buffers.append(view.latent[1])
                buffers.append(none if view.flip is None else view.flip[1])
            self._buffers = buffers
        return self._buffers

    def __getstate__(self) -> dict:
        # Workers started by spawn or forkserver get the dataset pickled: memory maps do not
        # travel, so each such worker maps the shards itself.
        return {**self.__dict__, "_buffers": None, "_repa_buffers": None}

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        if info is None:
            for position in range(self.start, self.num_steps):
                yield self.batch(position)
            return
        pool = POOLS.get(self.pool_key)  # absent when the workers were not forked from a PackedLoader
        for n, position in enumerate(range(self.start + info.id, self.num_steps, info.num_workers)):
            slot = None if pool is None else pool.claim(info.id, n)
            if slot is None:
                batch, spans, _ = self._batch(position, None)
                stored = self.image_shapes(batch.row_ids.numpy())
                yield InBuffer(batch.tokens.untyped_storage(), spans, batch.max_seqlen,
                               None if stored else batch.images, stored)
            else:
                batch, spans, size = self._batch(position, pool.slot(info.id, slot))
                stored = self.image_shapes(batch.row_ids.numpy())
                yield InSlot(self.pool_key, info.id, slot, spans, size, batch.max_seqlen,
                             None if stored else batch.images, stored)


@njit(cache=True, nogil=True)
def _fill_pack(buffers, row_ids, catalog_of, heights, widths, has_twin, shard_of, byte_offset, label_of, crcs,
               halves, verified, verify, codes, moments, draws, noise, patch, channels, mean, inv_std, tokens,
               positions, image_ids, sizes, labels, out_row_ids, cu_seqlens):
    """Every array of one pack, straight from the shards' bytes; returns its longest image in tokens,
    or -(j + 1) when image j's bytes do not match their checksum (the batch is then unusable).

    Image j is row row_ids[j]: its flipped twin when draws[j] < 0.5 and one is stored; for a moments
    catalog, a latent sampled with the next C*h*w values of `noise`. With `verify`, the half used
    is checked before it is used unless `verified` marks it: against crcs[r, half] where `halves[r]`,
    else both halves chained against crcs[r, 0] (shards without per-half CRCs).
    """
    p = patch
    largest = 0
    for j in range(row_ids.shape[0]):
        largest = max(largest, heights[row_ids[j]] * widths[row_ids[j]])
    z = np.empty(2 * channels * largest, np.float32)
    token, noise_at, longest = 0, 0, 0
    cu_seqlens[0] = 0
    for j in range(row_ids.shape[0]):
        r = row_ids[j]
        k = catalog_of[r]
        values = channels * heights[r] * widths[r]
        stored = 2 * values if moments[k] else values
        twin = 1 if draws[j] < 0.5 and has_twin[r] else 0
        start = byte_offset[r]
        end = start + stored * ITEMSIZES[codes[k]]
        if verify and not verified[r] & (1 << twin):
            if halves[r]:
                if crc32(buffers[2 * shard_of[r] + twin][start:end], 0) != crcs[r, twin]:
                    return -(j + 1)
                verified[r] |= 1 << twin
            else:
                crc = crc32(buffers[2 * shard_of[r]][start:end], 0)
                if has_twin[r]:
                    crc = crc32(buffers[2 * shard_of[r] + 1][start:end], crc)
                if crc != crcs[r, 0]:
                    return -(j + 1)
                verified[r] = 3
        decode(buffers[2 * shard_of[r] + twin][start:end], codes[k], stored, z)
        if moments[k]:
            sample_moments(z, values, noise[noise_at: noise_at + values])
            noise_at += values
        h, w = heights[r] // p, widths[r] // p
        write_tokens(z, channels, h, w, p, token, mean, inv_std, tokens)
        for t in range(h * w):
            positions[token + t, 0] = t // w
            positions[token + t, 1] = t % w
            image_ids[token + t] = j
        sizes[j, 0], sizes[j, 1] = h, w
        labels[j] = label_of[r]
        out_row_ids[j] = r
        token += h * w
        cu_seqlens[j + 1] = token
        longest = max(longest, h * w)
    return longest


@njit(cache=True, nogil=True)
def _copy_repa_images(buffers, row_ids, shard_of, offsets, heights, widths, crcs, verified, verify, flips, out):
    """The stored REPA images of `row_ids`, one after the other into `out`, mirrored left-right where
    `flips` says (the image of the flipped twin); returns -1, or the first j whose image does not match
    its CRC-32 (checked with `verify` the first time this rank reads it: bit 4 of `verified`)."""
    at = 0
    for j in range(row_ids.shape[0]):
        r = row_ids[j]
        source = buffers[shard_of[r]]
        start, h, w = offsets[r], heights[r], widths[r]
        if verify and not verified[r] & 4:
            if crc32(source[start: start + h * w * 3], 0) != crcs[r]:
                return j
            verified[r] |= 4
        if flips[j]:
            for y in range(h):
                line = start + y * w * 3
                for x in range(w):
                    src = line + (w - 1 - x) * 3
                    dst = at + (y * w + x) * 3
                    out[dst] = source[src]
                    out[dst + 1] = source[src + 1]
                    out[dst + 2] = source[src + 2]
        else:
            out[at: at + h * w * 3] = source[start: start + h * w * 3]
        at += h * w * 3
    return -1


def _row_table(catalogs: list[Catalog], patch: int, moments: np.ndarray) -> tuple[dict[str, np.ndarray], list[Path]]:
    """Per merged row id: its catalog, label, latent size, whether a twin is stored, where its bytes are
    (shard number, byte offset; a twin sits at the same offset of the twin column), its checksums
    (`crc` [latent, twin] when `halves`, else [both chained, 0]), its tokens and how many noise values
    it draws. Also the shard paths in shard-number order. Narrow integers: the table has a row per
    latent (millions for ImageNet's three variants), shared by forked workers.

    Every row's byte range is checked against its shard here, once: the compiled pass trusts them
    (a wrong offset would read outside the map); so are the shard's per-half checksums against the
    index's."""
    columns = {name: [] for name in ("catalog", "label", "h", "w", "flip", "shard", "offset", "crc", "halves",
                                     "tokens", "noise")}
    paths = []
    for number, cat in enumerate(catalogs):
        index = cat.index
        names, shard_of, shard_rows_of = rows_by_shard(index)
        shard_rows = index["shard_row"].to_numpy()
        h, w = index["latent_h"].to_numpy().astype(np.int32), index["latent_w"].to_numpy().astype(np.int32)
        flip = index["flip"].to_numpy(zero_copy_only=False).astype(bool)
        nbytes = h.astype(np.int64) * w * cat.manifest.encoder.stored_channels * cat.manifest.itemsize
        offset = np.empty(len(index), np.int64)
        chained = index["crc32"].to_numpy().astype(np.uint32)
        crc = np.stack([chained, np.zeros_like(chained)], axis=1)
        halves = np.zeros(len(index), bool)
        # the operator that chains a twin's CRC after its latent's depends on the length only
        lengths, which = np.unique(nbytes, return_inverse=True)
        ops = np.array([crc32_combine_gen(int(n)) for n in lengths], np.uint32)[which]
        for name, rows in zip(names, shard_rows_of):
            path = cat.root / layout.SHARD_DIR / name
            view = ShardView(path)
            offset[rows] = _byte_ranges(cat, path, view, rows, shard_rows[rows], nbytes[rows], flip[rows])
            if view.half_crcs is not None:
                crc[rows] = _half_crcs(cat, path, view, rows, shard_rows[rows], ops[rows], flip[rows], chained[rows])
                halves[rows] = True
            paths.append(path)
        columns["catalog"].append(np.full(len(index), number, np.int32))
        columns["label"].append(index["label"].to_numpy().astype(np.int32))
        columns["h"].append(h)
        columns["w"].append(w)
        columns["flip"].append(flip)
        columns["shard"].append((shard_of + len(paths) - len(names)).astype(np.int32))
        columns["offset"].append(offset)
        columns["crc"].append(crc)
        columns["halves"].append(halves)
        columns["tokens"].append((h // patch) * (w // patch))
        columns["noise"].append(h * w * cat.manifest.encoder.channels * int(moments[number]))
    return {name: np.concatenate(parts) for name, parts in columns.items()}, paths


def _byte_ranges(cat: Catalog, path: Path, view: ShardView, rows: np.ndarray, shard_rows: np.ndarray,
                 nbytes: np.ndarray, flip: np.ndarray) -> np.ndarray:
    """Start offsets of `rows` (catalog rows stored in `view`) after checking that each points at a
    shard row holding exactly the bytes its index row describes, twin included."""
    offsets, data = view.latent

    def refuse(i: int, what: str) -> None:
        row = int(rows[i])
        key = cat.index["key"][row].as_py()
        raise CatalogIntegrityError(
            f"shard {path} row {int(shard_rows[i])} (catalog row {row}, key {key}): {what}; the shard or its index "
            f"part was damaged or replaced: run `nr catalog validate {cat.root}`, then restore the shard from a "
            "backup or re-encode the catalog")

    outside = np.flatnonzero((shard_rows < 0) | (shard_rows >= view.num_rows))
    if outside.size:
        refuse(int(outside[0]), f"the index points at a row the shard does not have (it holds {view.num_rows})")
    start, end = offsets[shard_rows], offsets[shard_rows + 1]
    wrong = np.flatnonzero((end - start != nbytes) | (start < 0) | (end > data.size))
    if wrong.size:
        i = int(wrong[0])
        refuse(i, f"it holds {int(end[i] - start[i])} bytes where the index row needs {int(nbytes[i])}")
    if flip.any():
        if view.flip is None:
            refuse(int(np.argmax(flip)), "the index says a flipped twin is stored, the shard holds none")
        if not np.array_equal(view.flip[0], offsets) or offsets[-1] > view.flip[1].size:
            refuse(int(np.argmax(flip)), "the flipped twins are not laid out like the latents")
    return start


def _half_crcs(cat: Catalog, path: Path, view: ShardView, rows: np.ndarray, shard_rows: np.ndarray,
               ops: np.ndarray, flip: np.ndarray, chained: np.ndarray) -> np.ndarray:
    """[latent, twin] CRC-32 of `rows` as the shard keeps them, after checking that they chain into
    the checksum the index recorded (arithmetic on the checksums: no latent bytes are read)."""
    latent, twin = view.half_crcs
    crc = np.zeros((len(rows), 2), np.uint32)
    crc[:, 0] = latent[shard_rows]
    if twin is not None:
        crc[:, 1] = twin[shard_rows]
    bad = _unchained(crc, ops, flip, chained)
    if bad >= 0:
        row = int(rows[bad])
        raise CatalogIntegrityError(
            f"shard {path} row {int(shard_rows[bad])} (catalog row {row}, key {cat.index['key'][row].as_py()}): the "
            f"checksums the shard keeps do not match its index part; the shard was damaged or replaced: run "
            f"`nr catalog validate {cat.root}`, then restore the shard from a backup or re-encode the catalog")
    return crc


@njit(cache=True, nogil=True)
def _unchained(crc, ops, flip, chained):
    """The first i whose halves do not chain into chained[i], or -1."""
    for i in range(crc.shape[0]):
        whole = crc32_combine_op(ops[i], crc[i, 0], crc[i, 1]) if flip[i] else crc[i, 0]
        if whole != chained[i]:
            return i
    return -1


def _worker_message(exc: Exception) -> str:
    """The message an exception was raised with in a DataLoader worker: the DataLoader re-raises it
    here with the worker's whole traceback as its text; the user needs the last line."""
    text = str(exc)
    marker = f"{type(exc).__name__}: "
    if text.startswith("Caught ") and marker in text:
        return text.rsplit(marker, 1)[1].strip()
    return text


class PackedLoader:
    """A rank's PackedBatches through a DataLoader, with a cursor that resumes exactly.

    Iterating starts at the cursor (0, or what `load_state_dict` set) and runs to the bound; the
    cursor advances as each batch is handed out. `num_workers=0` builds batches in this process.
    """

    def __init__(self, packs: str | Path, *, catalogs: list[str | Path] | None = None, patch_size: int | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epochs: int | None = None,
                 steps: int | None = None, num_workers: int = 2, pin_memory: bool = False,
                 prefetch_factor: int = 2, repa_images: str | None = None, image_root: str | Path | None = None,
                 repa_patch_size: int | None = None, verify: bool = True) -> None:
        self.dataset = PackedDataset(packs, catalogs=catalogs, patch_size=patch_size, rank=rank,
                                     world_size=world_size, seed=seed, epochs=epochs, steps=steps,
                                     repa_images=repa_images, image_root=image_root,
                                     repa_patch_size=repa_patch_size, verify=verify)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.prefetch_factor = int(prefetch_factor)
        self.position = 0  # batches handed out so far: the position of the next one

    def __len__(self) -> int:
        """Batches in the whole bound, from position 0 (`position` of them are behind the cursor)."""
        return self.dataset.num_steps

    @property
    def normalization(self) -> Normalization:
        return self.dataset.normalization

    @property
    def epoch(self) -> int:
        return self.dataset.cursor(self.position)[0]

    @property
    def step(self) -> int:
        return self.dataset.cursor(self.position)[1]

    def __iter__(self) -> Iterator[PackedBatch]:
        dataset, workers = self.dataset, self.num_workers
        key = uuid.uuid4().hex
        if workers:
            POOLS[key] = SlotPool(workers, self.prefetch_factor * workers + 2, dataset.batch_capacity)
        # the workers take the start position and the pool key with them when they start, in iter()
        dataset.start, dataset.pool_key = self.position, key
        try:
            try:
                batches = iter(DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                                          prefetch_factor=self.prefetch_factor if workers else None))
            finally:
                dataset.pool_key = None
            try:
                for batch in batches:
                    self.position += 1
                    yield batch
            except CatalogIntegrityError as exc:
                raise type(exc)(_worker_message(exc)) from None
        finally:
            POOLS.pop(key, None)

    def state_dict(self) -> dict:
        epoch, step = self.dataset.cursor(self.position)
        d = self.dataset
        return {"epoch": epoch, "step": step, "position": self.position, "seed": d.seed, "rank": d.rank,
                "world_size": d.world_size, "packs_digest": d.digest}

    def load_state_dict(self, state: dict) -> None:
        d = self.dataset
        for key in ("seed", "rank", "world_size", "packs_digest"):
            mine = getattr(d, "digest" if key == "packs_digest" else key)
            if key in state and state[key] != mine:
                raise ValueError(f"the loader state was saved with {key}={state[key]!r} but this loader has {mine!r}; "
                                 "a cursor only resumes the same packs file, seed and ranks")
        position = d.position(int(state["epoch"]), int(state["step"]))
        if "position" in state and int(state["position"]) != position:
            raise ValueError(f"loader state epoch {state['epoch']} step {state['step']} is position {position}, "
                             f"but it records position {state['position']}")
        self.position = position
