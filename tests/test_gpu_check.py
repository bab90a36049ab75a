"""bench/gpu_check.py, the one command a lent GPU runs, runs here in --smoke: the same code on tiny sizes.

Run as a subprocess, as on the device: any section that fails (a CLI crash, a bench that no longer
calls the trainer's step) fails this test, so the GPU check cannot rot between GPU sessions.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_check(out: Path, *options: str) -> tuple[subprocess.CompletedProcess, dict]:
    process = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--out", str(out),
                              *options], capture_output=True, text=True, timeout=240, cwd=ROOT)
    report = json.loads((out / "gpu_check.json").read_text())
    return process, report


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    process, report = run_check(out)
    return out, process, report


def test_every_section_passes_and_the_exit_status_says_so(smoke):
    out, process, report = smoke
    failed = {name: s.get("error") for name, s in report["sections"].items() if s["status"] != "passed"}
    assert process.returncode == 0 and not failed, f"{failed}\n{process.stdout[-3000:]}\n{process.stderr[-3000:]}"
    assert list(report["sections"]) == ["cli", "tests", "train", "sample", "encode", "eval"] and report["passed"]
    assert report["smoke"] and report["machine"]["torch"] == torch.__version__ and report["machine"]["device"] == "cpu"
    assert "gpu_check.py --smoke" in report["command"]
    for section in report["sections"].values():
        assert 0 < section["seconds"] <= section["budget_s"] + 30


def test_the_log_holds_what_was_printed_and_the_subprocesses_output(smoke):
    out, process, _ = smoke
    log = (out / "gpu_check.log").read_text()
    assert log.strip().endswith(str(out / "gpu_check.json")) and "PASSED" in log
    assert "$ nr train" in log and "  | step" in log and "$ nr sample" in log  # nr's own output, streamed
    assert process.stdout.strip() == log.strip()


def test_cli_section_ran_the_real_commands_and_checked_their_outputs(smoke):
    cli = smoke[2]["sections"]["cli"]["result"]
    names = [c["name"] for c in cli["commands"]]
    assert names == ["pack", "train 30 steps (bf16)", "train --resume to 40", "sample"]
    assert all(c["returncode"] == 0 for c in cli["commands"])
    assert cli["catalog"]["encoder"] == "dc-ae-f32c32" and cli["catalog"]["channels"] == 32
    assert cli["train"]["steps"][-1] == 40 and all(math.isfinite(x) for x in cli["train"]["losses"])
    assert sorted(cli["samples"].values()) == [[2, 64, 64, 3], [2, 64, 128, 3]]


def test_train_section_times_packed_and_padded_rows_with_and_without_compile(smoke):
    train = smoke[2]["sections"]["train"]["result"]
    assert train["step"].startswith("nrtrain.train.train_step") and "model_flops" in train["mfu_formula"]
    assert train["layout_check"] < 1e-3
    ok = [r for r in train["rows"] if r["status"] == "ok"]
    assert {(r["layout"], r["compile"]) for r in ok} == {("padded", False), ("packed", False), ("padded", True),
                                                         ("packed", True)}
    for row in ok:
        assert row["tokens_s"] > 0 and row["tflops"] > 0 and row["vs_padded"] > 0 and math.isfinite(row["last_loss"])
        assert row["mfu"] is None and row["peak_gib"] is None  # CPU: no peak FLOP/s, no CUDA memory
    assert "sdpa-loop, compile on" in train["refused"]  # the library refuses it; recorded, not hidden


def test_sample_section_compares_the_cfg_interval_with_every_step(smoke):
    sample = smoke[2]["sections"]["sample"]["result"]
    assert [s["size"] for s in sample["sizes"]] == [64, 128]
    for entry in sample["sizes"]:
        every, inside = entry["settings"]["every"], entry["settings"]["interval"]
        assert inside["doubled"] < every["doubled"] == every["nfe"]
        assert entry["ratio"] > 0 and math.isclose(entry["ideal_ratio"], every["pack_sized"] / inside["pack_sized"])


def test_encode_section_measures_nr_against_nits_loop(smoke):
    encode = smoke[2]["sections"]["encode"]["result"]
    assert [v["variant"] for v in encode["variants"]] == ["256", "native"]
    for variant in encode["variants"]:
        assert variant["images"] == 3 and variant["nr_images_s"] > 0 and variant["nit_images_s"] > 0


def test_eval_section_measures_batched_features_against_batch_1(smoke):
    result = smoke[2]["sections"]["eval"]["result"]
    assert result["images"] == 5 and result["nr_images_s"] > 0 and result["baseline_images_s"] > 0
    assert result["baseline"].startswith("batch-1") and result["max_feature_difference"] < 1e-3
    assert result["precision_recall_s"] >= 0 and not result["skipped"]


def test_eval_section_without_torch_fidelity_is_skipped_with_the_reason(tmp_path):
    fake = tmp_path / "site" / "torch_fidelity"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('not installed in this test')\n")
    process = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--sections", "eval",
                              "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    section = report["sections"]["eval"]
    assert process.returncode == 0 and section["status"] == "passed", process.stdout[-2000:]
    assert len(section["skipped"]) == 1 and "torch-fidelity's Inception cannot be loaded" in section["skipped"][0]


def test_a_failing_section_is_recorded_and_the_others_still_run(tmp_path):
    # a budget too small for any nr command: cli fails (killed or not started, recorded); sample still
    # measures its first size, skips the second with a note, and passes
    process, report = run_check(tmp_path, "--sections", "cli,sample", "--budget-scale", "0.01")
    assert process.returncode == 1 and not report["passed"]
    assert report["sections"]["cli"]["status"] == "failed" and "nr pack" in report["sections"]["cli"]["error"]
    sample = report["sections"]["sample"]
    assert sample["status"] == "passed" and [s["size"] for s in sample["result"]["sizes"]] == [64]
    assert len(sample["skipped"]) == 1 and "128 px" in sample["skipped"][0]


def test_the_gpu_plan_fits_the_functions_it_feeds_and_the_eight_minutes():
    # the GPU sizes run only on a lent GPU: at least their keywords and budgets are checked here
    import inspect

    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import GPU_PLAN, SECTIONS, SMOKE_PLAN
    from sample_throughput import measure_sampling
    from eval_throughput import measure_eval
    from train_throughput import measure_training

    cuda = torch.device("cuda")
    for plan in (GPU_PLAN, SMOKE_PLAN):
        inspect.signature(measure_training).bind(cuda, **plan.train)
        inspect.signature(measure_sampling).bind(cuda, **plan.sample)
        inspect.signature(measure_eval).bind(cuda, Path("weights.pth"), Path("samples"), **plan.eval)
        assert set(plan.budgets) == set(SECTIONS)
    # budgets stop new variants, not running ones: leave a minute for the last compile and start-up
    assert sum(GPU_PLAN.budgets.values()) <= 7 * 60
    assert GPU_PLAN.train["preset"] == GPU_PLAN.sample["preset"] == "XL" and GPU_PLAN.train["max_tokens"] == 16_384
    assert GPU_PLAN.train["precision"] == "bf16" and GPU_PLAN.sample["sizes"] == [256, 512]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA only: the smoke sizes on the GPU")
def test_smoke_sizes_pass_on_cuda(tmp_path):
    process, report = run_check(tmp_path, "--device", "cuda")
    assert process.returncode == 0, {n: s.get("error") for n, s in report["sections"].items()}
    assert report["machine"]["device_name"] and report["machine"]["cuda"]
