"""One command that proves nr's GPU path end to end and measures it, built for one lent H200.

Sections (each runs even when an earlier one failed; each has a time budget, and the variants that
would start after it are skipped and listed, so the whole stays under 8 minutes on an H200):

  cli     the real CLI as a user runs it, as subprocesses: a DC-AE-f32c32-shaped catalog written with
          nr's CatalogWriter (nr encode needs Ray, absent there; its manifest names a real-architecture
          AutoencoderDC with random weights saved with save_pretrained, so nr sample decodes with it),
          then `nr pack`, `nr train` 30 steps in bf16 with checkpoints every 15, `nr train --resume` to
          40, `nr sample` at a square and a wide size (bf16 on CUDA), and on CUDA a short
          `nr train --set compile=true`; exit codes and outputs (checkpoints, metrics.jsonl, .npz) are
          checked. This is the crash detector.
  train   bench/train_throughput.measure_training: NiT-XL, L=16384, bf16, DC-AE native-size packs,
          every step through nrtrain.train.train_step; tokens/s, MFU (formula in the JSON), peak
          memory, per attention backend present (torch-varlen, flash-varlen, flex, sdpa-loop),
          torch.compile off/on, packed against padded batches of the same images.
  sample  bench/sample_throughput.measure_sampling: NiT-XL, Euler ODE 50 steps, CFG on [0, 0.7]
          against CFG on every step, at 256² and 512² (8x8 and 16x16 latent tokens).
  encode  bench/encode_throughput.measure_encoder: the real-size DC-AE f32c32 architecture (random
          weights), nr's batched encoder path in bf16 against NiT's loop (batch 1, fp32), at 256²
          and native sizes; no Ray.
  eval    bench/eval_throughput.measure_eval: nr eval's Inception features (torch-fidelity's InceptionV3,
          random weights) on PNG samples, batched with DataLoader workers against batch-1, images/s; precision/
          recall over 10,000 x 10,000 rows on the device. Skipped, with the reason, when torch-fidelity is absent.
  tests   pytest on the tests that need CUDA (tests/test_gpu_path.py's test_cuda_*, pinned-memory
          batches): the varlen and flex kernels against the masked reference in bf16, a compiled bf16
          training step with one graph and no graph break. On a CPU only collected.

`--smoke` runs the same code on the CPU with tiny sizes in about a minute (tests/test_gpu_check.py
runs it, so this script cannot rot). Output: gpu_check.json (every figure, the device, torch, the
command, each section's seconds, status and error text) and gpu_check.log (everything printed,
subprocess output included) in --out (default: $OUT when set, else gpu-check-out/). The JSON is
rewritten after every section. Exit status 1 when any section failed.

The device call (lent H200: Python 3.12, torch 2.11+cu130, numba, pyarrow, safetensors, typer, rich,
matplotlib, pillow present; polars and diffusers absent; nothing can be downloaded there):

    bash bench/gpu_wheels.sh            # here, once: polars, diffusers, importlib-metadata into .whl/

    device run, carry [".whl"], timeout_s 600:
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit; PYTHONUNBUFFERED=1 python3 bench/gpu_check.py

Usage here: .venv/bin/python bench/gpu_check.py --smoke [--out DIR] [--keep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

import numpy as np  # noqa: E402
import torch  # noqa: E402

SECTIONS = ("cli", "tests", "train", "sample", "encode", "eval")
FACTOR = 32  # DC-AE f32
CHANNELS = 32
NR = "import sys; from cli import main; sys.argv[0] = 'nr'; main()"  # nr is not pip-installed on the device


@dataclass(frozen=True)
class Plan:
    """Every size the check uses; GPU_PLAN is what the issue asks for, SMOKE_PLAN the same code in tiny."""

    budgets: dict[str, float]  # seconds per section
    real_dcae: bool
    # cli
    catalog_rows: int
    latent_sides: tuple[int, int]  # tokens per side, drawn as h ~ N(12, 2.5), w ~ N(13, 2.5) clipped to this
    cli_model: str
    cli_max_tokens: int
    cli_workers: int
    sample_sizes: tuple[str, ...]
    sample_count: int
    sample_steps: int
    sample_dtype: str
    cli_compile: bool
    # train, sample, encode: keyword arguments of the bench functions
    train: dict[str, Any] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)
    encode_images: int = 64
    encode_variants: tuple[str, ...] = ("256", "native")
    # eval: keyword arguments of bench/eval_throughput.measure_eval, and the PNG samples it reads
    eval_images: int = 512
    eval: dict[str, Any] = field(default_factory=dict)


GPU_PLAN = Plan(
    budgets={"cli": 140, "tests": 40, "train": 120, "sample": 50, "encode": 40, "eval": 30}, real_dcae=True,
    catalog_rows=600, latent_sides=(5, 16), cli_model="B", cli_max_tokens=8192, cli_workers=2,
    sample_sizes=("256x256", "256x512"), sample_count=4, sample_steps=10, sample_dtype="bfloat16", cli_compile=True,
    train=dict(preset="XL", max_tokens=16_384, steps=10, warmup=3, compile_modes=(False, True), precision="bf16",
               rounds=1, compile_estimate_s=45.0),
    sample=dict(preset="XL", sizes=[256, 512], batch=64, steps=50, cfg_scale=4.0, interval=(0.0, 0.7), repeats=2),
    encode_images=64,
    eval_images=512, eval=dict(batch_size=64, workers=8, baseline_images=64, pr_rows=10_000, fid=False),
)
SMOKE_PLAN = Plan(
    budgets={"cli": 100, "tests": 40, "train": 60, "sample": 20, "encode": 30, "eval": 30}, real_dcae=False,
    catalog_rows=24, latent_sides=(2, 5), cli_model="tiny", cli_max_tokens=64, cli_workers=1,
    sample_sizes=("64x64", "64x128"), sample_count=2, sample_steps=4, sample_dtype="bfloat16", cli_compile=False,
    # compile with dynamo's eager backend: the compiled path is traced, recompiles counted, no C++ build
    train=dict(preset="tiny", max_tokens=256, steps=1, warmup=2, compile_modes=(False, True), precision="fp32",
               rounds=1, backends=("sdpa-loop", "masked-sdpa"), padded_batchings=("random",),
               compile_options={"backend": "eager"}),
    sample=dict(preset="tiny", sizes=[64, 128], batch=2, steps=4, cfg_scale=4.0, interval=(0.0, 0.7), repeats=1),
    encode_images=3,
    eval_images=5, eval=dict(batch_size=4, workers=0, baseline_images=1, pr_rows=None, fid=False),
)


class Log:
    """Everything printed goes to stdout and to the log file."""

    def __init__(self, path: Path):
        self.file = path.open("w", buffering=1)

    def __call__(self, text: str = "") -> None:
        print(text, flush=True)
        self.file.write(text + "\n")

    def close(self) -> None:
        self.file.close()


class SectionFailed(Exception):
    """A check of a section did not hold; the message says which."""


@dataclass
class Context:
    plan: Plan
    device: torch.device
    work: Path
    log: Log
    smoke: bool
    deadline: float = math.inf  # time.monotonic() by which the running section should end
    _dcae: Path | None = None
    notes: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def dcae_folder(self) -> Path | None:
        """A diffusers AutoencoderDC folder (f32c32, random weights): the real architecture on the GPU
        plan, the tests' reduced widths on the smoke plan; None when diffusers is not installed."""
        if self._dcae is None:
            try:
                import diffusers
            except ImportError:
                return None
            from encode_throughput import REAL_DCAE, SMALL_DCAE

            started = time.monotonic()
            torch.manual_seed(0)
            folder = self.work / ("dcae-f32c32-real" if self.plan.real_dcae else "dcae-f32c32-small")
            diffusers.AutoencoderDC(**(REAL_DCAE if self.plan.real_dcae else SMALL_DCAE)).save_pretrained(folder)
            self.log(f"DC-AE f32c32 ({'real-size' if self.plan.real_dcae else 'reduced-width'} architecture, random "
                     f"weights) saved to {folder} in {time.monotonic() - started:.1f} s")
            self._dcae = folder
        return self._dcae


# -- cli --------------------------------------------------------------------------------------------

def nr(ctx: Context, result: dict, name: str, *args: str) -> subprocess.CompletedProcess:
    """Run `nr ARGS` as a subprocess, stream its output into the log, record it; raise on failure."""
    return run_streamed(ctx, result, name, [sys.executable, "-c", NR, *args], shown=["nr", *args], cwd=ctx.work)


def run_streamed(ctx: Context, result: dict, name: str, argv: list[str], *, shown: list[str],
                 cwd: Path) -> subprocess.CompletedProcess:
    """Run argv, stream its output into the log, record it in result["commands"]; raise on failure."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    if ctx.smoke:
        env["OMP_NUM_THREADS"] = "1"  # see main: tiny ops on a shared CPU
    timeout = ctx.left()
    if timeout <= 0:  # an unfinished crash check passes nothing
        raise SectionFailed(f"the section's time budget was spent before `{shlex.join(shown)}`")
    ctx.log(f"$ {shlex.join(shown)}")
    started = time.monotonic()
    lines: list[str] = []
    process = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               errors="replace")

    def stream() -> None:
        for line in process.stdout:
            lines.append(line.rstrip("\n"))
            ctx.log("  | " + lines[-1])

    reader = threading.Thread(target=stream, daemon=True)
    reader.start()
    try:
        returncode = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        returncode = process.wait()
        lines.append(f"killed after {timeout:.0f} s (the section's time budget)")
    reader.join(timeout=10)
    seconds = time.monotonic() - started
    result["commands"].append({"name": name, "argv": shown, "returncode": returncode, "seconds": seconds})
    ctx.log(f"  ({name}: exit {returncode}, {seconds:.1f} s)")
    if returncode != 0:
        tail = "\n".join(lines[-15:])
        raise SectionFailed(f"`{shlex.join(shown)}` exited {returncode}:\n{tail}", result)
    return subprocess.CompletedProcess(argv, returncode, "\n".join(lines))


def write_catalog(ctx: Context, root: Path) -> dict:
    """A catalog of random DC-AE-f32c32-shaped latents at ImageNet native sizes, via nr's own writer."""
    from nrdata.catalog import CatalogWriter, LatentRow
    from nrdata.encoders import PixelEncoder, load_encoder
    from nrdata.encoding import catalog_manifest
    from nrdata.policies import parse_policy

    folder = ctx.dcae_folder()
    if folder is not None:
        encoder = load_encoder("dc-ae-f32c32", str(folder), dtype="bfloat16")  # what nr encode would record
    else:
        encoder = PixelEncoder(FACTOR)
        ctx.notes.append("diffusers is not installed: the cli catalog uses the weight-free pixel encoder (f32)")
    manifest = catalog_manifest(encoder, [parse_policy("native", unit=FACTOR)], flip=True, source_root="/synthetic")
    info = manifest.encoder
    rng = np.random.default_rng(0)
    low, high = ctx.plan.latent_sides
    # pixel latents are 3*32*32 = 3072 uint8 channels: fewer rows keep the fallback catalog small
    n = ctx.plan.catalog_rows if folder is not None else min(ctx.plan.catalog_rows, 100)
    heights = np.clip(np.rint(rng.normal(12.0, 2.5, n) * high / 16), low, high).astype(int)
    widths = np.clip(np.rint(rng.normal(13.0, 2.5, n) * high / 16), low, high).astype(int)
    generator = torch.Generator().manual_seed(0)

    def latent(h: int, w: int):
        if manifest.dtype == "uint8":
            return torch.randint(0, 256, (info.stored_channels, h, w), generator=generator, dtype=torch.uint8).numpy()
        return torch.randn(info.stored_channels, h, w, generator=generator).to(torch.bfloat16)

    with CatalogWriter(root, manifest) as writer:
        for i, (h, w) in enumerate(zip(heights.tolist(), widths.tolist())):
            name = f"class{i % 10}"
            writer.add(LatentRow(key=f"{name}/img_{i:05d}.jpg", variant="native", latent=latent(h, w),
                                 latent_flip=latent(h, w), label=i % 10, class_name=name,
                                 source=f"{name}/img_{i:05d}.jpg", orig_w=w * FACTOR + 13, orig_h=h * FACTOR + 7,
                                 image_w=w * FACTOR, image_h=h * FACTOR))
    return {"rows": n, "encoder": info.name, "encoder_source": info.source, "factor": info.factor,
            "channels": info.channels, "dtype": manifest.dtype, "latent_tokens": [int(heights.mean() * widths.mean()),
                                                                                   int((heights * widths).max())]}


def read_metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        raise SectionFailed(f"{path} was not written")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_checkpoints(run: Path, steps: list[int]) -> None:
    found = {int(p.name.removeprefix("step-")): p for p in (run / "checkpoints").glob("step-*") if p.is_dir()}
    missing = [s for s in steps if s not in found]
    if missing:
        raise SectionFailed(f"checkpoints of steps {missing} missing in {run} (found {sorted(found)})")


def section_cli(ctx: Context) -> dict:
    plan, work = ctx.plan, ctx.work
    result: dict[str, Any] = {"commands": []}
    catalog, packs, run, samples = work / "catalog", work / "packs.parquet", work / "run", work / "samples"
    result["catalog"] = write_catalog(ctx, catalog)
    ctx.log(f"catalog: {result['catalog']}")
    nr(ctx, result, "pack", "pack", str(catalog), "-L", str(plan.cli_max_tokens), "--out", str(packs))
    train_args = ["train", "--packs", str(packs), "--out", str(run), "--model", plan.cli_model,
                  "--set", "precision=bf16", "--set", "ckpt_every=15", "--set", "log_every=5",
                  "--set", f"workers={plan.cli_workers}"]
    nr(ctx, result, "train 30 steps (bf16)", *train_args, "--steps", "30")
    check_checkpoints(run, [15, 30])
    first = read_metrics(run)
    nr(ctx, result, "train --resume to 40", *train_args, "--steps", "40", "--resume")
    check_checkpoints(run, [40])
    metrics = read_metrics(run)
    steps = [m["step"] for m in metrics]
    losses = [m["loss"] for m in metrics]
    if steps[-1] != 40 or not all(math.isfinite(x) for x in losses):
        raise SectionFailed(f"metrics.jsonl after the resume: steps {steps}, losses {losses}")
    if len(metrics) <= len(first):
        raise SectionFailed(f"the resumed run logged nothing new ({len(first)} records before, {len(metrics)} after)")
    result["train"] = {"model": plan.cli_model, "max_tokens": plan.cli_max_tokens, "steps": steps, "losses": losses,
                       "tokens_per_s": [m.get("tokens_per_s") for m in metrics],
                       "mfu": [m.get("mfu") for m in metrics]}
    sample_args = ["sample", str(run), "--out", str(samples), "--count", str(plan.sample_count),
                   "--steps", str(plan.sample_steps), "--cfg", "2.0", "--cfg-interval", "0", "0.7",
                   "--dtype", plan.sample_dtype]
    for size in plan.sample_sizes:
        sample_args += ["--size", size]
    nr(ctx, result, "sample", *sample_args)
    npz = sorted(samples.glob("*.npz"))
    shapes = {}
    for path in npz:
        with np.load(path) as data:
            shapes[path.name] = list(data["arr_0"].shape)
            if data["arr_0"].dtype != np.uint8:
                raise SectionFailed(f"{path}: arr_0 is {data['arr_0'].dtype}, not uint8")
    wanted = {tuple(int(x) for x in size.split("x")) for size in plan.sample_sizes}
    got = {tuple(shape[1:3]) for shape in shapes.values()}
    if got != wanted or any(shape[0] != plan.sample_count or shape[3] != 3 for shape in shapes.values()):
        raise SectionFailed(f"samples: expected {plan.sample_count} images at each of {sorted(wanted)}, found {shapes}")
    if not (samples / "provenance.json").exists():
        raise SectionFailed(f"{samples / 'provenance.json'} was not written")
    result["samples"] = shapes
    if plan.cli_compile:
        if ctx.left() < 60:
            result["skipped"] = [f"nr train --set compile=true: {ctx.left():.0f} s of the budget left"]
        else:
            compiled = work / "run-compiled"
            nr(ctx, result, "train --set compile=true", "train", "--packs", str(packs), "--out", str(compiled),
               "--model", plan.cli_model, "--steps", "8", "--set", "precision=bf16", "--set", "compile=true",
               "--set", "log_every=2", "--set", f"workers={plan.cli_workers}")
            check_checkpoints(compiled, [8])
            result["compiled_train"] = [{k: m.get(k) for k in ("step", "loss", "tokens_per_s", "mfu")}
                                        for m in read_metrics(compiled)]
    return result


# -- train, sample, encode --------------------------------------------------------------------------

def section_train(ctx: Context) -> dict:
    from train_throughput import measure_training, print_table

    result = measure_training(ctx.device, deadline=ctx.deadline, log=ctx.log, **ctx.plan.train)
    print_table(result, ctx.log)
    failed = [f"{r['layout']} {r['batches']} {r['attention']} compile {'on' if r['compile'] else 'off'}: {r['error']}"
              for r in result["rows"] if r["status"] == "error"]
    ok = [r for r in result["rows"] if r["status"] == "ok"]
    if failed:
        raise SectionFailed("rows failed:\n" + "\n".join(failed), result)
    if not any(r["layout"] == "packed" for r in ok) or not any(r["layout"] == "padded" for r in ok):
        raise SectionFailed("no packed or no padded row was measured", result)
    return result


def section_sample(ctx: Context) -> dict:
    from sample_throughput import measure_sampling, print_table

    result = measure_sampling(ctx.device, deadline=ctx.deadline, log=ctx.log, **ctx.plan.sample)
    print_table(result, ctx.log)
    if not result["sizes"]:
        raise SectionFailed("no size was measured", result)
    return result


def section_encode(ctx: Context) -> dict:
    from encode_throughput import measure_encoder, write_images

    folder = ctx.dcae_folder()
    if folder is None:
        raise SectionFailed("diffusers is not installed: no DC-AE to measure (carry its wheel: bench/gpu_wheels.sh)")
    images = ctx.work / "encode-images"
    write_images(images, ctx.plan.encode_images)
    result = measure_encoder(ctx.device, folder, images, variants=ctx.plan.encode_variants, deadline=ctx.deadline,
                             log=ctx.log)
    if not result["variants"]:
        raise SectionFailed("no variant was measured", result)
    return result


def section_eval(ctx: Context) -> dict:
    """images/s of nr eval's Inception features (random weights in torch-fidelity's format), batched
    against batch-1, and precision/recall on the device. No FID: scipy's sqrtm runs on the CPU."""
    try:
        from nreval.inception import write_random_weights
        write_random_weights(ctx.work / "inception.pth")
    except (ImportError, RuntimeError) as error:  # torch-fidelity absent, or its Inception unloadable there
        return {"skipped": [f"eval: torch-fidelity's Inception cannot be loaded ({type(error).__name__}: {error}); "
                            "carry its wheel: bench/gpu_wheels.sh"]}
    from eval_throughput import measure_eval, write_samples

    folder = write_samples(ctx.work / "eval-samples", ctx.plan.eval_images)
    result = measure_eval(ctx.device, ctx.work / "inception.pth", folder, deadline=ctx.deadline, log=ctx.log,
                          **ctx.plan.eval)
    if not result["nr_images_s"] > 0:
        raise SectionFailed("no images/s measured", result)
    return result


# the tests that need CUDA (they skip on a CPU): the varlen/flex kernels against the masked reference,
# a compiled bf16 training step without graph breaks, pinned-memory batches
CUDA_TESTS = ("tests/test_gpu_path.py::test_cuda_backends_match_the_masked_reference_in_bf16",
              "tests/test_gpu_path.py::test_cuda_compiled_training_step_in_bf16_has_no_graph_break_and_one_graph",
              "tests/test_loader.py::test_pinned_batches_equal_the_plain_ones")


def section_tests(ctx: Context) -> dict:
    result: dict[str, Any] = {"commands": [], "tests": list(CUDA_TESTS)}
    argv = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *CUDA_TESTS]
    if ctx.device.type != "cuda":
        argv.append("--collect-only")  # on a CPU they would only skip: check that they still exist
    done = run_streamed(ctx, result, "pytest", argv, shown=["pytest", *argv[3:]], cwd=ROOT)
    result["summary"] = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if ctx.device.type == "cuda" and " skipped" in result["summary"]:
        # flash-attn is optional; anything else skipping on a GPU means the check did not check it
        skipped = [line for line in done.stdout.splitlines() if line.startswith("SKIPPED")
                   and "flash-attn is not installed" not in line]
        if skipped:
            raise SectionFailed("CUDA tests skipped on the GPU:\n" + "\n".join(skipped), result)
    return result


SECTION_FUNCTIONS: dict[str, Callable[[Context], dict]] = {
    "cli": section_cli, "train": section_train, "sample": section_sample, "encode": section_encode,
    "tests": section_tests, "eval": section_eval}


# -- the run ----------------------------------------------------------------------------------------

def machine(device: torch.device) -> dict:
    cuda = device.type == "cuda"
    props = torch.cuda.get_device_properties(device) if cuda else None
    versions = {}
    for dist in ("numpy", "numba", "pyarrow", "polars", "diffusers", "safetensors", "typer", "huggingface-hub",
                 "accelerate", "triton", "flash-attn", "ray", "torch-fidelity", "scipy"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "device_memory_gib": props.total_memory / 2**30 if props else None,
            "torch_threads": torch.get_num_threads(), "packages": versions}


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else Path("gpu-check-out")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="the same code on tiny sizes (CPU unless --device)")
    parser.add_argument("--out", type=Path, default=None, help="folder for gpu_check.json and gpu_check.log "
                                                               "(default: $OUT when set, else gpu-check-out/)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available; cpu with --smoke), cpu, cuda")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every section's time budget")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (catalog, runs, samples)")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        parser.error(f"--sections {unknown or 'is empty'}: choose from {SECTIONS}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_check.log")
    device = torch.device(args.device)
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    if args.smoke:
        # tiny ops on contended intra-op threads slow down by 10-100x (the suite runs beside other work)
        torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="nr-gpu-check-"))
    ctx = Context(plan=plan, device=device, work=work, log=log, smoke=args.smoke)
    started = time.monotonic()
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]), "started": dt.datetime.now().isoformat(timespec="seconds"),
        "smoke": args.smoke, "machine": machine(device), "plan": json.loads(json.dumps(asdict(plan), default=str)),
        "budget_s": {name: plan.budgets[name] * args.budget_scale for name in args.sections}, "sections": {},
        "notes": ctx.notes}
    json_path = out / "gpu_check.json"

    def save() -> None:
        report["total_s"] = time.monotonic() - started
        report["passed"] = all(s["status"] == "passed" for s in report["sections"].values())
        json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")

    m = report["machine"]
    log(f"nr GPU check{' (smoke)' if args.smoke else ''}: {report['command']}")
    log(f"machine: {m['host']}, {m['cpus']} cores, python {m['python']}, torch {m['torch']} (CUDA {m['cuda']}), "
        f"device {m['device']} ({m['device_name']}); packages {m['packages']}; work folder {work}")
    try:
        for name in args.sections:
            budget = plan.budgets[name] * args.budget_scale
            log(f"\n== {name} (budget {budget:.0f} s) ==")
            section_started = time.monotonic()
            ctx.deadline = section_started + budget
            entry: dict[str, Any] = {"budget_s": budget}
            try:
                entry["result"] = SECTION_FUNCTIONS[name](ctx)
                entry["status"] = "passed"
            except Exception as error:  # noqa: BLE001 - record, and go on with the next section
                entry["status"] = "failed"
                entry["error"] = f"{type(error).__name__}: {error.args[0] if error.args else error}"
                if isinstance(error, SectionFailed) and len(error.args) > 1:
                    entry["result"] = error.args[1]
                else:
                    entry["traceback"] = traceback.format_exc()
                log(f"{name} FAILED: {entry['error']}")
                if "traceback" in entry:
                    log(entry["traceback"])
            entry["seconds"] = time.monotonic() - section_started
            entry["skipped"] = (entry.get("result") or {}).get("skipped", [])
            log(f"== {name}: {entry['status']} in {entry['seconds']:.1f} s"
                + (f"; skipped: {'; '.join(entry['skipped'])}" if entry["skipped"] else "") + " ==")
            report["sections"][name] = entry
            # compiled graphs hold the section's modules alive: let the next section start on an empty device
            torch._dynamo.reset()
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()
    finally:
        save()
        summary = ", ".join(f"{n} {s['status']} ({s['seconds']:.0f} s)" for n, s in report["sections"].items())
        log(f"\n{'PASSED' if report['passed'] else 'FAILED'}: {summary}; total {report['total_s']:.0f} s; "
            f"{json_path}")
        log.close()
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
