"""nr sample on a tiny pixel-space NiT: outputs, provenance, regeneration, sizes, resume, refusals."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from PIL import Image

from nrdata.catalog import Catalog, LatentRow, Manifest
from nrdata.encoders import PixelEncoder
from nrtrain.checkpoint import CheckpointMismatchError, data_identity, save_checkpoint
from nrtrain.model import build_model
from nrtrain.normalization import LatentScaling, catalog_normalization
from nrtrain.packed import patchify
from nrtrain.sample import LatentDecoder, SampleSettings, count_evaluations, generate
from nrtrain.sample_plan import SAMPLE_PRESETS, SampleRequest, parse_size, plan_samples, resolve_sampler
from nrtrain.transport import ImageNoise, SamplerConfig, noise_pack, sample
from catalog_factory import POLICIES, make_manifest, make_rows, write_catalog

FACTOR, PATCH, CLASSES = 4, 2, 5  # one token = 8x8 pixels; 48 latent channels, 192 per token
UNIT = FACTOR * PATCH
FAST = dict(solver="euler", steps=2)


def pixel_catalog(root, seed=0):
    """A pixel catalog (factor 4) whose largest latent is 4x4 latent pixels: training size 2x2 tokens."""
    encoder = PixelEncoder(FACTOR)
    manifest = Manifest(encoder=encoder.info, dtype="uint8", policies=POLICIES, flip="none")
    rng = np.random.default_rng(seed)
    rows = []
    for i, (h, w) in enumerate([(4, 4), (2, 4), (4, 2), (2, 2)]):
        image = rng.integers(0, 256, (1, h * FACTOR, w * FACTOR, 3), dtype=np.uint8)
        rows.append(LatentRow(key=f"c{i}/img{i}.png", variant="native", latent=encoder.encode(image)[0],
                              label=i % CLASSES, class_name=f"c{i}", source=f"c{i}/img{i}.png"))
    write_catalog(root, rows, manifest)
    return Catalog(root)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A checkpoint saved the way the trainer saves one, with weights perturbed away from the
    zero initialisation so that the velocity depends on every token, time and label."""
    root = tmp_path_factory.mktemp("sample")
    catalog = pixel_catalog(root / "catalog")
    torch.manual_seed(0)
    model = build_model("tiny", in_channels=3 * FACTOR**2, patch_size=PATCH, num_classes=CLASSES,
                        attention="sdpa-loop")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    run_info = {"config": {"model": "tiny"}, "model": asdict(model.config),
                "data": data_identity([catalog], catalog_normalization(catalog), PATCH)}
    folder = save_checkpoint(root / "run", 7, model=model, ema=model, state={}, run_info=run_info)
    return {"root": root, "checkpoint": folder, "catalog": catalog.root}


def load_npz(path):
    with np.load(path) as archive:
        return {key: archive[key] for key in archive.files}


def png(path):
    return np.asarray(Image.open(path))


def test_npz_grid_and_pngs_hold_every_sample(run, tmp_path):
    summary = generate(run["checkpoint"], SampleRequest(sizes=((16, 24),), count=5, seed=3), tmp_path,
                       batch_size=2, **FAST)
    npz = load_npz(tmp_path / "samples.npz")
    assert npz["arr_0"].dtype == np.uint8 and npz["arr_0"].shape == (5, 16, 24, 3)
    for j in range(5):
        assert np.array_equal(npz["arr_0"][j], png(tmp_path / "16x24" / f"{j:06d}.png"))
    provenance = json.loads((tmp_path / "provenance.json").read_text())
    assert npz["arr_1"].tolist() == provenance["labels"] and len(set(provenance["labels"])) > 1
    grid = png(tmp_path / "grid.png")
    assert grid.shape == (2 * 16, 3 * 24, 3)
    assert np.array_equal(grid[16:32, 24:48], npz["arr_0"][4])
    assert summary.generated == 5 and summary.skipped == 0 and summary.sizes[0].missing == 0
    assert len(npz["arr_0"].reshape(5, -1).std(axis=1).nonzero()[0]) == 5  # not blank images


def test_provenance_records_every_setting(run, tmp_path):
    summary = generate(run["checkpoint"], SampleRequest(sizes=((16, 16),), count=3, seed=11, classes=(1, 4)),
                       tmp_path, solver="heun", steps=3, cfg_scale=2.0, cfg_interval=(0.0, 0.5), shift=2.0,
                       rope_extrapolation="dynntk", decouple=True, dtype="float32", batch_size=2)
    record = json.loads((tmp_path / "provenance.json").read_text())
    assert record["complete"] is True
    assert record["checkpoint"]["path"] == str(run["checkpoint"]) and record["checkpoint"]["step"] == 7
    assert record["checkpoint"]["ema"] is True and len(record["checkpoint"]["sha256"]) == 64
    sampler = record["sampler"]
    assert (sampler["solver"], sampler["steps"], sampler["cfg_scale"], sampler["cfg_interval"], sampler["shift"]) == (
        "heun", 3, 2.0, [0.0, 0.5], 2.0)
    assert sampler["nfe"] == summary.nfe == 5  # Heun: 2 per interval, the last one Euler
    assert 0 < sampler["guided_nfe"] == summary.guided_nfe < 5
    assert summary.model_forwards == 2 * (summary.nfe + summary.guided_nfe)  # two batches
    assert record["rope"] == {"mode": "dynntk", "decouple": True, "train_size_tokens": [2, 2]}
    assert record["dtype"] == "float32" and record["seed"]["base"] == 11
    assert record["labels"] == [1, 4, 1] and record["count"] == 3 and record["total"] == 3
    assert record["sizes"][0]["requested"] == [16, 16] and record["sizes"][0]["used"] == [16, 16]
    assert record["encoder"]["name"] == "pixel" and record["encoder"]["factor"] == FACTOR
    assert record["normalization"]["mean"] and record["code_version"] and record["torch"]
    assert record["settings"]["sampler"]["solver"] == "heun"


@pytest.mark.parametrize("solver", ["euler", "euler-maruyama"])
def test_a_sample_regenerated_alone_equals_the_batch_one(run, tmp_path, solver):
    settings = dict(solver=solver, steps=3, cfg_scale=1.5, cfg_interval=(0.2, 0.8))
    generate(run["checkpoint"], SampleRequest(sizes=((16, 16),), count=4, seed=20), tmp_path / "batch",
             batch_size=4, **settings)
    batch_png = png(tmp_path / "batch" / "16x16" / "000002.png")
    # the same index of the same plan, alone
    generate(run["checkpoint"], SampleRequest(sizes=((16, 16),), count=4, seed=20, indices=(2,)),
             tmp_path / "index", batch_size=4, **settings)
    assert sorted(p.name for p in (tmp_path / "index" / "16x16").iterdir()) == ["000002.png"]
    assert np.array_equal(png(tmp_path / "index" / "16x16" / "000002.png"), batch_png)
    # a one-sample run from that sample's own seed (random labels come from the seed too)
    generate(run["checkpoint"], SampleRequest(sizes=((16, 16),), count=1, seed=22), tmp_path / "alone",
             batch_size=4, **settings)
    assert np.array_equal(png(tmp_path / "alone" / "16x16" / "000000.png"), batch_png)
    assert not np.array_equal(png(tmp_path / "batch" / "16x16" / "000001.png"), batch_png)


def test_sizes_are_rounded_to_the_unit_recorded_and_batched_apart(run, tmp_path):
    request = SampleRequest(sizes=((13, 21), (8, 8)), count=2, seed=0)
    summary = generate(run["checkpoint"], request, tmp_path, batch_size=8, **FAST)
    first, second = summary.sizes
    assert (first.size.requested, first.size.used, first.size.rounded) == ((13, 21), (16, 24), True)
    assert (second.size.used, second.size.rounded) == ((8, 8), False)
    assert any("13x21" in w and "16x24" in w for w in summary.warnings)
    record = json.loads((tmp_path / "provenance.json").read_text())["sizes"]
    assert record[0]["requested"] == [13, 21] and record[0]["used"] == [16, 24] and record[0]["rounded"]
    assert load_npz(tmp_path / "samples-16x24.npz")["arr_0"].shape == (2, 16, 24, 3)
    assert load_npz(tmp_path / "samples-8x8.npz")["arr_0"].shape == (2, 8, 8, 3)
    assert (tmp_path / "grid-16x24.png").is_file() and not (tmp_path / "samples.npz").exists()
    assert summary.model_forwards == 2 * summary.nfe  # one batch per size


def test_rope_extrapolation_applies_only_beyond_the_training_size(run, tmp_path):
    request = SampleRequest(sizes=((16, 16), (16, 32)), count=1, seed=5)  # 2x2 tokens trained, 2x4 beyond
    plain = generate(run["checkpoint"], request, tmp_path / "none", **FAST)
    yarn = generate(run["checkpoint"], request, tmp_path / "yarn", rope_extrapolation="yarn", **FAST)
    assert [o.extrapolated for o in plain.sizes] == [False, False]
    assert [o.extrapolated for o in yarn.sizes] == [False, True]
    assert [o.beyond_training for o in yarn.sizes] == [False, True]
    same = png(tmp_path / "none" / "16x16" / "000000.png"), png(tmp_path / "yarn" / "16x16" / "000000.png")
    beyond = png(tmp_path / "none" / "16x32" / "000000.png"), png(tmp_path / "yarn" / "16x32" / "000000.png")
    assert np.array_equal(*same) and not np.array_equal(*beyond)


def test_resume_makes_only_what_is_missing_and_refuses_other_settings(run, tmp_path):
    request = SampleRequest(sizes=((16, 16),), count=4, seed=1)
    generate(run["checkpoint"], request, tmp_path, batch_size=2, **FAST)
    folder = tmp_path / "16x16"
    before = {p.name: (p.stat().st_mtime_ns, png(p)) for p in folder.iterdir()}
    (folder / "000001.png").unlink()
    (tmp_path / "samples.npz").unlink()
    calls = []
    summary = generate(run["checkpoint"], request, tmp_path, batch_size=2, progress=lambda d, t: calls.append((d, t)),
                       **FAST)
    assert (summary.generated, summary.skipped) == (1, 3)
    assert calls == [(3, 4), (4, 4)]
    after = {p.name: (p.stat().st_mtime_ns, png(p)) for p in folder.iterdir()}
    for name in ("000000.png", "000002.png", "000003.png"):
        assert after[name][0] == before[name][0]
    assert np.array_equal(after["000001.png"][1], before["000001.png"][1])
    assert load_npz(tmp_path / "samples.npz")["arr_0"].shape[0] == 4
    # a larger count extends the run: the first four are kept
    bigger = generate(run["checkpoint"], SampleRequest(sizes=((16, 16),), count=6, seed=1), tmp_path, **FAST)
    assert (bigger.generated, bigger.skipped) == (2, 4)
    assert load_npz(tmp_path / "samples.npz")["arr_0"].shape[0] == 6
    with pytest.raises(ValueError, match="other settings.*sampler"):
        generate(run["checkpoint"], request, tmp_path, solver="euler", steps=3)


def test_ranks_share_the_work_and_rank_zero_finishes(run, tmp_path):
    request = SampleRequest(sizes=((8, 8),), count=5, seed=2)
    other = generate(run["checkpoint"], request, tmp_path, rank=1, world_size=2, **FAST)
    assert other.generated == 2 and other.provenance is None and not (tmp_path / "samples.npz").exists()
    first = generate(run["checkpoint"], request, tmp_path, rank=0, world_size=2, **FAST)
    assert first.generated == 3 and load_npz(tmp_path / "samples.npz")["arr_0"].shape == (5, 8, 8, 3)
    alone = generate(run["checkpoint"], request, tmp_path / "alone", **FAST)
    assert np.array_equal(load_npz(tmp_path / "alone" / "samples.npz")["arr_0"],
                          load_npz(tmp_path / "samples.npz")["arr_0"])
    assert alone.generated == 5


@pytest.mark.parametrize("request_kw, options, message", [
    (dict(sizes=((16, 16),), classes=(2, CLASSES)), {}, f"class id {CLASSES} is outside 0..{CLASSES - 1}"),
    (dict(sizes=((4, 16),), count=1), {}, "4x16 is below one unit"),
    (dict(sizes=((16, 16),), count=1), dict(preset="nit-999"), "unknown sampling preset 'nit-999'"),
    (dict(sizes=((16, 16),), count=1), dict(cfg_scale=0.5), "cfg scale must be >= 1"),
    (dict(sizes=((16, 16),), count=1), dict(rope_extrapolation="ntk"), "unknown RoPE extrapolation mode"),
    (dict(sizes=((16, 16),)), {}, "random classes need a count"),
])
def test_bad_requests_fail_before_any_work(run, tmp_path, request_kw, options, message):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        generate(run["checkpoint"], SampleRequest(**request_kw), out, **options)
    assert not out.exists()


def test_catalogs_are_checked_against_the_checkpoint(run, tmp_path):
    generate(run["checkpoint"], SampleRequest(sizes=((8, 8),), count=1), tmp_path / "ok", catalogs=[run["catalog"]],
             **FAST)
    foreign = tmp_path / "foreign"
    manifest = make_manifest(dtype="float32")
    write_catalog(foreign, make_rows(6, manifest), manifest)
    with pytest.raises(CheckpointMismatchError, match="encoder"):
        generate(run["checkpoint"], SampleRequest(sizes=((8, 8),), count=1), tmp_path / "bad", catalogs=[foreign])
    assert not (tmp_path / "bad").exists()


def test_pixel_decode_undoes_normalisation_exactly():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 16, 24, 3), dtype=np.uint8)
    encoder = PixelEncoder(FACTOR)
    channels = encoder.info.channels
    mean, std = rng.uniform(50, 200, channels), rng.uniform(20, 90, channels)
    latents = torch.from_numpy(encoder.encode(images)).double()
    normalised = ((latents - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]).float()
    tokens = torch.cat([patchify(z, PATCH) for z in normalised])
    scaling = LatentScaling("per-channel", tuple(mean.tolist()), tuple(std.tolist()))
    decoded = LatentDecoder(encoder, scaling, PATCH, batch_size=2)(tokens, (2, 3))
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, images)


def test_plan_labels_seeds_and_counts():
    balanced = plan_samples(SampleRequest(sizes=((16, 16),), per_class=3, classes=(4, 0)), factor=FACTOR,
                            patch_size=PATCH, num_classes=CLASSES)
    assert balanced.count == 6 and balanced.labels == (4, 0, 4, 0, 4, 0)
    every = plan_samples(SampleRequest(sizes=((16, 16),), per_class=2), factor=FACTOR, patch_size=PATCH,
                         num_classes=CLASSES)
    assert sorted(every.labels) == sorted(list(range(CLASSES)) * 2)
    short = plan_samples(SampleRequest(sizes=((16, 16),), count=40, seed=9), factor=FACTOR, patch_size=PATCH,
                         num_classes=CLASSES)
    longer = plan_samples(SampleRequest(sizes=((16, 16),), count=80, seed=9), factor=FACTOR, patch_size=PATCH,
                          num_classes=CLASSES)
    assert longer.labels[:40] == short.labels and set(short.labels) == set(range(CLASSES))
    assert short.seed(7) == 16
    with pytest.raises(ValueError, match="contradicts per_class"):
        plan_samples(SampleRequest(sizes=((16, 16),), per_class=2, count=3), factor=FACTOR, patch_size=PATCH,
                     num_classes=CLASSES)
    with pytest.raises(ValueError, match="index 5 is outside"):
        plan_samples(SampleRequest(sizes=((16, 16),), count=5, indices=(5,)), factor=FACTOR, patch_size=PATCH,
                     num_classes=CLASSES)


def test_presets_follow_nit_readme_rows_and_yield_to_options():
    preset = SAMPLE_PRESETS["nit-256"]
    assert preset.size == (256, 256) and preset.sampler == SamplerConfig("euler-maruyama", 250, 2.25, (0.0, 0.7),
                                                                          heun_guidance="step-start")
    assert SAMPLE_PRESETS["nit-432x768"].size == (432, 768)
    mixed = resolve_sampler("nit-1024", steps=20, cfg_scale=1.5)
    assert mixed == SamplerConfig("euler", 20, 1.5, (0.0, 0.8), heun_guidance="step-start")
    # every NiT row guides Heun's corrector as NiT's sampler does, should a user switch it to heun
    assert all(p.sampler.heun_guidance == "step-start" for p in SAMPLE_PRESETS.values())
    assert resolve_sampler("nit-768", solver="heun", heun_guidance="corrector").heun_guidance == "corrector"
    assert resolve_sampler(solver="heun").heun_guidance == "corrector"
    with pytest.raises(ValueError, match="unknown heun guidance 'start'"):
        resolve_sampler(solver="heun", heun_guidance="start")
    plan = plan_samples(SampleRequest(count=1), factor=32, patch_size=1, num_classes=1000,
                        default_size=preset.size)
    assert plan.sizes[0].used == (256, 256)
    assert parse_size("432x768") == (432, 768) and parse_size("256") == (256, 256)
    with pytest.raises(ValueError, match="not HxW"):
        parse_size("256x")


def test_evaluation_count_is_the_solvers_own():
    for config in (SamplerConfig("euler", 7, 3.0, (0.0, 0.5)), SamplerConfig("heun", 4, 2.0, (0.3, 1.0)),
                   SamplerConfig("euler-maruyama", 6, 1.0, (0.0, 1.0))):
        calls = []

        def model(x, t, y, batch):
            calls.append(batch.num_images)
            return torch.zeros_like(x)

        batch = noise_pack([(1, 2)], 3, [0], [0])
        sample(model, batch, torch.zeros(1, dtype=torch.int64), null_class=1, **asdict(config),
               generator=ImageNoise([(1, 2)], 3, [0], stream="sde"))
        assert count_evaluations(config) == (len(calls), calls.count(2))


def test_kl_vae_checkpoints_decode_their_plain_latents_with_the_catalogs_statistics(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from nrdata.encoders import load_encoder
    from nrtrain.checkpoint import load_model
    from vae_factory import KL_CONFIG

    torch.manual_seed(0)
    diffusers.AutoencoderKL(**KL_CONFIG).save_pretrained(tmp_path / "kl")
    encoder = load_encoder("sd-vae-ft-ema", str(tmp_path / "kl"), dtype="float32")
    mean, std = [0.5, -0.2, 0.1, 0.0], [2.0, 0.5, 1.5, 1.0]
    model = build_model("tiny", in_channels=4, patch_size=1, num_classes=CLASSES, attention="sdpa-loop")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    data = {"encoder": asdict(encoder.info), "dtype": "float32", "patch_size": 1, "max_latent_hw": [2, 2],
            "normalization": {"mean": mean, "std": std, "count": 100}, "catalogs": []}
    folder = save_checkpoint(tmp_path / "run", 1, model=model, ema=None, state={},
                             run_info={"config": {}, "model": asdict(model.config), "data": data})
    summary = generate(folder, SampleRequest(sizes=((16, 24),), count=2, seed=4, classes=(3,)), tmp_path / "out",
                       **FAST)
    assert summary.warnings == [] and summary.sizes[0].size.tokens == (2, 3)

    # the same samples by hand: solver → un-normalise with the checkpoint's statistics → the VAE's decode
    loaded, _ = load_model(folder)
    noise = noise_pack([(2, 3)] * 2, 4, [4, 5], [3, 3])
    tokens = sample(loaded, noise, noise.labels, null_class=CLASSES, **FAST).tokens
    latents = tokens.reshape(2, 2, 3, 4).permute(0, 3, 1, 2) * torch.tensor(std)[:, None, None] + torch.tensor(
        mean)[:, None, None]
    expected = encoder.decode(latents)
    for j in range(2):
        assert np.array_equal(png(tmp_path / "out" / "16x24" / f"{j:06d}.png"), expected[j])
    record = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert record["encoder"]["quantity"] == "moments" and record["checkpoint"]["ema"] is False


def test_non_finite_samples_are_reported(tmp_path):
    catalog = pixel_catalog(tmp_path / "catalog")
    model = build_model("tiny", in_channels=3 * FACTOR**2, patch_size=PATCH, num_classes=CLASSES,
                        attention="sdpa-loop")
    with torch.no_grad():
        model.final_layer.linear.bias[0] = float("nan")
    run_info = {"config": {}, "model": asdict(model.config),
                "data": data_identity([catalog], catalog_normalization(catalog), PATCH)}
    folder = save_checkpoint(tmp_path / "run", 1, model=model, ema=model, state={}, run_info=run_info)
    summary = generate(folder, SampleRequest(sizes=((8, 8),), count=2), tmp_path / "out", **FAST)
    assert [p.name for p in summary.nonfinite] == ["000000.png", "000001.png"]
    assert any("non-finite" in w for w in summary.warnings)
    record = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert record["nonfinite"] == ["8x8/000000.png", "8x8/000001.png"]


def test_the_decoder_is_judged_by_the_content_of_its_weights_not_where_they_were_read_from():
    from types import SimpleNamespace

    from nrtrain.checkpoint import check_data_identity
    from nrtrain.sample import _check_encoder

    saved = {"name": "dc-ae-f32c32", "factor": 32, "channels": 32, "revision": "hub-rev-1"}
    info = SimpleNamespace(name="dc-ae-f32c32", factor=32, channels=32, revision="local-folder")
    same, other = (SimpleNamespace(info=info, weights_id=w) for w in ("sha256:aa", "sha256:bb"))
    warnings: list[str] = []
    _check_encoder(same, saved, "sha256:aa", warnings)  # a local copy of the same weights: nothing to say
    assert warnings == []
    _check_encoder(other, saved, "sha256:aa", warnings)
    assert len(warnings) == 1 and "sha256:bb" in warnings[0] and "sha256:aa" in warnings[0]
    _check_encoder(same, saved, "", warnings)  # a schema-1 catalog recorded no hash: the revision decides
    assert len(warnings) == 2 and "revision" in warnings[1]

    identity = {"encoder": saved, "patch_size": 1, "encoder_weights": "sha256:aa",
                "normalization": {"mean": [0.0], "std": [1.0]}}
    check_data_identity(identity, {**identity}, where="ckpt")
    check_data_identity(identity, {**identity, "encoder_weights": ""}, where="ckpt")  # old catalog: no hash
    with pytest.raises(CheckpointMismatchError, match="encoder weights sha256:aa .* sha256:bb"):
        check_data_identity(identity, {**identity, "encoder_weights": "sha256:bb"}, where="ckpt")


def test_rope_train_size_overrides_the_checkpoints_own(run, tmp_path):
    request = SampleRequest(sizes=((16, 16),), count=2, seed=5)
    as_trained = generate(run["checkpoint"], request, tmp_path / "a", rope_extrapolation="linear", **FAST)
    assert not as_trained.sizes[0].extrapolated  # 16x16 px = 2x2 tokens, the training size
    smaller = generate(run["checkpoint"], request, tmp_path / "b", rope_extrapolation="linear",
                       rope_train_size=(8, 8), **FAST)
    assert smaller.sizes[0].extrapolated and smaller.sizes[0].beyond_training
    provenance = json.loads((tmp_path / "b" / "provenance.json").read_text())
    assert provenance["rope"]["train_size_tokens"] == [1, 1]
    assert not np.array_equal(load_npz(as_trained.sizes[0].npz)["arr_0"], load_npz(smaller.sizes[0].npz)["arr_0"])
    with pytest.raises(ValueError, match="at least one unit"):
        generate(run["checkpoint"], request, tmp_path / "c", rope_extrapolation="linear", rope_train_size=(4, 4),
                 **FAST)


def test_settings_as_one_dataclass_or_as_keywords_make_the_same_samples(run, tmp_path):
    request = SampleRequest(sizes=((16, 16),), count=2, seed=9)
    generate(run["checkpoint"], request, tmp_path / "object", SampleSettings(**FAST, cfg_scale=2.0))
    generate(run["checkpoint"], request, tmp_path / "keywords", **FAST, cfg_scale=2.0)
    for j in range(2):
        assert np.array_equal(png(tmp_path / "object" / "16x16" / f"{j:06d}.png"),
                              png(tmp_path / "keywords" / "16x16" / f"{j:06d}.png"))
    with pytest.raises(TypeError, match="not both"):
        generate(run["checkpoint"], request, tmp_path / "both", SampleSettings(), steps=2)
    with pytest.raises(TypeError):
        generate(run["checkpoint"], request, tmp_path / "typo", stpes=2)
