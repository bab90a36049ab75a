"""Fault injection on runs: damaged checkpoints, bad values, full or read-only disks, two writers, empty
data. Every case goes through the real CLI and must end in a non-zero exit with one line that names
the file or value, before any training step or sample runs on the damage, and leave no temporary.

Tests run as root here, where chmod does not stop writes: read-only folders are simulated by raising
the error a read-only filesystem gives (EROFS / EACCES) at the write call, and a full disk by ENOSPC.
"""

from __future__ import annotations

import errno
import fcntl
import json
import shutil
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from catalog_factory import make_manifest, make_rows, write_catalog  # noqa: E402
from test_sample import CLASSES, FACTOR, PATCH, pixel_catalog  # noqa: E402
from test_train import _config, _packs  # noqa: E402

from cli import app  # noqa: E402
from nrdata.packing.catalog_packs import pack_catalogs, write_pack_result  # noqa: E402
from nrdata.packing.packs_file import lock_path  # noqa: E402
from nrtrain.checkpoint import data_identity, save_checkpoint  # noqa: E402
from nrtrain.model import build_model  # noqa: E402
from nrtrain.normalization import catalog_normalization  # noqa: E402
from nrtrain.train import read_metrics, train  # noqa: E402

runner = CliRunner()
TRAIN = ["--set", "workers=0", "--set", "tensorboard=false", "--set", "log_every=1", "--set", "ckpt_every=2"]


def _invoke(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    # a handled failure is typer.Exit (SystemExit); anything else is a traceback the user would see
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def _one_line(output: str) -> str:
    """The error line, with rich's wrapping undone (it breaks long lines in the test terminal)."""
    return " ".join(output.split())


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith(".tmp-")]


def _flip_bit(path: Path, offset_from_end: int = 9) -> None:
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x10  # inside the last tensor's bytes: the file still parses
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("faults")
    packs = _packs(root, 40, 160)
    return {"root": root, "packs": packs, "catalog": root / "cat"}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A run with checkpoints at steps 2 and 4 and a metrics record per step; tests copy it."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(_config(data["packs"], out, steps=4, ckpt_every=2, log_every=1))
    return out


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _resume(data, run: Path, steps: int = 6):
    return _invoke("train", "--packs", data["packs"], "--out", run, "--steps", steps, "--resume", *TRAIN)


def _untouched(run: Path) -> None:
    """No training step ran: no new checkpoint, no new metrics."""
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002", "step-00000004"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


# -- damaged checkpoints ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["model.safetensors", "ema.safetensors"])
def test_resume_refuses_a_flipped_bit_and_names_the_previous_good_checkpoint(data, run, name):
    _flip_bit(run / "checkpoints" / "step-00000004" / name)
    result = _resume(data, run)
    line = _one_line(result.output)
    assert result.exit_code == 2, result.output
    assert f"step-00000004/{name} does not match the hash written when it was saved" in line
    assert "resume from" in line and "step-00000002" in line and "checkpoints/latest" in line
    _untouched(run)


def test_resume_refuses_a_truncated_checkpoint_file(data, run):
    state = run / "checkpoints" / "step-00000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    result = _resume(data, run)
    line = _one_line(result.output)
    assert result.exit_code == 2, result.output
    assert "step-00000004/state.pt is 100 bytes but was" in line and "truncated" in line
    assert "step-00000002" in line
    _untouched(run)


def _drop_checksums(folder: Path) -> None:
    info = json.loads((folder / "run.json").read_text())
    del info["checksums"]
    (folder / "run.json").write_text(json.dumps(info, indent=2))


def test_a_checkpoint_saved_without_checksums_still_resumes_and_a_truncated_one_is_named(data, run):
    for folder in (run / "checkpoints").glob("step-*"):
        _drop_checksums(folder)  # as written before checksums existed
    model = run / "checkpoints" / "step-00000004" / "model.safetensors"
    intact = model.read_bytes()
    model.write_bytes(intact[: len(intact) // 2])
    result = _resume(data, run)
    line = _one_line(result.output)
    assert result.exit_code == 2, result.output
    assert "step-00000004/model.safetensors cannot be read" in line and "step-00000002" in line
    _untouched(run)

    model.write_bytes(intact)
    result = _resume(data, run, steps=5)
    assert result.exit_code == 0, result.output
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]


def test_an_edited_run_json_is_caught(data, run):
    path = run / "checkpoints" / "step-00000004" / "run.json"
    path.write_text(path.read_text().replace('"step": 4', '"step": 40'))
    result = _resume(data, run)
    assert result.exit_code == 2 and "step-00000004/run.json does not match the hash" in _one_line(result.output)
    _untouched(run)


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> dict:
    """Two checkpoints of a tiny pixel-space model (saved as the trainer saves them), no training."""
    root = tmp_path_factory.mktemp("sample")
    catalog = pixel_catalog(root / "catalog")
    model = build_model("tiny", in_channels=3 * FACTOR**2, patch_size=PATCH, num_classes=CLASSES,
                        attention="sdpa-loop")
    info = {"config": {"model": "tiny"}, "model": asdict(model.config),
            "data": data_identity([catalog], catalog_normalization(catalog), PATCH)}
    for step in (3, 7):
        save_checkpoint(root / "run", step, model=model, ema=model, state={}, run_info=info)
    return {"root": root, "run": root / "run"}


def _sample(run: Path, out: Path, *extra: str):
    return _invoke("sample", run, "--out", out, "--size", "8x8", "--count", "1", "--steps", "1", "--device", "cpu",
                   *extra)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_sample_refuses_damaged_weights(sample_run, tmp_path, damage):
    run = tmp_path / "run"
    shutil.copytree(sample_run["run"], run)
    ema = run / "checkpoints" / "step-00000007" / "ema.safetensors"
    if damage == "flip":
        _flip_bit(ema)
    else:
        ema.write_bytes(ema.read_bytes()[:-64])
    result = _sample(run, tmp_path / "samples")
    line = _one_line(result.output)
    assert result.exit_code == 2, result.output
    assert "step-00000007/ema.safetensors" in line and ("does not match the hash" in line or "bytes but was" in line)
    assert "sample from" in line and "step-00000003" in line
    assert not (tmp_path / "samples").exists()  # nothing was made from the damaged weights

    good = _sample(run / "checkpoints" / "step-00000003", tmp_path / "samples")
    assert good.exit_code == 0, good.output


# -- bad values ----------------------------------------------------------------------------------------

def test_a_config_value_of_the_wrong_type_is_one_line(data, tmp_path):
    cases = {"lr=abc": "config lr = 'abc': must be a number", "steps=2.5": "config steps = 2.5: must be a whole number",
             "tensorboard=3": "config tensorboard = 3: must be true or false"}
    for override, message in cases.items():
        result = _invoke("train", "--packs", data["packs"], "--out", tmp_path / "run", "--set", override)
        assert result.exit_code == 2 and message in _one_line(result.output), result.output
    assert not (tmp_path / "run").exists()


def test_pack_refuses_zero_epochs(data, tmp_path):
    result = _invoke("pack", data["catalog"], "-L", "160", "--out", tmp_path / "p.parquet", "--epochs", "0")
    assert result.exit_code == 2 and "--epochs 0: must be >= 1" in result.output
    assert list(tmp_path.iterdir()) == []


def test_packs_from_another_catalog_are_one_line_in_train_and_export(data, tmp_path):
    import interop_factory

    manifest = make_manifest(channels=4)
    write_catalog(tmp_path / "cat", make_rows(12, manifest, seed=1), manifest)
    write_pack_result(tmp_path / "packs.parquet", pack_catalogs([tmp_path / "cat"], max_tokens=160))
    shutil.rmtree(tmp_path / "cat")  # the same catalog written again with other contents
    write_catalog(tmp_path / "cat", make_rows(12, manifest, seed=2), manifest)
    result = _invoke("train", "--packs", tmp_path / "packs.parquet", "--out", tmp_path / "run", *TRAIN)
    assert result.exit_code == 2 and "contents changed since" in _one_line(result.output), result.output
    assert not (tmp_path / "run" / "checkpoints").exists()

    other = interop_factory.make_manifest("dc-ae-f32c32", ["native"], dtype="float32")
    interop_factory.write_catalog(tmp_path / "dc", other, interop_factory.make_rows(other, 3))
    write_pack_result(tmp_path / "dc.parquet", pack_catalogs([tmp_path / "dc"], max_tokens=4096))
    interop_factory.write_catalog(tmp_path / "dc2", other, interop_factory.make_rows(other, 4))
    result = _invoke("export", "nit", tmp_path / "dc2", "--out", tmp_path / "nit", "--packs", tmp_path / "dc.parquet")
    assert result.exit_code == 2 and "contents changed since" in _one_line(result.output), result.output


# -- output folders: missing, full, read-only, shared ------------------------------------------------------

def test_outputs_inside_missing_folders_are_created(data, sample_run, tmp_path):
    packs = tmp_path / "a" / "b" / "packs.parquet"
    result = _invoke("pack", data["catalog"], "-L", "160", "--out", packs)
    assert result.exit_code == 0 and packs.is_file() and packs.with_suffix(".report.json").is_file(), result.output
    result = _invoke("train", "--packs", packs, "--out", tmp_path / "c" / "d" / "run", "--steps", "1", *TRAIN)
    assert result.exit_code == 0 and (tmp_path / "c" / "d" / "run" / "checkpoints" / "latest").is_file(), result.output
    result = _sample(sample_run["run"], tmp_path / "e" / "f" / "samples")
    assert result.exit_code == 0 and (tmp_path / "e" / "f" / "samples" / "provenance.json").is_file(), result.output

    import interop_factory

    manifest = interop_factory.make_manifest("dc-ae-f32c32", ["native"], dtype="float32")
    interop_factory.write_catalog(tmp_path / "dc", manifest, interop_factory.make_rows(manifest, 2))
    result = _invoke("export", "nit", tmp_path / "dc", "--out", tmp_path / "g" / "h" / "nit")
    assert result.exit_code == 0 and any((tmp_path / "g" / "h" / "nit").iterdir()), result.output


def _fail_with(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, f"{errno.errorcode[code]} injected", str(args[1]) if len(args) > 1 else None)
    return fail


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_pack_output_that_cannot_be_written_leaves_the_previous_outputs_and_no_temporary(data, tmp_path,
                                                                                         monkeypatch, code):
    out = tmp_path / "packs.parquet"
    assert _invoke("pack", data["catalog"], "-L", "160", "--out", out).exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    # the packs file is written first and fails; then the plot, the third file, after two succeeded
    import nrdata.packing as packing
    import nrdata.packing.packs_file as packs_file

    for target, name in ((packs_file.pq, "write_table"), (packing, "plot_packing")):
        with monkeypatch.context() as patch:
            patch.setattr(target, name, _fail_with(code))
            result = _invoke("pack", data["catalog"], "-L", "160", "--out", out, "--seed", "5")
        line = _one_line(result.output)
        assert result.exit_code == 1, result.output
        assert f"cannot write {tmp_path}" in line and errno.errorcode[code] in line
        assert _temporaries(tmp_path) == []
        assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   PermissionError(errno.EACCES, "Permission denied")])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_leaves_no_temporary(data, tmp_path, monkeypatch, error):
    import nrtrain.checkpoint as checkpoint

    def fail(tensors, filename, *args, **kwargs):
        raise error

    monkeypatch.setattr(checkpoint, "save_file", fail)
    run = tmp_path / "run"
    result = _invoke("train", "--packs", data["packs"], "--out", run, "--steps", "2", *TRAIN)
    line = _one_line(result.output)
    assert result.exit_code == 1, result.output
    assert f"cannot write checkpoint file {run}/checkpoints/step-00000002/model.safetensors" in line
    assert error.strerror in line and "--overwrite" in line  # nothing to resume from: the first checkpoint failed
    assert _temporaries(run) == [] and not list((run / "checkpoints").glob("step-*"))


def test_a_second_pack_to_the_same_output_is_refused_while_the_first_holds_the_lock(data, tmp_path):
    out = tmp_path / "packs.parquet"
    lock = lock_path(out)
    with open(lock, "a+") as held:  # what a running `nr pack` holds (an flock conflicts across open files)
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242")
        held.flush()
        result = _invoke("pack", data["catalog"], "-L", "160", "--out", out)
    line = _one_line(result.output)
    assert result.exit_code == 2 and f"another `nr pack` is writing {out}" in line and "pid 4242" in line
    assert not out.exists() and _temporaries(tmp_path) == []
    again = _invoke("pack", data["catalog"], "-L", "160", "--out", out)  # released: it goes through
    assert again.exit_code == 0 and out.is_file(), again.output


# -- sizes that cannot fit ---------------------------------------------------------------------------------

def test_sample_refuses_a_size_beyond_the_limit_before_allocating(sample_run, tmp_path, monkeypatch):
    result = _sample(sample_run["run"], tmp_path / "huge", "--size", "100000x100000")
    line = _one_line(result.output)
    assert result.exit_code == 2 and "size 100000x100000" in line and "above the limit of" in line, result.output
    assert not (tmp_path / "huge").exists()

    import nrtrain.sample as sample_module

    monkeypatch.setattr(sample_module, "available_memory", lambda device: 1 << 20)  # 1 MiB free
    result = _sample(sample_run["run"], tmp_path / "big", "--size", "512x512")
    line = _one_line(result.output)
    assert result.exit_code == 2 and "size 512x512" in line and "GiB available on cpu" in line, result.output


# -- nothing to work on -----------------------------------------------------------------------------------------

def _encode_without_ray(monkeypatch) -> None:
    """Ray takes tens of seconds to start: replace its stream with the same per-image preparation run
    inline (decode and resize; every failure becomes an error row, as the Ray stages record it)."""
    import pipelines.encode as encode
    from nrdata.encoding import prepare_item
    from nrdata.policies import ResolutionPolicy
    from nrdata.sources import SourceItem

    def stream(config, manifest, work, policies, writer, progress, dtype, ray_info, on_progress):
        by_variant = {p["variant"]: ResolutionPolicy.from_dict({k: v for k, v in p.items() if k != "variant"})
                      for p in manifest.policies}
        for item in work:
            source = SourceItem(Path(item["path"]), item["key"], item["label"], item["class_name"])
            prepared = prepare_item(source, [by_variant[v] for v in item["variants"]], max_pixels=config.max_pixels)
            assert not prepared.images, "the test images are all broken"
            for key, variant, stage, message in prepared.errors:
                writer.add_error(key, stage, message, variant=variant, source=key)
                progress.failed += 1

    monkeypatch.setattr(encode, "connect_ray", lambda address: {"mode": "inline (test)"})
    monkeypatch.setattr(encode, "_stream", stream)


def test_a_folder_of_broken_images_fails_at_encode_pack_and_train(data, tmp_path, monkeypatch):
    images = tmp_path / "images" / "cls"
    images.mkdir(parents=True)
    (images / "empty.png").write_bytes(b"")
    (images / "text.jpg").write_text("not an image")
    (images / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    _encode_without_ray(monkeypatch)
    catalog = tmp_path / "catalog"
    result = _invoke("encode", tmp_path / "images", catalog, "--no-flip")
    line = _one_line(result.output)
    assert result.exit_code == 1, result.output
    assert "none of the 3 images" in line and f"nr catalog errors {catalog}" in line

    result = _invoke("pack", catalog, "-L", "64", "--out", tmp_path / "packs.parquet")
    assert result.exit_code == 2 and "there are no rows" in _one_line(result.output), result.output
    assert not (tmp_path / "packs.parquet").exists()

    # a packs file made anyway (by the library) is refused by train in one line naming the catalog
    write_pack_result(tmp_path / "packs.parquet", pack_catalogs([catalog], max_tokens=64))
    result = _invoke("train", "--packs", tmp_path / "packs.parquet", "--out", tmp_path / "run", *TRAIN)
    line = _one_line(result.output)
    assert result.exit_code == 2 and "had no rows" in line and str(catalog) in line, result.output


# -- runs that must not mix ----------------------------------------------------------------------------------

def test_training_into_an_existing_run_needs_resume_or_overwrite(data, run):
    result = _invoke("train", "--packs", data["packs"], "--out", run, "--steps", "2", *TRAIN)
    line = _one_line(result.output)
    assert result.exit_code == 2 and f"{run} already holds a run" in line and "--resume" in line, result.output
    assert "--overwrite" in line
    _untouched(run)

    result = _invoke("train", "--packs", data["packs"], "--out", run, "--steps", "2", "--overwrite", *TRAIN)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-00000002"]
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert not [p for p in run.iterdir() if p.name.startswith(".overwritten-")]


def test_resume_with_fewer_steps_than_the_checkpoint_is_refused(data, run):
    result = _resume(data, run, steps=3)
    line = _one_line(result.output)
    assert result.exit_code == 2 and "steps = 3 is below step 4 of the checkpoint" in line, result.output
    assert "step-00000004" in line
    _untouched(run)


def test_resume_truncates_the_metrics_to_the_checkpoint(data, run):
    (run / "checkpoints" / "latest").write_text("step-00000002\n")  # as if the run died before saving step 4
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 5, "lo')  # a line cut short by the crash
    result = _resume(data, run, steps=4)
    assert result.exit_code == 0, result.output
    steps = [r["step"] for r in read_metrics(run)]
    assert steps == [1, 2, 3, 4]
    assert np.all(np.diff(steps) > 0)
