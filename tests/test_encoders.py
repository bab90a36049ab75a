"""The VAE encoders: tiny random-weight models saved to folders and checkpoints, loaded back by name.

The VA-VAE converter is checked against `ldm_reference`, an independent LDM autoencoder.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from nrdata.catalog import Catalog, CatalogWriter, LatentRow, Manifest  # noqa: E402
from nrdata.encoders import PixelEncoder, load_encoder  # noqa: E402
from nrdata.encoders.vavae import (  # noqa: E402
    ConversionError, convert_ldm_vae_state_dict, convert_vavae_checkpoint, diffusers_to_ldm_key, ldm_geometry,
    ldm_to_diffusers_key, load_ldm_vae, vavae_diffusers_config,
)

sys.path.insert(0, str(Path(__file__).parent))
import ldm_reference  # noqa: E402
from vae_factory import TINY_VAVAE, write_tiny_vaes  # noqa: E402

POLICY = {"kind": "native", "unit": 32, "max_area": 2048 * 2048, "target": None, "variant": "native"}


def _images(n, h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _pixels(images):
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def _bf16_words(tensor):
    return tensor.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return root, write_tiny_vaes(root)


# -- VA-VAE conversion ----------------------------------------------------------------------------

def test_converted_vavae_matches_the_ldm_reference(folders):
    _, reference = folders
    model = load_ldm_vae({"state_dict": reference.state_dict()})
    assert model.config.down_block_types[-1] == "AttnDownEncoderBlock2D"
    assert model.config.up_block_types[0] == "AttnUpDecoderBlock2D"
    with torch.no_grad():
        for h, w in ((32, 32), (48, 80)):
            x = _pixels(_images(2, h, w, seed=h))
            posterior = model.encode(x).latent_dist
            ours = torch.cat([posterior.mean, posterior.logvar], 1)
            expected = reference.encode(x)
            torch.testing.assert_close(ours, expected, atol=3e-5, rtol=1e-5)
            z = expected[:, :32]
            torch.testing.assert_close(model.decode(z).sample, reference.decode(z), atol=3e-5, rtol=1e-5)


def test_real_vavae_geometry_converts_key_for_key():
    with torch.device("meta"):  # the full-size architecture, shapes only
        reference = ldm_reference.AutoencoderKL(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2,
                                                attn_resolutions=(16,), resolution=256, z_channels=32)
    ldm_sd = reference.state_dict()
    assert any(k.startswith("encoder.down.4.attn.1.") for k in ldm_sd)
    assert any(k.startswith("decoder.up.4.attn.2.") for k in ldm_sd)
    geometry = ldm_geometry(ldm_sd)
    assert vavae_diffusers_config(**geometry) == vavae_diffusers_config()
    converted = convert_ldm_vae_state_dict(ldm_sd, vavae_diffusers_config())
    assert len(converted) == len(ldm_sd) == 342
    assert converted["encoder.down_blocks.4.attentions.1.to_q.weight"].shape == (512, 512)
    for key in ldm_sd:
        assert diffusers_to_ldm_key(ldm_to_diffusers_key(key, 5), 5) == key


@pytest.mark.parametrize("change, named", [
    ("add encoder.down.3.attn.0.q.weight", "encoder.down.3.attn.0.q.weight"),  # a level without attention
    ("add encoder.down.4.attn.2.proj_out.bias", "encoder.down.4.attn.2.proj_out.bias"),  # one block too many
    ("drop decoder.up.4.attn.1.k.bias", "decoder.up.4.attn.1.k.bias"),
    ("drop encoder.down.4.attn.0.norm.weight", "encoder.down.4.attn.0.norm.weight"),
    ("add encoder.down.0.block.0.temb_proj.weight", "encoder.down.0.block.0.temb_proj.weight"),
])
def test_attention_keys_that_do_not_fit_are_refused_by_name(folders, change, named):
    _, reference = folders
    ldm_sd = dict(reference.state_dict())
    verb, key = change.split()
    if verb == "add":
        ldm_sd[key] = torch.zeros(64, 64, 1, 1) if key.endswith("weight") else torch.zeros(64)
    else:
        del ldm_sd[key]
    config = vavae_diffusers_config(**{**TINY_VAVAE})
    with pytest.raises(ConversionError, match=named.replace(".", r"\.")):
        convert_ldm_vae_state_dict(ldm_sd, config)


def test_shape_mismatch_is_refused(folders):
    _, reference = folders
    ldm_sd = dict(reference.state_dict())
    ldm_sd["encoder.down.4.attn.0.q.weight"] = torch.zeros(64, 32, 1, 1)
    with pytest.raises(ConversionError, match=r"shape mismatches.*encoder\.down\.4\.attn\.0\.q\.weight"):
        convert_ldm_vae_state_dict(ldm_sd, vavae_diffusers_config(**TINY_VAVAE))


def test_the_autoencoder_must_be_found_under_exactly_one_prefix(folders):
    _, reference = folders
    weights = reference.state_dict()
    two = {**{f"ema.{k}": v for k, v in weights.items()}, **{f"model.{k}": v for k, v in weights.items()}}
    with pytest.raises(ConversionError, match="found 'ema.', 'model.'"):
        ldm_geometry(two)
    with pytest.raises(ConversionError, match="found none"):
        ldm_geometry({"xencoder.conv_in.weight": weights["encoder.conv_in.weight"]})


# -- loading by name ------------------------------------------------------------------------------

def test_dcae_latents_equal_a_direct_call(folders):
    root, _ = folders
    encoder = load_encoder("dc-ae-f32c32", str(root / "dcae"), dtype="float32")
    info = encoder.info
    assert (info.name, info.factor, info.channels, info.quantity) == ("dc-ae-f32c32", 32, 32, "mode")
    assert info.scaling_factor == pytest.approx(0.41407)
    assert info.source == str((root / "dcae").resolve()) and info.revision.startswith("sha256:")
    images = _images(2, 64, 96)
    latents = encoder.encode(images)
    direct = diffusers.AutoencoderDC.from_pretrained(root / "dcae").eval()
    with torch.no_grad():
        expected = direct.encode(_pixels(images)).latent
        expected_pixels = direct.decode(expected).sample
    assert latents.dtype == np.float32 and latents.shape == (2, 32, 2, 3)
    np.testing.assert_allclose(latents, expected.numpy(), atol=1e-6)
    decoded = encoder.decode(latents)
    assert decoded.dtype == np.uint8 and decoded.shape == (2, 64, 96, 3)
    expected_uint8 = ((expected_pixels + 1) / 2 * 255).clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert np.abs(decoded.astype(int) - expected_uint8.numpy().astype(int)).max() <= 1


def test_kl_moments_are_mean_then_logvar(folders):
    root, _ = folders
    encoder = load_encoder("sd-vae-ft-ema", str(root / "kl"), dtype="float16")
    assert (encoder.info.factor, encoder.info.channels, encoder.info.quantity) == (8, 4, "moments")
    assert encoder.info.scaling_factor == pytest.approx(0.18215)
    images = _images(3, 32, 48, seed=5)
    moments = encoder.encode(images)
    direct = diffusers.AutoencoderKL.from_pretrained(root / "kl").eval()
    with torch.no_grad():
        posterior = direct.encode(_pixels(images)).latent_dist
        mean_pixels = direct.decode(posterior.mean).sample
    assert moments.dtype == np.float16 and moments.shape == (3, 8, 4, 6)
    np.testing.assert_array_equal(moments[:, :4], posterior.mean.half().numpy())
    np.testing.assert_array_equal(moments[:, 4:], posterior.logvar.half().numpy())
    # moments decode through their mean half, the same as the mean alone
    np.testing.assert_array_equal(encoder.decode(moments), encoder.decode(moments[:, :4]))
    assert encoder.decode(torch.from_numpy(moments[:, :4]).float()).shape == (3, 32, 48, 3)
    assert np.abs(encoder.decode(posterior.mean).astype(int)
                  - ((mean_pixels + 1) * 127.5).clamp(0, 255).round().permute(0, 2, 3, 1).numpy()).max() <= 1


def test_vavae_loads_from_ldm_checkpoints_and_converted_folders(folders, tmp_path):
    root, reference = folders
    images = _images(2, 32, 48, seed=7)
    with torch.no_grad():
        expected = reference.encode(_pixels(images)).numpy()
    folder = convert_vavae_checkpoint(root / "vavae.pt", tmp_path / "vavae-diffusers")
    revisions = set()
    for source in (root / "vavae.pt", root / "vavae.ckpt", root / "vavae.safetensors", folder):
        encoder = load_encoder("va-vae-f16d32", str(source), dtype="float32")
        assert (encoder.info.factor, encoder.info.channels, encoder.info.quantity) == (16, 32, "moments")
        assert encoder.info.scaling_factor is None
        np.testing.assert_allclose(encoder.encode(images), expected, atol=3e-5)
        assert encoder.decode(encoder.encode(images)).shape == (2, 32, 48, 3)
        revisions.add(encoder.info.revision)
    assert len(revisions) == 4  # each file's own content hash
    low = load_encoder("va-vae-f16d32", str(root / "vavae.pt"), dtype="float32", compute_dtype="bfloat16")
    assert next(low.model.parameters()).dtype == torch.bfloat16
    np.testing.assert_allclose(low.encode(images)[:, :32], expected[:, :32], atol=0.1)


def test_a_broken_vavae_checkpoint_names_file_and_key(folders, tmp_path):
    _, reference = folders
    weights = dict(reference.state_dict())
    del weights["decoder.up.4.attn.2.v.weight"]
    torch.save({"state_dict": weights}, tmp_path / "broken.pt")
    named = r"(?s)broken\.pt: .*missing keys \(1\): decoder\.up\.4\.attn\.2\.v\.weight"
    with pytest.raises(ConversionError, match=named):
        load_encoder("va-vae-f16d32", str(tmp_path / "broken.pt"))


def test_bfloat16_latents_go_through_the_catalog(folders, tmp_path):
    root, _ = folders
    encoder = load_encoder("dc-ae-f32c32", str(root / "dcae"))
    assert encoder.dtype == "bfloat16" and encoder.compute_dtype == torch.float32
    images = _images(2, 64, 32, seed=3)
    latents = encoder.encode(images)
    with torch.no_grad():
        direct = diffusers.AutoencoderDC.from_pretrained(root / "dcae").eval().encode(_pixels(images)).latent
    np.testing.assert_array_equal(latents, _bf16_words(direct))
    manifest = Manifest(encoder=encoder.info, dtype=encoder.dtype, policies=(POLICY,), flip="store")
    with CatalogWriter(tmp_path / "cat", manifest) as writer:
        writer.add(LatentRow(key="a.png", variant="native", latent=latents[0], latent_flip=latents[1]))
    catalog = Catalog(tmp_path / "cat")
    assert catalog.manifest.encoder == encoder.info
    torch.testing.assert_close(catalog.latent_torch(0), direct[0].to(torch.bfloat16), atol=0, rtol=0)
    torch.testing.assert_close(catalog.latent_torch(0, flip=True), direct[1].to(torch.bfloat16), atol=0, rtol=0)
    stored = catalog.latent(0)[None]  # raw bf16 words, decoded as such
    np.testing.assert_array_equal(encoder.decode(stored), encoder.decode(direct[:1].to(torch.bfloat16)))


def test_encoding_ignores_the_callers_autocast_and_honours_compute_dtype(folders):
    root, _ = folders
    images = _images(1, 32, 64, seed=11)
    fp32 = load_encoder("sd-vae-ft-ema", str(root / "kl"), dtype="float32")
    plain = fp32.encode(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        np.testing.assert_array_equal(fp32.encode(images), plain)
    bf16 = load_encoder("sd-vae-ft-ema", str(root / "kl"), dtype="float32", compute_dtype="bfloat16")
    assert bf16.compute_dtype == torch.bfloat16
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    low = bf16.encode(images)
    assert not np.array_equal(low, plain)
    np.testing.assert_allclose(low[:, :4], plain[:, :4], atol=0.1)


def test_pixel_names():
    assert isinstance(load_encoder("pixel"), PixelEncoder) and load_encoder("pixel").info.factor == 1
    assert load_encoder("pixel-f8").info.factor == 8
    assert load_encoder("pixel", factor=4, source="ignored").info.channels == 48
    with pytest.raises(ValueError, match="factor"):
        load_encoder("pixel-f8", factor=4)


def test_clear_errors(folders, tmp_path):
    root, _ = folders
    with pytest.raises(ValueError, match=r"unknown encoder 'sd-vae'.*dc-ae-f32c32.*va-vae-f16d32"):
        load_encoder("sd-vae")
    missing = tmp_path / "no" / "such-vae"
    for name in ("dc-ae-f32c32", "sd-vae-ft-ema", "va-vae-f16d32"):
        with pytest.raises(FileNotFoundError, match="no such file or folder"):
            load_encoder(name, str(missing))
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_encoder("va-vae-f16d32", str(missing) + ".pt")
    with pytest.raises(ValueError, match="AutoencoderDC model, not the AutoencoderKL"):
        load_encoder("sd-vae-ft-ema", str(root / "dcae"))
    with pytest.raises(ValueError, match="f8 c4 autoencoder, but va-vae-f16d32 is f16 c32"):
        load_encoder("va-vae-f16d32", str(root / "kl"))
    with pytest.raises(ValueError, match="storage dtype 'int8'"):
        load_encoder("sd-vae-ft-ema", str(root / "kl"), dtype="int8")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_encoder("dc-ae-f32c32", str(tmp_path / "empty"))
    encoder = load_encoder("sd-vae-ft-ema", str(root / "kl"))
    with pytest.raises(ValueError, match="multiples of 8"):
        encoder.encode(_images(1, 30, 32))
    with pytest.raises(ValueError, match=r"\[N, 4 or 8, h, w\]"):
        encoder.decode(np.zeros((1, 6, 2, 2), np.float32))


def test_importing_the_encoders_does_not_import_diffusers():
    code = ("import sys, nrdata, nrdata.encoders; from nrdata.encoders import load_encoder; "
            "print(sorted(m for m in ('diffusers', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent.parent)
    assert out.stdout.strip() == "[]"
