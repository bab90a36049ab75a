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
statistics of the manifests (pooled when several catalogs, see `normalize`), and patchified with the
model's patch size, which must be the one the packs were built for.

Randomness. Every draw of a pack comes from one generator seeded by (seed, epoch, pack_id) (see
`pack_generator`), so a batch is a function of its cursor alone: it does not depend on the number
of workers, on which worker built it, or on whether the run was resumed.

Workers. With k DataLoader workers, worker w builds steps w, w+k, ...; the DataLoader collects
them round robin, so batches arrive in step order. The cursor is counted in the main process as
batches are handed out, which is what makes `state_dict()` exact.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from nrdata.catalog import Catalog, Normalization
from nrdata.packing.catalog_packs import open_packs
from nrdata.packing.packs_file import packs_info
from nrdata.packing.ranks import balance_ranks
from nrtrain.normalize import latent_from_moments, pooled_normalization, stored_to_float32
from nrtrain.packed import PackedBatch, check_cu_seqlens

# Tags that keep the loader's random streams apart from each other and from the packer's.
_PACK_STREAM = 0x6C6F6164  # "load"
_ORDER_STREAM = 0x6F726472  # "ordr"


def pack_generator(seed: int, epoch: int, pack_id: int) -> np.random.Generator:
    """The generator of every draw made for one pack in one epoch.

    Draw order: first `random(B) < 0.5` for the B images in pack order (an image takes its flipped
    twin when the draw is true and the twin is stored), then, for each image of a moments catalog
    in pack order, `standard_normal((C, h, w), dtype=float32)` for its latent.
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
    """

    def __init__(self, packs: str | Path, *, catalogs: list[str | Path] | None = None, patch_size: int | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epochs: int | None = None,
                 steps: int | None = None) -> None:
        super().__init__()
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
        self.normalization: Normalization = pooled_normalization(opened)
        self.channels = opened[0].manifest.encoder.channels
        self.token_dim = self.channels * self.patch_size**2
        self.digest = _packs_digest(table)
        self._catalogs = opened
        self._dtypes = [c.manifest.dtype for c in opened]
        self._moments = [c.manifest.encoder.quantity == "moments" for c in opened]
        self._row_offsets = np.array([c["row_offset"] for c in metadata["catalogs"]], np.int64)
        self._by_row = self._row_table(opened)
        self._mean = np.repeat(np.asarray(self.normalization.mean, np.float32), self.patch_size**2)
        self._std = np.repeat(np.asarray(self.normalization.std, np.float32), self.patch_size**2)

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
        self.start = 0

    def _row_table(self, catalogs) -> dict[str, np.ndarray]:
        """Per merged row id: its catalog, label, latent size and whether a twin is stored."""
        index = [c.index for c in catalogs]
        return {
            "catalog": np.concatenate([np.full(len(t), i, np.int32) for i, t in enumerate(index)]),
            "label": np.concatenate([t["label"].to_numpy() for t in index]).astype(np.int64),
            "h": np.concatenate([t["latent_h"].to_numpy() for t in index]).astype(np.int64),
            "w": np.concatenate([t["latent_w"].to_numpy() for t in index]).astype(np.int64),
            "flip": np.concatenate([t["flip"].to_numpy(zero_copy_only=False) for t in index]).astype(bool),
        }

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
        if not 0 <= position < self.num_steps:
            raise IndexError(f"position {position} is outside 0..{self.num_steps - 1}")
        epoch, step = self.cursor(position)
        packs_row = self._packs_row(epoch, step)
        row_ids = self._pack_rows[self._pack_offsets[packs_row]: self._pack_offsets[packs_row + 1]]
        return self.build(row_ids, pack_generator(self.seed, epoch, int(self._pack_ids[packs_row])))

    def build(self, row_ids: np.ndarray, generator: np.random.Generator) -> PackedBatch:
        """One PackedBatch of merged `row_ids`, drawing flips and moments noise from `generator`."""
        p = self.patch_size
        rows = self._by_row
        h, w = rows["h"][row_ids] // p, rows["w"][row_ids] // p
        lengths = h * w
        cu = np.zeros(len(row_ids) + 1, np.int64)
        np.cumsum(lengths, out=cu[1:])
        flips = (generator.random(len(row_ids)) < 0.5) & rows["flip"][row_ids]
        which = rows["catalog"][row_ids]
        local = row_ids - self._row_offsets[which]

        tokens = torch.empty((int(cu[-1]), self.token_dim), dtype=torch.float32)
        out = tokens.numpy()
        for i in range(len(row_ids)):
            k = int(which[i])
            z = stored_to_float32(self._catalogs[k].latent(int(local[i]), flip=bool(flips[i])), self._dtypes[k])
            if self._moments[k]:
                z = latent_from_moments(z, generator.standard_normal((self.channels, *z.shape[1:]), dtype=np.float32))
            hi, wi = int(h[i]), int(w[i])
            out[cu[i]: cu[i + 1]].reshape(hi, wi, self.channels, p, p)[...] = (
                z.reshape(self.channels, hi, p, wi, p).transpose(1, 3, 0, 2, 4))
        out -= self._mean
        out /= self._std

        image_ids = np.repeat(np.arange(len(row_ids)), lengths)
        within = np.arange(int(cu[-1])) - cu[:-1][image_ids]
        positions = np.stack([within // w[image_ids], within % w[image_ids]], axis=1)
        batch = PackedBatch(
            tokens=tokens,
            sizes=torch.from_numpy(np.stack([h, w], axis=1)),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            max_seqlen=int(lengths.max()),
            positions=torch.from_numpy(positions),
            image_ids=torch.from_numpy(image_ids),
            labels=torch.from_numpy(rows["label"][row_ids]),
            row_ids=torch.from_numpy(np.array(row_ids, dtype=np.int64)),  # a copy: the view is read-only
        )
        check_cu_seqlens(batch.cu_seqlens, batch.num_tokens)
        return batch

    def __getstate__(self) -> dict:
        # Workers started by spawn or forkserver get the dataset pickled: memory maps do not
        # travel, so catalogs go as paths and each worker maps the shards itself.
        state = dict(self.__dict__)
        state["_catalogs"] = [c.root for c in self._catalogs]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._catalogs = [Catalog(root) for root in self._catalogs]

    def __iter__(self) -> Iterator[PackedBatch]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        for position in range(self.start + worker, self.num_steps, workers):
            yield self.batch(position)


class PackedLoader:
    """A rank's PackedBatches through a DataLoader, with a cursor that resumes exactly.

    Iterating starts at the cursor (0, or what `load_state_dict` set) and runs to the bound; the
    cursor advances as each batch is handed out. `num_workers=0` builds batches in this process.
    """

    def __init__(self, packs: str | Path, *, catalogs: list[str | Path] | None = None, patch_size: int | None = None,
                 rank: int = 0, world_size: int = 1, seed: int = 0, epochs: int | None = None,
                 steps: int | None = None, num_workers: int = 2, pin_memory: bool = False,
                 prefetch_factor: int = 4) -> None:
        self.dataset = PackedDataset(packs, catalogs=catalogs, patch_size=patch_size, rank=rank,
                                     world_size=world_size, seed=seed, epochs=epochs, steps=steps)
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
        self.dataset.start = self.position  # read by the workers this iteration starts
        workers = self.num_workers
        loader = DataLoader(self.dataset, batch_size=None, num_workers=workers, pin_memory=self.pin_memory,
                            prefetch_factor=self.prefetch_factor if workers else None)
        for batch in loader:
            self.position += 1
            yield batch

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
