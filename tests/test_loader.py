"""The packed loader: exact tokens, flips and moments draws, ranks, workers, resuming, refusals."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from catalog_factory import make_manifest, make_rows, write_catalog
from nrdata.catalog import Catalog, Normalization
from nrdata.catalog.manifest import write_manifest
from nrdata.packing.catalog_packs import PacksMismatchError, locate, open_packs, pack_catalogs, write_pack_result
from nrtrain.loader import PackedDataset, PackedLoader, pack_generator
from nrtrain.normalization import NormalizationNotReadyError
from nrtrain.packed import check_cu_seqlens, pack_latents

SEED = 7


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    kinds = {
        "flip_bf16": make_manifest(dtype="bfloat16", flip="store"),
        "plain_f16": make_manifest(dtype="float16", flip="none"),
        "moments": make_manifest(dtype="float32", flip="none", quantity="moments"),
        "moments_flip": make_manifest(dtype="bfloat16", flip="store", quantity="moments"),
        "pixels_u8": make_manifest(dtype="uint8", flip="store"),
    }
    for i, (name, manifest) in enumerate(kinds.items()):
        write_catalog(root / name, make_rows(45, manifest, seed=i, prefix=name), manifest, shard_rows=16)
    return root


def packs_of(folder, names, *, name, **kw):
    path = folder / f"{name}.parquet"
    if not path.exists():
        kw = {"max_tokens": 160, "epochs": 2, **kw}
        write_pack_result(path, pack_catalogs([folder / n for n in names], **kw))
    return path


def float_latent(cat: Catalog, row: int, flip: bool) -> np.ndarray:
    raw = cat.latent(row, flip=flip)
    if cat.manifest.dtype == "bfloat16":
        return torch.from_numpy(raw.view(np.int16).copy()).view(torch.bfloat16).float().numpy().astype(np.float64)
    return raw.astype(np.float64)


def raw_stats(cats: list[Catalog]) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of every stored latent (twins too; the mean of moments)."""
    pixels = []
    for cat in cats:
        channels = cat.manifest.encoder.channels
        for row in range(len(cat)):
            for flip in (False, True)[: 1 + (cat.manifest.flip == "store")]:
                pixels.append(float_latent(cat, row, flip)[:channels].reshape(channels, -1))
    everything = np.concatenate(pixels, axis=1)
    return everything.mean(axis=1), everything.std(axis=1)


def pack_ids_by_rows(packs) -> dict[tuple[int, tuple[int, ...]], int]:
    table, _, _ = open_packs(packs)
    return {(e, tuple(r)): p for e, r, p in zip(table["epoch"].to_pylist(), table["row_ids"].to_pylist(),
                                                  table["pack_id"].to_pylist())}


def expected_batch(packs, batch, epoch: int, patch: int):
    """What the loader must yield for this pack, rebuilt from the catalogs with the documented draws."""
    _, metadata, cats = open_packs(packs)
    mean, std = raw_stats(cats)
    ids = batch.row_ids.numpy()
    generator = pack_generator(SEED, epoch, pack_ids_by_rows(packs)[(epoch, tuple(ids.tolist()))])
    draws = generator.random(len(ids)) < 0.5
    which, local = locate(ids, metadata)
    latents, labels, flips = [], [], []
    for i, (k, row) in enumerate(zip(which.tolist(), local.tolist())):
        cat = cats[k]
        flip = bool(draws[i]) and cat.manifest.flip == "store"
        z = float_latent(cat, row, flip)
        if cat.manifest.encoder.quantity == "moments":
            c = cat.manifest.encoder.channels
            z = z[:c] + np.exp(0.5 * z[c:]) * generator.standard_normal((c, *z.shape[1:]), dtype=np.float32)
        latents.append(torch.from_numpy((z - mean[:, None, None]) / std[:, None, None]).float())
        labels.append(cat.index["label"][row].as_py())
        flips.append(flip)
    return pack_latents(latents, labels, patch, row_ids=ids), flips


def assert_same_batch(a, b, atol=0.0):
    torch.testing.assert_close(a.tokens, b.tokens, atol=atol, rtol=atol)
    for name in ("sizes", "cu_seqlens", "positions", "image_ids", "labels", "row_ids"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.max_seqlen == b.max_seqlen


@pytest.mark.parametrize("names, patch, variants", [
    (["flip_bf16"], 1, None),
    (["flip_bf16"], 2, ["256"]),  # 256 rows are 8x8 latents: 4x4 tokens of 4*2*2 values
    (["moments"], 1, None),
    (["moments_flip"], 1, None),
    (["moments_flip"], 2, ["256"]),
    (["pixels_u8"], 1, None),
    (["flip_bf16", "plain_f16"], 1, None),  # merged ids, pooled statistics, a twin only in one catalog
])
def test_tokens_are_the_normalised_patchified_latents_of_the_listed_rows(folder, names, patch, variants):
    packs = packs_of(folder, names, name="-".join(names) + f"-p{patch}", patch_size=patch, variants=variants)
    loader = PackedLoader(packs, seed=SEED, num_workers=0)
    table, metadata, cats = open_packs(packs)
    assert loader.dataset.token_dim == cats[0].manifest.encoder.channels * patch**2
    seen = {0: [], 1: []}
    flips = []
    for batch in loader:
        epoch = loader.dataset.cursor(loader.position - 1)[0]
        expected, chosen = expected_batch(packs, batch, epoch, patch)
        assert_same_batch(batch, expected, atol=1e-5)
        check_cu_seqlens(batch.cu_seqlens, batch.num_tokens)
        assert batch.tokens.dtype == torch.float32 and batch.num_tokens <= 160
        seen[epoch] += batch.row_ids.tolist()
        flips += chosen
    selected = sum(len(t) for t in table["row_ids"].to_pylist()) // 2
    for epoch in (0, 1):  # every row once per epoch
        assert len(seen[epoch]) == len(set(seen[epoch])) == selected
    stores = [cats[k].manifest.flip == "store" for k in locate(np.array(seen[0] + seen[1]), metadata)[0]]
    assert not any(f and not s for f, s in zip(flips, stores))
    if any(stores):  # about half of the stored twins are taken
        assert 0.3 < np.sum(flips) / np.sum(stores) < 0.7


def test_the_chosen_twin_is_one_of_the_stored_latents(folder):
    packs = packs_of(folder, ["flip_bf16"], name="flip_bf16-p1", patch_size=1)
    dataset = PackedDataset(packs, seed=SEED)
    _, metadata, (cat,) = open_packs(packs)
    mean, std = (np.asarray(v, np.float64)[:, None, None] for v in (cat.manifest.normalization.mean,
                                                                    cat.manifest.normalization.std))
    chosen = []
    batch = dataset.batch(0)
    for i, row in enumerate(batch.row_ids.tolist()):
        h, w = batch.sizes[i].tolist()
        got = batch.tokens[batch.cu_seqlens[i]: batch.cu_seqlens[i + 1]].double().numpy().T.reshape(-1, h, w)
        matches = [np.allclose(got, (float_latent(cat, row, f) - mean) / std, atol=1e-5) for f in (False, True)]
        assert sum(matches) == 1
        chosen.append(matches[1])
    again = PackedDataset(packs, seed=SEED + 1).batch(0)
    assert torch.equal(again.row_ids, batch.row_ids) and not torch.equal(again.tokens, batch.tokens)


def test_moments_are_sampled_with_fresh_noise_each_epoch(folder):
    packs = packs_of(folder, ["moments"], name="moments-p1", patch_size=1)
    dataset = PackedDataset(packs, seed=SEED)
    (cat,) = open_packs(packs)[2]
    norm = cat.manifest.normalization
    mean, std = np.asarray(norm.mean), np.asarray(norm.std)
    per_epoch = {0: {}, 1: {}}
    for position in range(dataset.num_steps):
        batch = dataset.batch(position)
        epoch = dataset.cursor(position)[0]
        for i, row in enumerate(batch.row_ids.tolist()):
            h, w = batch.sizes[i].tolist()
            z = batch.tokens[batch.cu_seqlens[i]: batch.cu_seqlens[i + 1]].double().numpy() * std + mean
            moments = float_latent(cat, row, False)
            mu, sigma = moments[:4].reshape(4, -1).T, np.exp(0.5 * moments[4:]).reshape(4, -1).T
            per_epoch[epoch][row] = (z - mu) / sigma
    noise = np.concatenate([np.ravel(v) for v in per_epoch[0].values()])
    assert abs(noise.mean()) < 0.1 and 0.9 < noise.std() < 1.1
    assert all(not np.allclose(per_epoch[0][r], per_epoch[1][r]) for r in per_epoch[0])


def test_two_ranks_read_disjoint_balanced_packs_covering_all_but_the_remainder(folder):
    single = packs_of(folder, ["flip_bf16"], name="ranks-w1", max_tokens=140, world_size=1)
    double = packs_of(folder, ["flip_bf16"], name="ranks-w2", max_tokens=140, world_size=2)
    table = open_packs(single)[0]
    packs_per_epoch = np.bincount(table["epoch"].to_numpy())
    assert (packs_per_epoch % 2).any()  # a remainder pack sits an epoch out
    for packs in (single, double):  # the file's columns (w2) and balancing in the loader (w1) agree
        runs = [[(b.row_ids.tolist()) for b in PackedLoader(packs, world_size=2, rank=r, num_workers=0, seed=SEED)]
                for r in (0, 1)]
        assert len(runs[0]) == len(runs[1]) == sum(packs_per_epoch // 2)
        steps0 = PackedDataset(packs, world_size=2, rank=0).steps_in_epoch(0)
        for epoch, (lo, hi) in enumerate([(0, steps0), (steps0, len(runs[0]))]):
            mine = [tuple(p) for r in (0, 1) for p in runs[r][lo:hi]]
            rows = [i for p in mine for i in p]
            assert len(rows) == len(set(rows))  # no row (hence no pack) on both ranks
            assert len(mine) == packs_per_epoch[epoch] - packs_per_epoch[epoch] % 2
        if packs == single:
            reference = runs
    assert runs == reference


def test_zero_and_two_workers_give_identical_batches_also_past_the_files_epochs(folder):
    packs = packs_of(folder, ["moments_flip"], name="moments_flip-p1", patch_size=1)
    serial = list(PackedLoader(packs, seed=SEED, epochs=3, num_workers=0))
    assert len(serial) == PackedDataset(packs, epochs=3).num_steps
    # batches dropped as they come (their shared slots are reused) and batches all held at once
    streamed = PackedLoader(packs, seed=SEED, epochs=3, num_workers=2, prefetch_factor=2)
    for a, b in zip(streamed, serial, strict=True):
        assert_same_batch(a, b)
    for a, b in zip(list(PackedLoader(packs, seed=SEED, epochs=3, num_workers=2)), serial, strict=True):
        assert_same_batch(a, b)
    # epoch 2 reuses epoch 0's packs, in another order and with new draws
    steps = PackedDataset(packs).steps_in_epoch(0)
    first, third = serial[:steps], serial[-steps:]
    assert [b.row_ids.tolist() for b in first] != [b.row_ids.tolist() for b in third]
    assert sorted(tuple(b.row_ids.tolist()) for b in first) == sorted(tuple(b.row_ids.tolist()) for b in third)
    by_rows = {tuple(b.row_ids.tolist()): b.tokens for b in first}
    assert not any(torch.equal(by_rows[tuple(b.row_ids.tolist())], b.tokens) for b in third)


def test_resuming_mid_epoch_yields_exactly_the_batches_that_came_next(folder):
    packs = packs_of(folder, ["moments_flip"], name="moments_flip-p1", patch_size=1)
    full = list(PackedLoader(packs, seed=SEED, num_workers=0))
    stop = PackedDataset(packs).steps_in_epoch(0) + 3  # inside epoch 1
    loader = PackedLoader(packs, seed=SEED, num_workers=2)
    for taken, _ in enumerate(loader, start=1):
        if taken == stop:
            break
    state = loader.state_dict()
    assert (state["epoch"], state["step"], state["position"]) == (1, 3, stop)
    for workers in (2, 0):
        resumed = PackedLoader(packs, seed=SEED, num_workers=workers)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(rest) == len(full) - stop
        for a, b in zip(rest, full[stop:]):
            assert_same_batch(a, b)
    continued = list(loader)  # the same loader carries on from its own cursor
    assert len(continued) == len(full) - stop and torch.equal(continued[0].tokens, full[stop].tokens)
    other_seed = PackedLoader(packs, seed=SEED + 1, num_workers=0)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)


def test_steps_bound_and_pickled_dataset(folder):
    packs = packs_of(folder, ["flip_bf16"], name="flip_bf16-p1", patch_size=1)
    per_pass = PackedDataset(packs).num_steps
    long = PackedLoader(packs, seed=SEED, steps=per_pass + 5, num_workers=0)
    assert len(long) == len(list(long)) == per_pass + 5 and long.epoch == 2
    dataset = PackedDataset(packs, seed=SEED)
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawn/forkserver worker receives
    assert_same_batch(copy.batch(3), dataset.batch(3))


def test_a_changed_catalog_is_refused(folder, tmp_path):
    manifest = make_manifest(dtype="bfloat16", flip="store")
    write_catalog(tmp_path / "c", make_rows(20, manifest, seed=3), manifest)
    write_pack_result(tmp_path / "p.parquet", pack_catalogs([tmp_path / "c"], max_tokens=160))
    PackedLoader(tmp_path / "p.parquet", num_workers=0)
    write_catalog(tmp_path / "c", make_rows(22, manifest, seed=3), manifest)  # two rows appended
    with pytest.raises(PacksMismatchError, match="contents changed"):
        PackedLoader(tmp_path / "p.parquet", num_workers=0)


def test_a_catalog_without_normalisation_or_another_patch_size_is_refused(tmp_path):
    manifest = make_manifest(dtype="float16", flip="none")
    write_catalog(tmp_path / "c", make_rows(12, manifest, seed=4), manifest)
    write_pack_result(tmp_path / "p.parquet", pack_catalogs([tmp_path / "c"], max_tokens=160))
    with pytest.raises(ValueError, match="patch size 1 .* model uses 2"):
        PackedLoader(tmp_path / "p.parquet", patch_size=2)
    cat = Catalog(tmp_path / "c")
    write_manifest(cat.root, cat.manifest.with_normalization(Normalization()))  # as if the encode was killed
    with pytest.raises(NormalizationNotReadyError, match="no normalisation statistics.*nr encode"):
        PackedLoader(tmp_path / "p.parquet")


def test_a_plain_dataloader_over_the_dataset_and_a_busy_slot_fall_back_to_one_buffer_per_batch(folder):
    from torch.utils.data import DataLoader

    from nrtrain.batch_transfer import SlotPool

    packs = packs_of(folder, ["flip_bf16"], name="flip_bf16-p1", patch_size=1)
    dataset = PackedDataset(packs, seed=SEED)
    serial = [dataset.batch(i) for i in range(dataset.num_steps)]
    for a, b in zip(DataLoader(dataset, batch_size=None, num_workers=2), serial, strict=True):
        assert_same_batch(a, b)
    pool = SlotPool(workers=1, slots=2, capacity=64)
    assert [pool.claim(0, n) for n in range(3)] == [0, 1, None]  # slot 0 is still held for batch 2
    pool.release(0, 0)
    assert pool.claim(0, 2) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs an accelerator")
def test_pinned_batches_equal_the_plain_ones(folder):
    packs = packs_of(folder, ["moments_flip"], name="moments_flip-p1", patch_size=1)
    plain = list(PackedLoader(packs, seed=SEED, num_workers=0))
    pinned = list(PackedLoader(packs, seed=SEED, num_workers=2, pin_memory=True))
    assert all(b.tokens.is_pinned() for b in pinned)
    for a, b in zip(pinned, plain, strict=True):
        assert_same_batch(a, b)
        assert_same_batch(a.to("cuda", non_blocking=True).to("cpu"), b)


def test_stored_words_decode_like_numpy_and_torch_for_every_16_bit_pattern():
    from nrtrain.latent_kernels import DTYPE_CODES, decode

    words = np.arange(2**16, dtype=np.uint16)
    out = np.empty(words.size, np.float32)
    decode(words.view(np.uint8), DTYPE_CODES["float16"], words.size, out)
    np.testing.assert_array_equal(out, words.view(np.float16).astype(np.float32))  # nan == nan here
    decode(words.view(np.uint8), DTYPE_CODES["bfloat16"], words.size, out)
    expected = torch.from_numpy(words.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(out, expected)
