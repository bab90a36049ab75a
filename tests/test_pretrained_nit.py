"""NiT's released checkpoint end to end through nr's CLI: import, sample, fine-tune, resume.

The checkpoint is written here in NiT's key layout with random weights, from the layout's description
(shared/reference/nit.md §4.1), not from NiT's code; the decoder is a tiny random DC-AE saved as a
diffusers folder (tests/vae_factory.py). The decoded samples are checked against an explicit
computation: NiT's tensors loaded by `load_nit_checkpoint`, the solver run by hand, and the DC-AE
decoding z / scaling_factor, NiT's rule.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from vae_factory import DCAE_CONFIG, _randomise  # noqa: E402

from cli import app  # noqa: E402
from nrdata.catalog import Catalog, EncoderInfo, LatentRow, Manifest  # noqa: E402
from nrdata.packing.catalog_packs import pack_catalogs, write_pack_result  # noqa: E402
from nrtrain.checkpoint import CheckpointMismatchError, load_weights, read_run_info  # noqa: E402
from nrtrain.loader import PackedDataset  # noqa: E402
from nrtrain.model import NiT, NiTConfig, load_nit_checkpoint  # noqa: E402
from nrtrain.normalization import run_normalization  # noqa: E402
from nrtrain.packed import unpatchify  # noqa: E402
from nrtrain.sample import LatentDecoder  # noqa: E402
from nrtrain.sample_plan import SAMPLE_PRESETS  # noqa: E402
from nrtrain.train import TrainConfig, train  # noqa: E402
from nrtrain.transport import ImageNoise, noise_pack, sample  # noqa: E402

D, DEPTH, HEADS, CLASSES, CHANNELS = 64, 2, 4, 10, 32  # the "tiny" preset's shape, DC-AE's 32 channels
SCALE = DCAE_CONFIG["scaling_factor"]
POLICIES = ({"kind": "native", "unit": 32, "max_area": 2048 * 2048, "target": None, "variant": "native"},)
runner = CliRunner()


def nit_layout(d=D, depth=DEPTH, heads=HEADS, classes=CLASSES, channels=CHANNELS, z_dim=12, projector=32):
    """Key -> shape of a NiT release as nit.md §4.1 describes it (patch 1, GELU MLP of 4d, REPA projector)."""
    head_dim = d // heads
    shapes = {"x_embedder.proj.weight": (d, channels, 1, 1), "x_embedder.proj.bias": (d,),
              "t_embedder.mlp.0.weight": (d, 256), "t_embedder.mlp.0.bias": (d,),
              "t_embedder.mlp.2.weight": (d, d), "t_embedder.mlp.2.bias": (d,),
              "y_embedder.embedding_table.weight": (classes + 1, d),
              "final_layer.linear.weight": (channels, d), "final_layer.linear.bias": (channels,),
              "final_layer.adaLN_modulation.1.weight": (2 * d, d), "final_layer.adaLN_modulation.1.bias": (2 * d,),
              "projector.0.weight": (projector, d), "projector.0.bias": (projector,),
              "projector.2.weight": (projector, projector), "projector.2.bias": (projector,),
              "projector.4.weight": (z_dim, projector), "projector.4.bias": (z_dim,)}
    for i in range(depth):
        for name, shape in {"attn.qkv.weight": (3 * d, d), "attn.qkv.bias": (3 * d,),
                            "attn.q_norm.weight": (head_dim,), "attn.q_norm.bias": (head_dim,),
                            "attn.k_norm.weight": (head_dim,), "attn.k_norm.bias": (head_dim,),
                            "attn.proj.weight": (d, d), "attn.proj.bias": (d,),
                            "mlp.fc1.weight": (4 * d, d), "mlp.fc1.bias": (4 * d,),
                            "mlp.fc2.weight": (d, 4 * d), "mlp.fc2.bias": (d,),
                            "adaLN_modulation.1.weight": (6 * d, d), "adaLN_modulation.1.bias": (6 * d,)}.items():
            shapes[f"blocks.{i}.{name}"] = shape
    return shapes


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result


@pytest.fixture(scope="module")
def nit(tmp_path_factory):
    """NiT's file (random weights, every path carrying signal), a tiny DC-AE folder, and the import."""
    root = tmp_path_factory.mktemp("nit")
    g = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shape, generator=g) * 0.1 for k, shape in nit_layout().items()}
    save_file(state, str(root / "model_1000K.safetensors"))
    torch.manual_seed(0)
    _randomise(diffusers.AutoencoderDC(**DCAE_CONFIG)).save_pretrained(root / "dcae")
    result = invoke("import", "nit-model", root / "model_1000K.safetensors", "--out", root / "run",
                    "--encoder-source", root / "dcae", "--preset", "tiny", "--train-size", "64x64")
    assert result.exit_code == 0, result.output
    return {"root": root, "file": root / "model_1000K.safetensors", "dcae": root / "dcae", "run": root / "run"}


def test_import_records_what_sampling_needs(nit):
    info = read_run_info(nit["run"])
    assert info["model"]["rope_grid"] == "nit" and (info["model"]["depth"], info["model"]["heads"]) == (DEPTH, HEADS)
    assert info["model"]["num_classes"] == CLASSES and info["model"]["repa_depth"] is None
    data = info["data"]
    assert data["normalization"]["mode"] == "scalar" and data["normalization"]["scaling_factor"] == SCALE
    assert data["encoder"]["name"] == "dc-ae-f32c32" and data["encoder"]["source"] == str(nit["dcae"])
    assert data["encoder_weights"].startswith("sha256:") and data["max_latent_hw"] == [2, 2]
    assert sorted(info["imported"]["skipped_keys"]) == sorted(k for k in nit_layout() if k.startswith("projector."))
    assert not (Path(nit["run"]) / "checkpoints" / "step-00000000" / "state.pt").exists()


def test_import_refuses_what_it_cannot_bring_in(nit, tmp_path):
    result = invoke("import", "nit-model", nit["file"], "--out", tmp_path / "xl", "--encoder-source", nit["dcae"],
                    "--preset", "XL")
    assert result.exit_code == 2 and "preset XL is depth 28" in result.output, result.output
    result = invoke("import", "nit-model", nit["file"], "--out", nit["run"], "--encoder-source", nit["dcae"])
    assert result.exit_code == 2 and "not empty" in result.output
    # an extra key is refused unless skipped on request
    state = {k: torch.zeros(s) for k, s in nit_layout().items()}
    save_file({**state, "pos_embed": torch.zeros(1, 4)}, str(tmp_path / "extra.safetensors"))
    result = invoke("import", "nit-model", tmp_path / "extra.safetensors", "--out", tmp_path / "a",
                    "--encoder-source", nit["dcae"])
    assert result.exit_code == 2 and "not in the model: pos_embed" in result.output, result.output
    result = invoke("import", "nit-model", tmp_path / "extra.safetensors", "--out", tmp_path / "b",
                    "--encoder-source", nit["dcae"], "--ignore-extra", "pos_embed", "--ignore-extra", "projector.")
    assert result.exit_code == 0, result.output
    assert sorted(read_run_info(tmp_path / "b")["imported"]["skipped_keys"])[0] == "pos_embed"


def explicit_samples(nit, size_tokens, seeds, labels, **sampler):
    """NiT's weights loaded by load_nit_checkpoint, the solver run by hand, DC-AE decoding z / s."""
    model = NiT.from_config(NiTConfig(in_channels=CHANNELS, patch_size=1, hidden=D, depth=DEPTH, heads=HEADS,
                                      num_classes=CLASSES, rope_grid="nit", attention="sdpa-loop"))
    load_nit_checkpoint(model, nit["file"])
    model.eval()
    sizes = [size_tokens] * len(seeds)
    noise = noise_pack(sizes, CHANNELS, seeds, labels)
    sde = ImageNoise(sizes, CHANNELS, seeds, stream="sde") if sampler["solver"] == "euler-maruyama" else None
    tokens = sample(model, noise, noise.labels, null_class=CLASSES, generator=sde, model_dtype=torch.float32,
                    **sampler).tokens
    h, w = size_tokens
    z = torch.stack([unpatchify(t, h, w, CHANNELS, 1) for t in tokens.split(h * w)]) / SCALE
    dcae = diffusers.AutoencoderDC.from_pretrained(nit["dcae"]).eval()
    with torch.no_grad():
        x = dcae.decode(z.contiguous()).sample
    return ((x.float() + 1) / 2 * 255).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def png(path):
    return np.asarray(Image.open(path))


def test_sampling_the_imported_run_at_two_sizes_matches_the_explicit_computation(nit, tmp_path):
    out = tmp_path / "two"
    result = invoke("sample", nit["run"], "--out", out, "--size", "64x64", "--size", "32x96", "--classes", "3,7",
                    "--count", "2", "--seed", "5", "--solver", "euler", "--steps", "3", "--cfg", "2.0",
                    "--cfg-interval", "0", "0.6")
    assert result.exit_code == 0, result.output
    for folder, tokens in (("64x64", (2, 2)), ("32x96", (1, 3))):
        expected = explicit_samples(nit, tokens, [5, 6], [3, 7], solver="euler", steps=3, cfg_scale=2.0,
                                    cfg_interval=(0.0, 0.6))
        made = np.stack([png(out / folder / f"{j:06d}.png") for j in range(2)])
        assert made.shape == expected.shape  # the same operations on the CPU: equal to the last bit
        assert np.array_equal(made, expected), folder
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["normalization"]["convention"] == "z = z_norm / scaling_factor"
    assert provenance["checkpoint"]["imported"]["format"] == "NiT"


def test_a_nit_preset_samples_the_imported_run(nit, tmp_path):
    out = tmp_path / "preset"
    # NiT's 256 row (Euler-Maruyama, CFG 2.25 on [0, 0.7]) with fewer steps and a smaller size, for time
    result = invoke("sample", nit["run"], "--out", out, "--preset", "nit-256", "--size", "96x64", "--classes", "4",
                    "--count", "1", "--seed", "2", "--steps", "6")
    assert result.exit_code == 0, result.output
    preset = SAMPLE_PRESETS["nit-256"].sampler
    expected = explicit_samples(nit, (3, 2), [2], [4], solver=preset.solver, steps=6, cfg_scale=preset.cfg_scale,
                                cfg_interval=preset.cfg_interval)
    made = png(out / "96x64" / "000000.png")
    assert made.shape == (96, 64, 3) and np.array_equal(made, expected[0])
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["sampler"]["preset"] == "nit-256" and provenance["sampler"]["solver"] == "euler-maruyama"
    assert (out / "samples.npz").is_file() and (out / "grid.png").is_file()


# -- normalisation modes -------------------------------------------------------------------------

def latent_catalog(root, encoder: EncoderInfo, weights: str = "", n: int = 12, seed: int = 0) -> Path:
    """A float32 catalog of `encoder`'s latents (random values with a per-channel offset and scale)."""
    from nrdata.catalog import CatalogWriter

    manifest = Manifest(encoder=encoder, dtype="float32", policies=POLICIES, flip="none", encoder_weights=weights)
    rng = np.random.default_rng(seed)
    offset, scale = rng.normal(0, 2, (CHANNELS, 1, 1)), rng.uniform(0.5, 3, (CHANNELS, 1, 1))
    with CatalogWriter(root, manifest) as writer:
        for i in range(n):
            h, w = int(rng.integers(1, 4)), int(rng.integers(1, 4))
            latent = (offset + scale * rng.standard_normal((CHANNELS, h, w))).astype(np.float32)
            writer.add(LatentRow(key=f"c{i % 3}/{i}.jpg", variant="native", latent=latent, label=i % 3,
                                 class_name=f"c{i % 3}", source=f"c{i % 3}/{i}.jpg", image_w=32 * w, image_h=32 * h))
    return Path(root)


@pytest.mark.parametrize("mode", ["per-channel", "scalar"])
def test_each_normalisation_mode_round_trips_through_loader_and_decoder(tmp_path, mode):
    encoder = EncoderInfo(name="dc-ae-f32c32", source="x", revision=None, factor=32, channels=CHANNELS,
                          quantity="mode", scaling_factor=SCALE)
    root = latent_catalog(tmp_path / "cat", encoder)
    write_pack_result(tmp_path / "packs.parquet", pack_catalogs([root], max_tokens=64, epochs=1))
    catalog = Catalog(root)
    scaling = run_normalization([catalog], mode)
    dataset = PackedDataset(tmp_path / "packs.parquet", patch_size=1)
    dataset.set_normalization(scaling)
    decoder = LatentDecoder(type("Enc", (), {"info": encoder})(), scaling, 1)
    latents = {row["row_id"]: row for row in catalog.scan().collect().iter_rows(named=True)}
    seen = 0
    for step in range(dataset.num_steps):
        batch = dataset.batch(step)
        for tokens, (h, w), row_id in zip(batch.tokens.split(batch.seqlens()), batch.sizes.tolist(),
                                          batch.row_ids.tolist()):
            z = torch.from_numpy(catalog.latent(row_id).copy()).float()[None]
            normalised = unpatchify(tokens, h, w, CHANNELS, 1)[None]
            if mode == "scalar":  # NiT's rule: z * s, no shift
                torch.testing.assert_close(normalised, z * SCALE, rtol=2 ** -23, atol=0)
            else:
                mean = torch.tensor(scaling.mean)[:, None, None]
                std = torch.tensor(scaling.std)[:, None, None]
                torch.testing.assert_close(normalised, (z - mean) / std, rtol=1e-6, atol=1e-6)
            # back to the decoder's input: the stored latent again, to the last bit or two of float32
            torch.testing.assert_close(decoder.latents(tokens, (h, w)), z, rtol=2 ** -22, atol=1e-6)
            seen += 1
    assert seen == len(latents)


def test_the_imported_run_fine_tunes_with_init_from_and_resumes_and_mismatches_are_refused(nit, tmp_path):
    info = read_run_info(nit["run"])
    encoder = EncoderInfo(**info["data"]["encoder"])
    root = latent_catalog(tmp_path / "cat", encoder, info["data"]["encoder_weights"], n=16)
    write_pack_result(tmp_path / "packs.parquet", pack_catalogs([root], max_tokens=24, epochs=2, seed=0))
    base = dict(packs=str(tmp_path / "packs.parquet"), model="tiny", lr=1e-3, workers=0, log_every=1, ckpt_every=2,
                ema_decay=0.9, tensorboard=False, init_from=str(nit["run"]))
    # nr sample --catalog: in scalar mode the catalogs' statistics do not enter, their encoder does
    from nrtrain.sample import _check_catalogs

    _check_catalogs([root], info["data"], 1, nit["run"])
    other = latent_catalog(tmp_path / "other", EncoderInfo(**{**info["data"]["encoder"], "name": "test-ae"}), n=4)
    with pytest.raises(CheckpointMismatchError, match="trained on latents of encoder name 'dc-ae-f32c32'"):
        _check_catalogs([other], info["data"], 1, nit["run"])
    # the same weights read from elsewhere (a hub id at import, a local copy at encode) are the same latents
    moved = latent_catalog(tmp_path / "moved", EncoderInfo(**{**info["data"]["encoder"], "source": "/elsewhere"}),
                           info["data"]["encoder_weights"], n=4)
    _check_catalogs([moved], info["data"], 1, nit["run"])

    # NiT's weights learned z * s: a per-channel fine-tune would feed them another scale
    with pytest.raises(CheckpointMismatchError, match=r"scalar normalisation \(z x 0.41407\) but this run uses "
                                                      r"per-channel.*normalization = \"scalar\""):
        train(TrainConfig(**base, out=str(tmp_path / "pc"), steps=1))
    with pytest.raises(CheckpointMismatchError, match="scales by 0.5; set scaling_factor = 0.41407"):
        train(TrainConfig(**base, out=str(tmp_path / "half"), steps=1, normalization="scalar", scaling_factor=0.5))
    with pytest.raises(CheckpointMismatchError, match="its model differs from this config's: hidden 64 there, 256 here; depth 2 there, 4 here"):
        train(TrainConfig(**{**base, "model": "demo"}, out=str(tmp_path / "demo"), steps=1, normalization="scalar"))

    # fine-tune NiT's weights in scalar mode: model and EMA start from them, then resume
    tuned = TrainConfig(**base, out=str(tmp_path / "tuned"), steps=2, normalization="scalar")
    first = train(tuned)
    start = load_weights(nit["run"])
    record = read_run_info(tmp_path / "tuned")
    assert record["init_from"]["skipped"] == [] and record["data"]["normalization"]["mode"] == "scalar"
    assert record["model"]["rope_grid"] == "nit" and record["model"]["num_classes"] == CLASSES
    ema = load_weights(tmp_path / "tuned", ema=True)
    moved = load_weights(tmp_path / "tuned", ema=False)
    key = "blocks.0.attn.qkv.weight"
    # EMA 0.9 of two steps from the start: within 0.19 of the way from start to model
    assert not torch.equal(moved[key], start[key])
    assert torch.allclose(ema[key], start[key], atol=0.2 * (moved[key] - start[key]).abs().max().item() + 1e-7)
    resumed = train(TrainConfig(**{**asdict(tuned), "steps": 4, "resume": True}))
    assert (first.final_step, resumed.steps, resumed.final_step) == (2, 2, 4)

    # a per-channel run resumed in scalar mode (or the other way) is refused
    with pytest.raises(CheckpointMismatchError, match="per-channel normalisation but this run uses scalar"):
        pc = TrainConfig(packs=base["packs"], model="tiny", workers=0, tensorboard=False, steps=1, ckpt_every=1,
                         out=str(tmp_path / "plain"))
        train(pc)
        train(TrainConfig(**{**asdict(pc), "steps": 2, "resume": True, "normalization": "scalar"}))


def test_loaders_report_missing_and_skipped_keys_and_skip_extras_only_on_request():
    from nrtrain.checkpoint import load_state

    config = NiTConfig(in_channels=CHANNELS, patch_size=1, hidden=D, depth=DEPTH, heads=HEADS, num_classes=CLASSES,
                       rope_grid="nit", repa_depth=1, repa_dim=12, repa_hidden=32)
    source = NiT.from_config(config).state_dict()
    plain = NiT.from_config(NiTConfig(**{**asdict(config), "repa_depth": None, "repa_dim": None}))
    with pytest.raises(CheckpointMismatchError, match="not in the model: projector.0.bias, .*ignore_extra"):
        load_state(plain, source)
    report = load_state(plain, source, ignore_extra=("projector.",))
    assert report.skipped == sorted(k for k in source if k.startswith("projector.")) and report.missing == []
    # the other way: a model with a projector from weights without one
    with_projector = NiT.from_config(config)
    without = plain.state_dict()
    with pytest.raises(CheckpointMismatchError, match="missing from the checkpoint: projector"):
        load_state(with_projector, without)
    report = load_state(with_projector, without, allow_missing=("projector.",))
    assert report.missing == sorted(k for k in source if k.startswith("projector.")) and report.skipped == []
    assert torch.equal(with_projector.blocks[0].attn.qkv.weight, plain.blocks[0].attn.qkv.weight)
    # NiT's own loader: an extra key is refused, then skipped when asked
    nit_state = {k: torch.zeros(s) for k, s in nit_layout().items()}
    nit_state["pos_embed"] = torch.zeros(1, 4)
    with pytest.raises(ValueError, match="not in the model"):
        load_nit_checkpoint(NiT.from_config(NiTConfig(**{**asdict(config), "repa_depth": None, "repa_dim": None})),
                            nit_state)
    loaded = load_nit_checkpoint(plain, nit_state, ignore_extra=("pos_embed",))
    assert "pos_embed" in loaded.ignored and "projector.0.weight" in loaded.ignored
