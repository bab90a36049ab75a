"""nr encode on Ray Data: in-process on a shared local Ray, killed and resumed, and submitted as a Ray job
to a real `ray start --head` cluster on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from nrdata.catalog import Catalog, layout, validate_catalog  # noqa: E402
from nrdata.demo_data import BAD_FILES, CLASSES, write_demo_images  # noqa: E402
from nrdata.encoders import PixelEncoder  # noqa: E402
from nrdata.policies import parse_policy  # noqa: E402
from nrdata.repa_images import repa_views  # noqa: E402
from pipelines.encode import EncodeConfig, EncoderSpec, run_encode  # noqa: E402

VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def local_ray():
    """One small Ray for the in-process runs (run_encode joins it instead of starting its own)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 << 20)
    yield
    ray.shutdown()


def _check_complete(catalog: Path, images_root: Path, variants: list[str], unit: int, *, flip: bool) -> Catalog:
    """Every good image exactly once per variant, every bad one in the errors table, latents exact."""
    cat = Catalog(catalog)
    assert validate_catalog(catalog).ok
    good = sorted(p.relative_to(images_root).as_posix() for p in images_root.rglob("*")
                  if p.is_file() and p.relative_to(images_root).as_posix() not in BAD_FILES)
    index = cat.index.to_pylist()
    assert sorted((r["key"], r["variant"]) for r in index) == sorted((k, v) for k in good for v in variants)
    assert set(cat.errors()["key"].to_pylist()) == set(BAD_FILES)
    encoder = PixelEncoder(factor=unit)
    for variant in variants:
        policy = parse_policy(variant, unit=unit)
        for row in [r for r in index if r["variant"] == variant][::7]:
            pixels = policy.apply(Image.open(images_root / row["key"]).convert("RGB"))
            assert np.array_equal(encoder.decode(cat.latent(row["row_id"])[None])[0], pixels)
            if flip:
                assert np.array_equal(encoder.decode(cat.latent(row["row_id"], flip=True)[None])[0], pixels[:, ::-1])
            assert row["label"] == CLASSES.index(row["class_name"])
    return cat


def test_encode_on_ray_is_complete_exact_and_resumes(tmp_path, local_ray):
    images = write_demo_images(tmp_path / "images", per_class=8, seed=3)
    config = EncodeConfig(source=str(images.root), out=str(tmp_path / "cat"), encoder=EncoderSpec("pixel", factor=8),
                          policies=("native", "64"), flip=True, shard_rows=9, images_per_call=5,
                          max_failure_rate=0.5, repa_pixels=4)
    seen = []
    first = run_encode(config, on_progress=lambda p: seen.append(p.done))
    assert first.ray["mode"] == "existing"
    good = 8 * len(CLASSES)
    assert (first.encoded, first.skipped, first.failed) == (2 * good, 0, len(BAD_FILES))
    assert seen[-1] == first.progress.total == 2 * (good + len(BAD_FILES)) and seen == sorted(seen)
    cat = _check_complete(tmp_path / "cat", images.root, ["native", "64"], 8, flip=True)
    assert cat.manifest.normalization.ready and cat.manifest.notes["made_by"] == "nr encode"
    assert len(list((tmp_path / "cat" / layout.SHARD_DIR).iterdir())) > 1
    # --repa-pixels 4: each latent's REPA image, its encoded pixels at 4 px per latent cell
    assert cat.manifest.repa_pixels == 4
    for row in cat.index.to_pylist()[::5]:
        pixels = parse_policy(row["variant"], unit=8).apply(Image.open(images.root / row["key"]).convert("RGB"))
        latent_hw = (row["latent_h"], row["latent_w"])
        np.testing.assert_array_equal(cat.repa_image(row["row_id"]), repa_views(pixels[None], latent_hw, 4)[0])

    again = run_encode(config)
    assert (again.encoded, again.skipped, again.failed) == (0, 2 * good, 0)
    assert len(Catalog(tmp_path / "cat")) == 2 * good


def test_a_source_failing_wholesale_stops_with_a_clear_message(tmp_path, local_ray):
    from pipelines.encode import EncodeAborted

    root = tmp_path / "src" / "junk"
    root.mkdir(parents=True)
    for i in range(12):
        (root / f"{i}.jpg").write_bytes(b"not a jpeg")
    Image.new("RGB", (40, 40)).save(root / "ok.png")
    config = EncodeConfig(source=str(tmp_path / "src"), out=str(tmp_path / "cat"),
                          encoder=EncoderSpec("pixel", factor=8), failure_rate_after=5, max_failure_rate=0.2)
    with pytest.raises(EncodeAborted, match=r"of 13 images failed .* --max-failure-rate 20.0%.*re-run"):
        run_encode(config)
    assert len(Catalog(tmp_path / "cat").errors()) == 12  # what was seen is kept


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_tree(pid: int) -> list[int]:
    import psutil

    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return [pid]


def _stop_processes_mentioning(text: str) -> None:
    import psutil

    for process in psutil.process_iter(["cmdline"]):
        if any(text in part for part in process.info["cmdline"] or ()):
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def test_sigkill_midway_then_rerun_gives_every_image_exactly_once(tmp_path):
    images = write_demo_images(tmp_path / "images", per_class=60, seed=4)
    command = [str(VENV_BIN / "nr"), "encode", str(images.root), str(tmp_path / "cat"), "--factor", "8",
               "--variant", "native", "--variant", "64", "--shard-rows", "4", "--max-failure-rate", "0.5"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                              start_new_session=True)
    index_dir = tmp_path / "cat" / layout.INDEX_DIR
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and victim.poll() is None:
        if index_dir.is_dir() and len(list(index_dir.glob("*.parquet"))) >= 3:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed; give it more images"
    tree = _process_tree(victim.pid)
    for pid in tree:  # the driver and the embedded Ray it started, all at once, as a crash would
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    victim.wait()
    parts_at_kill = len(list(index_dir.glob("*.parquet")))
    assert 3 <= parts_at_kill < 2 * 60 * len(CLASSES) // 4

    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "already in the catalog" in rerun.stdout
    _check_complete(tmp_path / "cat", images.root, ["native", "64"], 8, flip=True)


def test_ray_job_submit_to_a_started_head_node(tmp_path):
    images = write_demo_images(tmp_path / "images", per_class=5, seed=5)
    gcs, dashboard, agent, agent_grpc, runtime_env, metrics = (_free_port() for _ in range(6))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PATH": f"{VENV_BIN}:{os.environ['PATH']}"}
    ray_cli = str(VENV_BIN / "ray")
    temp_dir = Path("/tmp") / f"nrray{os.getpid()}"  # Ray's socket paths must stay short
    start = subprocess.run([ray_cli, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}",
                            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--num-cpus=2",
                            # own ports: another Ray on this machine (the local_ray fixture) holds the defaults
                            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
                            "--disable-usage-stats", f"--temp-dir={temp_dir}"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert start.returncode == 0, start.stderr[-3000:]
    try:
        for _ in range(30):  # the head's job agent comes up a few seconds after `ray start` returns
            submit = subprocess.run(
                [ray_cli, "job", "submit", f"--address=http://127.0.0.1:{dashboard}", "--",
                 str(VENV_BIN / "nr"), "encode", str(images.root), str(tmp_path / "cat"), "--factor", "8",
                 "--variant", "native", "--max-failure-rate", "0.5"],
                capture_output=True, text=True, env=env, timeout=300)
            if "No available agent" not in submit.stderr:
                break
            time.sleep(1)
        assert submit.returncode == 0, (submit.stdout + submit.stderr)[-3000:]
        assert "Ray cluster" in submit.stdout and "succeeded" in submit.stdout
    finally:
        _stop_processes_mentioning(str(temp_dir))  # `ray stop` would also stop other tests' Ray
    _check_complete(tmp_path / "cat", images.root, ["native"], 8, flip=True)


@pytest.mark.parametrize("name, file, dtype", [("dc-ae-f32c32", "dcae", "bfloat16"),
                                               ("sd-vae-ft-ema", "kl", "float32"),
                                               ("va-vae-f16d32", "vavae.ckpt", "float16")])
def test_vae_encoders_on_ray_equal_a_direct_call(tmp_path_factory, local_ray, name, file, dtype):
    pytest.importorskip("diffusers")
    sys.path.insert(0, str(Path(__file__).parent))
    from vae_factory import write_tiny_vaes

    from nrdata.encoders import load_encoder

    weights = tmp_path_factory.getbasetemp() / "tiny-vaes"
    if not (weights / "vavae.ckpt").exists():
        weights.mkdir(exist_ok=True)
        write_tiny_vaes(weights)
    tmp_path = tmp_path_factory.mktemp(name)
    images = write_demo_images(tmp_path / "images", per_class=2, seed=6)
    config = EncodeConfig(source=str(images.root), out=str(tmp_path / "cat"),
                          encoder=EncoderSpec(name, source=str(weights / file), dtype=dtype),
                          policies=("native", "64"), flip=True, max_failure_rate=0.5)
    summary = run_encode(config)
    assert summary.encoded == 2 * 2 * len(CLASSES) and summary.failed == len(BAD_FILES)
    cat = Catalog(tmp_path / "cat")
    assert validate_catalog(cat.root).ok
    m = cat.manifest
    direct = load_encoder(name, str(weights / file), dtype=dtype)
    assert m.encoder == direct.info and m.dtype == dtype and m.normalization.ready
    for row in cat.index.to_pylist()[::3]:
        policy = parse_policy(row["variant"], unit=m.encoder.factor)
        pixels = policy.apply(Image.open(images.root / row["key"]).convert("RGB"))
        expected = _as_float(direct.encode(np.stack([pixels, pixels[:, ::-1]])), dtype)
        # same pixels and weights; other batch-mates may change the float rounding by one step of the dtype
        atol = {"bfloat16": 2e-2, "float16": 1e-3, "float32": 1e-5}[dtype]
        np.testing.assert_allclose(_as_float(cat.latent(row["row_id"]), dtype), expected[0], atol=atol)
        np.testing.assert_allclose(_as_float(cat.latent(row["row_id"], flip=True), dtype), expected[1], atol=atol)


def _as_float(stored: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":  # raw bf16 words are the top halves of float32 values
        return (stored.astype(np.uint32) << 16).view(np.float32)
    return stored.astype(np.float32)
