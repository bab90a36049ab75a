"""The CLI as a user runs it: demo, catalog inspection, validate's exit codes, doctor, --version."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli import app
from nrdata.catalog import layout

runner = CliRunner()


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory) -> Path:
    """The demo's images encoded by `nr encode` as a user types it (the whole demo is tests/test_demo.py)."""
    from nrdata.demo_data import write_demo_images

    out = tmp_path_factory.mktemp("demo")
    images = write_demo_images(out / "images", per_class=6, seed=0)
    result = runner.invoke(app, ["encode", str(images.root), str(out / "catalog"), "--definition", "demo",
                                 "--max-failure-rate", "0.5"])
    assert result.exit_code == 0, result.output
    assert "30 rows encoded" in result.output and "3 new error rows" in result.output
    again = runner.invoke(app, ["encode", str(images.root), str(out / "catalog"), "--definition", "demo"])
    assert again.exit_code == 0 and "0 rows encoded, 30 already in the catalog" in again.output
    return out


def test_encode_leaves_a_valid_catalog(demo_out):
    result = runner.invoke(app, ["catalog", "validate", str(demo_out / "catalog")])
    assert result.exit_code == 0 and "valid" in result.output


def test_catalog_commands_show_what_is_inside(demo_out, tmp_path):
    cat = str(demo_out / "catalog")
    info = runner.invoke(app, ["catalog", "info", cat])
    assert info.exit_code == 0 and "pixel" in info.output and "uint8" in info.output and "rows" in info.output
    head = runner.invoke(app, ["catalog", "head", cat, "-n", "2", "--variant", "native"])
    assert head.exit_code == 0 and "native" in head.output and "×" in head.output
    png = tmp_path / "sizes.png"
    stats = runner.invoke(app, ["catalog", "stats", cat, "--png", str(png)])
    assert stats.exit_code == 0 and "aspect ratio" in stats.output and png.exists()
    errors = runner.invoke(app, ["catalog", "errors", cat])
    assert errors.exit_code == 0 and "zero-byte" in errors.output and "truncated" in errors.output


def test_validate_exits_non_zero_on_a_broken_catalog(demo_out, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(demo_out / "catalog", broken)
    layout.listing(broken / layout.SHARD_DIR, layout.SHARD_SUFFIX)[0].unlink()
    result = runner.invoke(app, ["catalog", "validate", str(broken)])
    assert result.exit_code == 1 and "INVALID" in result.output and "missing" in result.output


def test_a_folder_that_is_not_a_catalog_gets_a_clear_error(tmp_path):
    result = runner.invoke(app, ["catalog", "info", str(tmp_path)])
    assert result.exit_code == 2 and "no manifest" in result.output


def test_version_and_doctor():
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.startswith("nr ")
    doctor = runner.invoke(app, ["doctor"])
    assert "torch" in doctor.output and "attention backend" in doctor.output and "sdpa-loop" in doctor.output


def test_export_nit_and_import_it_back_through_the_cli(tmp_path):
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from interop_factory import make_manifest, make_rows, write_catalog

    from nrdata.catalog import Catalog

    manifest = make_manifest("dc-ae-f32c32", ["native", "256"], dtype="bfloat16")
    write_catalog(tmp_path / "cat", manifest, make_rows(manifest, 6))
    result = runner.invoke(app, ["export", "nit", str(tmp_path / "cat"), "--out", str(tmp_path / "nit")])
    assert result.exit_code == 0, result.output
    assert "12 rows: 12 written" in result.output
    refused = runner.invoke(app, ["export", "uvit", str(tmp_path / "cat"), "--out", str(tmp_path / "u")])
    assert refused.exit_code == 2 and "nr encode SOURCE CATALOG --encoder sd-vae-ft-ema" in refused.output
    wrong = runner.invoke(app, ["export", "fit", str(tmp_path / "cat"), "--out", str(tmp_path / "f"),
                                "--packs", "p.parquet"])
    assert wrong.exit_code == 2 and "--packs applies to nit" in wrong.output
    back = runner.invoke(app, ["import", "nit", str(tmp_path / "nit"), "--out", str(tmp_path / "back"),
                               "--dtype", "bfloat16"])
    assert back.exit_code == 0, back.output
    a, b = Catalog(tmp_path / "cat"), Catalog(tmp_path / "back")
    assert len(a) == len(b) == 12
    rows_a = {(r["key"], r["variant"]): r for r in a.index.to_pylist()}
    for r in b.index.to_pylist():
        mine = rows_a[(r["key"], r["variant"])]
        assert (r["label"], r["latent_h"], r["latent_w"]) == (mine["label"], mine["latent_h"], mine["latent_w"])
        assert (b.latent(r["row_id"]) == a.latent(mine["row_id"])).all()


def _not_installed(monkeypatch, *names: str) -> None:
    """Importing any of `names` (and their submodules) raises ImportError, as when it is not installed."""
    import sys

    for name in names:
        for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
            monkeypatch.delitem(sys.modules, loaded)
        monkeypatch.setitem(sys.modules, name, None)


def test_without_the_optional_extras_plots_and_logs_are_skipped_with_a_note(demo_out, tmp_path, monkeypatch):
    _not_installed(monkeypatch, "matplotlib", "tensorboard", "torch.utils.tensorboard", "ray.train")
    cat = str(demo_out / "catalog")
    packs = tmp_path / "packs.parquet"
    result = runner.invoke(app, ["pack", cat, "-L", "1024", "--out", str(packs)])
    assert result.exit_code == 0, result.output
    assert packs.is_file() and packs.with_suffix(".report.json").is_file() and not packs.with_suffix(".png").exists()
    assert "matplotlib is not installed: packs.png skipped; pip install 'nr[plots]'" in result.output

    # a plot the user asked for is an error, not a note
    png = tmp_path / "sizes.png"
    stats = runner.invoke(app, ["catalog", "stats", cat, "--png", str(png)])
    assert stats.exit_code == 2 and "pip install 'nr[plots]'" in stats.output and not png.exists()

    # nr train: a note for each skipped output first; Ray Train missing stops with the extra to install
    ray = runner.invoke(app, ["train", "--packs", str(packs), "--out", str(tmp_path / "run"), "--ray-workers", "2"])
    assert ray.exit_code == 2, ray.output
    assert "TensorBoard logging skipped; pip install 'nr[tensorboard]'" in ray.output
    assert "loss.png skipped; pip install 'nr[plots]'" in ray.output
    assert "Ray Train (nr train --ray-workers): ray[train] is not installed" in ray.output
    assert "pip install 'nr[ray-train]'" in ray.output and not (tmp_path / "run").exists()


def test_the_training_log_without_tensorboard_or_matplotlib(tmp_path, monkeypatch):
    from nrtrain.config import TrainConfig
    from nrtrain.run_folder import MetricsLog, plot_loss, run_notices

    _not_installed(monkeypatch, "matplotlib", "tensorboard", "torch.utils.tensorboard")
    assert len(run_notices(TrainConfig(tensorboard=True))) == 2
    assert [n for n in run_notices(TrainConfig(tensorboard=False)) if "TensorBoard" in n] == []
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write({"step": 1, "loss": 0.5})
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1 and not (tmp_path / "tensorboard").exists()
    assert plot_loss(tmp_path) is None and not (tmp_path / "loss.png").exists()
    monkeypatch.undo()
    assert plot_loss(tmp_path) == tmp_path / "loss.png" and (tmp_path / "loss.png").stat().st_size > 1000
