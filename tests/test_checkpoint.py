"""Checkpoint replacement is crash-safe: wherever a re-save of an existing step stops, `latest` names a
complete checkpoint (the old save or the new one), the next save tidies up, and a run resumes."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_train import _config, _packs  # noqa: E402

from nrtrain import checkpoint as ckpt  # noqa: E402
from nrtrain.checkpoint import (load_model, load_training_state, load_weights, read_run_info,  # noqa: E402
                                resolve_checkpoint, save_checkpoint)
from nrtrain.train import read_metrics, train  # noqa: E402

FILES = {"model.safetensors", "ema.safetensors", "state.pt", "run.json"}


class Crash(Exception):
    """The process dies here (not an OSError, so nothing on the way swallows it)."""


def _save(run: Path, step: int, value: float, keep: int | None = None) -> Path:
    model = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(model.weight, value)
    torch.nn.init.constant_(model.bias, value)
    ema = torch.nn.Linear(3, 2)
    torch.nn.init.constant_(ema.weight, -value)
    torch.nn.init.constant_(ema.bias, -value)
    return save_checkpoint(run, step, model=model, ema=ema, state={"step": step, "value": value},
                           run_info={"value": value}, keep=keep)


def _value(folder: Path) -> float:
    weights = load_weights(folder, ema=False)
    value = float(weights["weight"][0, 0])
    assert all(torch.equal(t, torch.full_like(t, value)) for t in weights.values())
    assert all(torch.equal(t, torch.full_like(t, -value)) for t in load_weights(folder, ema=True).values())
    assert load_training_state(folder)["value"] == value and read_run_info(folder)["value"] == value
    return value


def _entries(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _assert_step_folders_complete(run: Path) -> None:
    for folder in (run / "checkpoints").glob("step-*"):
        assert {p.name for p in folder.iterdir()} == FILES, folder


@pytest.fixture
def crash_at(monkeypatch):
    """Make the k-th call that changes the checkpoints folder (rename, replace, link, rmtree) crash; a
    crashing rmtree first deletes one file, as a real one killed midway would."""
    calls = {"n": 0, "at": None}

    def count() -> None:
        calls["n"] += 1
        if calls["n"] == calls["at"]:
            raise Crash(f"crash at call {calls['n']}")

    real_rename, real_replace, real_link, real_rmtree = Path.rename, os.replace, os.link, shutil.rmtree

    def rename(self, target):
        count()
        return real_rename(self, target)

    def replace(src, dst, **kw):
        count()
        return real_replace(src, dst, **kw)

    def link(src, dst, **kw):
        count()
        return real_link(src, dst, **kw)

    def rmtree(path, *args, **kw):
        if calls["n"] + 1 == calls["at"] and Path(path).is_dir():
            files = sorted(p for p in Path(path).rglob("*") if p.is_file())
            if files:
                files[0].unlink()
        count()
        return real_rmtree(path, *args, **kw)

    monkeypatch.setattr(Path, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "link", link)
    monkeypatch.setattr(shutil, "rmtree", rmtree)

    def arm(at: int | None) -> dict:
        calls.update(n=0, at=at)
        return calls

    return arm


@pytest.mark.parametrize("latest_names_it", [True, False])
def test_a_crash_anywhere_in_a_same_step_resave_leaves_a_loadable_latest(tmp_path, crash_at, latest_names_it):
    def before(run: Path) -> None:
        crash_at(None)
        _save(run, 4, 1.0)
        _save(run, 8, 1.0)
        if not latest_names_it:  # the earlier run stopped after writing step 8, before naming it
            (run / "checkpoints" / "latest").write_text("step-00000004\n")

    # count the folder changes of one whole re-save, then crash at each of them in turn
    before(tmp_path / "probe")
    calls = crash_at(None)
    _save(tmp_path / "probe", 8, 2.0)
    total = calls["n"]
    assert total >= 5

    for at in range(1, total + 1):
        run = tmp_path / f"run-{at}"
        before(run)
        crash_at(at)
        with pytest.raises(Crash):
            _save(run, 8, 2.0)
        crash_at(None)

        latest = resolve_checkpoint(run)
        assert (latest / "run.json").is_file()
        # the old step 8, or the new one; where step 8 was not named yet, step 4 until the new one is
        expected = {(8, 1.0), (8, 2.0)} if latest_names_it else {(4, 1.0), (8, 2.0)}
        assert (read_run_info(latest)["step"], _value(latest)) in expected, at
        _assert_step_folders_complete(run)

        # the next save tidies up and no checkpoint is lost
        _save(run, 12, 3.0, keep=3)
        assert _entries(run) == ["latest", "step-00000004", "step-00000008", "step-00000012"], at
        assert _value(run / "checkpoints" / "step-00000008") in (1.0, 2.0)
        _assert_step_folders_complete(run)


def test_a_crash_between_moving_the_old_folder_away_and_renaming_the_new_one_in(tmp_path, monkeypatch):
    """The moment the issue is about: the old step-8 is gone, the new one not yet in place."""
    run = tmp_path / "run"
    _save(run, 8, 1.0)
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".tmp-step-") and Path(target).name == "step-00000008":
            assert not (run / "checkpoints" / "step-00000008").exists()
            raise Crash("killed before the new folder is renamed in")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(Crash):
        _save(run, 8, 2.0)
    monkeypatch.undo()
    folder = resolve_checkpoint(run)
    assert folder.name.startswith(".") and read_run_info(folder)["step"] == 8 and _value(folder) == 1.0
    assert _value(run) == 1.0  # load_weights through the run folder too


def test_a_normal_replace_leaves_one_folder_and_nothing_hidden(tmp_path):
    run = tmp_path / "run"
    _save(run, 4, 1.0)
    first = _save(run, 8, 1.0)
    inode = (first / "model.safetensors").stat().st_ino
    again = _save(run, 8, 2.0)
    assert again == first and resolve_checkpoint(run) == again and _value(run) == 2.0
    assert _entries(run) == ["latest", "step-00000004", "step-00000008"]
    assert (again / "model.safetensors").stat().st_ino != inode  # new files, not the old ones rewritten
    assert _value(run / "checkpoints" / "step-00000004") == 1.0


def test_keep_prunes_old_steps_only(tmp_path):
    run = tmp_path / "run"
    for step in (1, 2, 3, 4):
        _save(run, step, float(step), keep=2)
    assert _entries(run) == ["latest", "step-00000003", "step-00000004"]
    _save(run, 4, 5.0, keep=2)  # a replace under keep keeps the neighbour
    assert _entries(run) == ["latest", "step-00000003", "step-00000004"]
    assert _value(run) == 5.0


def test_latest_naming_a_missing_folder_says_which_one_to_use(tmp_path):
    run = tmp_path / "run"
    _save(run, 4, 1.0)
    _save(run, 8, 1.0)
    (run / "checkpoints" / "latest").write_text("step-00000012\n")
    with pytest.raises(FileNotFoundError) as err:
        resolve_checkpoint(run)
    message = str(err.value)
    assert "\n" not in message
    assert str(run / "checkpoints" / "latest") in message and "step-00000012" in message
    assert str(run / "checkpoints" / "step-00000008") in message
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    shutil.rmtree(run / "checkpoints" / "step-00000008")
    with pytest.raises(FileNotFoundError, match="no complete step-\\* folder is left"):
        resolve_checkpoint(run)


def test_a_run_resumes_after_a_crash_in_a_same_step_resave(tmp_path, monkeypatch):
    packs = _packs(tmp_path, 40, 160)
    run = tmp_path / "run"
    train(_config(packs, run, steps=8))
    step8 = run / "checkpoints" / "step-00000008"
    old = load_weights(step8, ema=False)

    # re-save step 8 (as a resumed run re-running it would) and die before the new folder is in place
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".tmp-step-"):
            raise Crash("killed")
        return real_rename(self, target)

    model, info = load_model(step8, ema=False)
    ema, _ = load_model(step8, ema=True)
    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(Crash):
        save_checkpoint(run, 8, model=model, ema=ema, state=load_training_state(step8),
                        run_info={k: v for k, v in info.items() if k != "step"}, keep=3)
    monkeypatch.undo()
    assert not step8.exists() and read_run_info(run)["step"] == 8

    summary = train(_config(packs, run, steps=12, resume=True))
    assert (summary.steps, summary.final_step) == (4, 12)
    assert _entries(run) == ["latest", "step-00000004", "step-00000008", "step-00000012"]
    assert all(torch.equal(old[k], v) for k, v in load_weights(step8, ema=False).items())
    assert [m["step"] for m in read_metrics(run)][-2:] == [10, 12]
    _assert_step_folders_complete(run)
    assert ckpt.resolve_checkpoint(run).name == "step-00000012"
