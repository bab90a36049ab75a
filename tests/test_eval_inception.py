"""nr eval through torch-fidelity's Inception with random weights saved by the test in torch-fidelity's
format and loaded through the same path as the real weights. Few, small images: each costs one
299x299 Inception pass (~6 GFLOP), and each FID one scipy sqrtm of a 2048² matrix, so the whole
journey (nr eval reference, then nr eval) runs once per module."""

from __future__ import annotations

import json
import urllib.error

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import cli
from nreval import inception as inception_module
from nreval.evaluate import evaluate, reference_side
from nreval.inputs import NpzImages
from nreval.metrics import GaussianStatistics
from nreval.inception import InceptionUnavailable, load_inception, write_random_weights
from nreval.reference import read_reference, write_reference

SIZES = [(40, 56), (48, 48), (40, 56), (56, 40), (48, 48), (40, 56)]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_random_weights(tmp_path_factory.mktemp("inception") / "weights.pth", seed=0)


@pytest.fixture(scope="module")
def inception(weights):
    torch.manual_seed(0)
    return load_inception(weights)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        # smooth random fields: unlike white noise, they give the random network distinct features
        low = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
        Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def journey(weights, image_folder, tmp_path_factory):
    """nr eval reference (native, unit 1: every image kept at its own size), then nr eval of the same images."""
    reference = tmp_path_factory.mktemp("reference") / "ref.npz"
    runner = CliRunner()
    built = runner.invoke(cli.app, ["eval", "reference", str(image_folder), "--size", "64x64", "--policy", "native",
                                    "--unit", "1", "--count", "4", "--out", str(reference), "--inception-weights",
                                    str(weights), "--workers", "0", "--batch-size", "4"])
    scored = runner.invoke(cli.app, ["eval", str(image_folder), "--ref", str(reference), "--inception-weights",
                                     str(weights), "--workers", "1", "--batch-size", "4"])
    return built, scored, reference


def test_features_are_torch_fidelitys_with_the_spatial_slice_in_h_w_c_order(inception):
    images = torch.randint(0, 256, (2, 3, 37, 45), dtype=torch.uint8)
    seen = {}
    hook = inception.model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: seen.update(out=o.clone()))
    try:
        features = inception(images)
    finally:
        hook.remove()
    mixed = seen["out"]
    assert mixed.shape == (2, 192, 17, 17)
    spatial = features["spatial"]
    assert spatial.shape == (2, 17 * 17 * 7) == (2, 2023)
    for h, w, c in ((0, 0, 0), (0, 0, 6), (0, 1, 0), (3, 5, 2), (16, 16, 6)):
        assert spatial[1, (h * 17 + w) * 7 + c] == mixed[1, c, h, w]
    pool = features["pool"]
    assert pool.shape == (2, 2048) and features["logits"].shape == (2, 1008)
    assert torch.allclose(features["logits"], pool @ inception.model.fc.weight.T, atol=1e-5)  # no bias
    assert pool.std() > 1e-2 and spatial.std() > 1e-2  # random weights that still tell images apart


def test_weights_load_from_the_file_and_are_identified_by_their_hash(weights, inception, tmp_path):
    state = torch.load(weights)
    assert torch.equal(inception.model.fc.weight, state["fc.weight"])
    assert inception.weights_path == weights and len(inception.weights_sha256) == 64
    other = write_random_weights(tmp_path / "other.pth", seed=1)
    assert load_inception(other).weights_sha256 != inception.weights_sha256


def test_offline_without_weights_the_error_says_where_to_put_them(monkeypatch, tmp_path):
    monkeypatch.delenv("NR_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(inception_module._tf_inception_module(), "load_state_dict_from_url", no_network)
    with pytest.raises(InceptionUnavailable) as error:
        load_inception()
    message = str(error.value)
    assert inception_module.WEIGHTS_URL in message and "--inception-weights" in message
    assert str(tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth") in message
    monkeypatch.setenv("NR_INCEPTION_WEIGHTS", str(tmp_path / "missing.pth"))
    with pytest.raises(InceptionUnavailable, match=r"\$NR_INCEPTION_WEIGHTS names .*missing.pth, which is not a file"):
        load_inception()


def test_identical_samples_and_reference_give_fid_zero_and_precision_recall_one(journey, image_folder):
    built, scored, reference = journey
    assert built.exit_code == 0, built.output
    assert scored.exit_code == 0, scored.output
    lines = {line.split(": ")[0]: float(line.split(": ")[1]) for line in scored.stdout.splitlines()
             if ": " in line and not line.startswith("wrote")}
    assert list(lines) == ["Inception Score", "FID", "sFID", "Precision", "Recall"]
    assert abs(lines["FID"]) < 1e-3 and abs(lines["sFID"]) < 1e-3
    assert lines["Precision"] == lines["Recall"] == 1.0 and lines["Inception Score"] >= 1.0
    record = json.loads((image_folder / "eval-ref.json").read_text())
    assert record["metrics"]["fid"] == lines["FID"]
    assert record["samples"]["count"] == 6 and record["samples"]["kind"] == "image-folder"
    assert record["samples"]["sizes"] == {"40x56": 3, "48x48": 2, "56x40": 1}
    assert record["reference"]["pool_features"] == "precomputed" and record["reference"]["images"] == 4
    assert record["reference"]["provenance"]["policy"] == "native"
    assert len(record["inception"]["sha256"]) == 64


def test_reference_of_mixed_sizes_holds_statistics_and_pool_features_and_its_provenance(journey, weights):
    _, _, reference = journey
    with np.load(reference) as data:
        assert "arr_0" not in data.files  # sizes differ: no ADM image batch
        assert data["pool"].shape == (4, 2048) and data["sigma"].shape == (2048, 2048)
        assert data["sigma_s"].shape == (2023, 2023) and data["mu_s"].shape == (2023,)
    provenance = json.loads(reference.with_suffix(".json").read_text())
    assert provenance["images"] == 6 and provenance["kept"] == 4 and provenance["arr_0"] is None
    assert provenance["sizes"] == {"40x56": 3, "48x48": 2, "56x40": 1} and provenance["size"] == "64x64"


def test_adm_references_use_their_statistics_when_present_and_arr_0_otherwise(inception, tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (4, 24, 24, 3), dtype=np.uint8)
    np.savez(tmp_path / "plain.npz", arr_0=images)
    plain = reference_side(read_reference(tmp_path / "plain.npz"), inception, batch_size=3)
    assert plain.statistics_from == "arr_0" and plain.pool.shape == (4, 2048)
    assert np.array_equal(plain.statistics.mu, GaussianStatistics.of(plain.pool).mu)
    assert plain.spatial_statistics.sigma.shape == (2023, 2023)
    # with ADM's four statistics: those are used, and arr_0 gives only the pool features
    mu, mu_s = np.arange(2048, dtype=np.float64), np.ones(2023)
    np.savez(tmp_path / "adm.npz", arr_0=images, mu=mu, sigma=np.eye(2048), mu_s=mu_s, sigma_s=np.eye(2023))
    adm = reference_side(read_reference(tmp_path / "adm.npz"), inception, batch_size=4)
    assert adm.statistics_from.startswith("precomputed") and np.allclose(adm.pool, plain.pool, atol=1e-5)
    assert np.array_equal(adm.statistics.mu, mu) and np.array_equal(adm.spatial_statistics.mu, mu_s)


def test_a_reference_made_with_other_weights_is_refused_before_any_work(inception, image_folder, tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    write_reference(tmp_path / "other.npz", images=images, pool=np.zeros((4, 2048), np.float32), statistics=None,
                    spatial_statistics=None, inception_sha256="0" * 64)
    with pytest.raises(ValueError, match="other.npz was made with Inception weights sha256 000000000000"):
        evaluate(image_folder, tmp_path / "other.npz", inception)


def test_cli_refuses_wrong_arguments_with_the_reason(weights, image_folder, tmp_path):
    runner = CliRunner()
    missing_ref = runner.invoke(cli.app, ["eval", str(image_folder)])
    assert missing_ref.exit_code == 2 and "--ref" in missing_ref.output
    # paths are checked before the Inception weights are looked for (or downloaded)
    (tmp_path / "some-ref.npz").write_bytes(b"")
    no_samples = runner.invoke(cli.app, ["eval", str(tmp_path / "nothing"), "--ref", str(tmp_path / "some-ref.npz")])
    def flat(output: str) -> str:  # rich wraps the message inside a box at the terminal's width
        return " ".join(output.replace("│", " ").split())

    assert no_samples.exit_code == 2 and "Invalid value for 'samples'" in flat(no_samples.output)
    assert "does not exist" in flat(no_samples.output) and "Inception" not in no_samples.output
    no_ref = runner.invoke(cli.app, ["eval", str(image_folder), "--ref", str(tmp_path / "r.npz")])
    assert no_ref.exit_code == 2 and "Invalid value for '--ref'" in flat(no_ref.output)
    bad_size = runner.invoke(cli.app, ["eval", "reference", str(image_folder), "--size", "64by64", "--out",
                                       str(tmp_path / "r.npz")])
    assert bad_size.exit_code == 2 and "expected HxW" in bad_size.output
    bad_policy = runner.invoke(cli.app, ["eval", "reference", str(image_folder), "--size", "64x64", "--policy", "crop",
                                         "--out", str(tmp_path / "r.npz")])
    assert bad_policy.exit_code == 2 and "choose one of center-crop, resize, native, fit" in bad_policy.output
    bad_weights = runner.invoke(cli.app, ["eval", str(image_folder), "--ref", str(tmp_path / "some-ref.npz"),
                                          "--inception-weights", str(tmp_path / "none.pth")])
    assert bad_weights.exit_code == 2 and "none.pth, which is not a file" in bad_weights.output
    assert not (tmp_path / "r.npz").exists()
    helped = runner.invoke(cli.app, ["eval", "--help"])
    assert helped.exit_code == 0 and "reference" in helped.output
