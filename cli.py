"""nr: native-resolution latent diffusion, from an image folder to samples.

The commands parse options, call library functions and print. Heavy imports (torch, ray,
diffusers) stay inside the commands that need them so that `nr --help` answers at once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="nr",
    help="Native-resolution latent diffusion: encode images into a latent catalog, pack, train, sample.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
catalog_app = typer.Typer(help="Inspect and check a latent catalog (manifest + Parquet index + Arrow shards).",
                          no_args_is_help=True)
app.add_typer(catalog_app, name="catalog")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # paths in messages stay whole

CatalogPath = Annotated[Path, typer.Argument(help="Catalog folder (holds manifest.json).", exists=True,
                                             file_okay=False, show_default=False)]


def _version(value: bool) -> None:
    if value:
        from nrdata.version import code_version

        console.print(f"nr {code_version()}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """nr: native-resolution latent diffusion toolkit."""


def _note(text: str) -> None:
    """A one-line note on stderr (an output skipped, say); the text is not rich markup ('nr[plots]')."""
    from rich.markup import escape

    err_console.print(f"[yellow]note:[/yellow] {escape(text)}")


def _open_catalog(path: Path):
    from nrdata.catalog import Catalog, CatalogIntegrityError, ManifestError

    try:
        catalog = Catalog(path)
        catalog.parts  # a broken index is refused here in one line, not half-way through a table
        return catalog
    except (ManifestError, CatalogIntegrityError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


@app.command()
def doctor() -> None:
    """Versions of torch, CUDA, ray, diffusers, flash-attn, and the devices and attention backend a run will use."""
    from rich.markup import escape

    from nrtrain.environment import environment_report

    table = Table(show_header=False, box=None)
    bad = 0
    for check in environment_report():
        mark = "[green]ok[/green]" if check.ok else "[red]missing[/red]"
        bad += not check.ok
        table.add_row(mark, check.name, check.value, f"[dim]{escape(check.hint)}[/dim]")  # 'nr[plots]' is no markup
    console.print(table)
    if bad:
        raise typer.Exit(1)


@app.command()
def demo(
    out: Annotated[Path, typer.Option(help="Folder for everything the demo makes.")] = Path("nr-demo"),
    per_class: Annotated[Optional[int], typer.Option(help="Images per class \\[default: from catalogs/demo.toml].",
                                                     show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the generated images \\[default: from catalogs/demo.toml].",
                                                show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Training steps \\[default: from configs/demo.toml].",
                                                 show_default=False)] = None,
) -> None:
    """The whole journey on built-in data, on a CPU, in a few minutes.

    Generates texture images of many sizes and aspect ratios (and a few broken files), encodes them
    at native resolution on an embedded Ray, packs them, trains a small NiT, and samples every class
    at a square, a wide, a tall and a larger size than any it saw.

    The same code paths as nr encode / pack / train / sample. Re-running resumes each step.
    """
    import time

    from pipelines.demo import run_demo

    start = time.perf_counter()
    outcome = run_demo(out, per_class=per_class, seed=seed, steps=steps, observer=_DemoConsole())
    if not outcome.ok:
        raise typer.Exit(1)
    catalog_path = outcome.catalog
    console.print(f"done in {time.perf_counter() - start:.0f} s. Columns of the grids = classes: "
                  f"{', '.join(outcome.images.classes)}. Look inside:\n"
                  f"  nr catalog info {catalog_path}\n"
                  f"  python -c \"import polars as pl; print(pl.scan_parquet('{catalog_path}/index/*.parquet')"
                  f".group_by('variant','class_name').len().collect())\"", soft_wrap=True)


class _DemoConsole:
    """The demo's progress bars and one summary line per stage (pipelines.demo.DemoObserver)."""

    NUMBERS = {"images": 1, "encode": 2, "validate": 3, "pack": 4, "train": 5, "sample": 6}

    def __init__(self) -> None:
        self.bar = None

    def begin(self, stage: str, total: int | None, completed: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn(f"[bold]{self.NUMBERS[stage]}. {stage}[/bold]"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("{task.fields[note]}"), TimeElapsedColumn(),
                            console=console)
        self.bar.start()
        self.task = self.bar.add_task(stage, total=total, completed=completed, note="")

    def advance(self, completed: int, total: int | None, note: str) -> None:
        self.bar.update(self.task, completed=completed, total=total, note=note)

    def done(self, stage: str, outcome) -> None:
        result = getattr(outcome, stage)
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if stage == "notices":
            for notice in result:
                _note(notice)
        elif stage == "images":
            console.print(f"[bold]1. images[/bold]  {result.images} textures in {len(result.classes)} classes "
                          f"+ {result.bad_files} broken files -> {result.root}")
        elif stage == "encode":
            console.print(f"   {result.encoded} rows encoded, {result.skipped} already there, {result.failed} new "
                          f"error rows (pixel f{outcome.encoder_factor}, variants {', '.join(outcome.variants)}, "
                          f"Ray {result.ray.get('mode')})")
        elif stage == "validate":
            verdict = "[green]valid[/green]" if result.ok else "[red]INVALID[/red]"
            console.print(f"[bold]3. validate[/bold]  {verdict}: {result.rows} rows, {result.shards} shards, "
                          f"{result.error_rows} error rows; sizes -> {result.sizes_png or 'not plotted'}")
        elif stage == "pack":
            console.print(f"[bold]4. pack[/bold]  {result.rows} rows into {result.packs} packs of <= "
                          f"{result.max_tokens} tokens per epoch, {result.efficiency:.1%} full, {result.epochs} "
                          f"epochs -> {result.path}")
        elif stage == "train":
            console.print(f"   {result.model} model, {result.steps} steps -> {result.run_dir} "
                          f"(loss curve {result.loss_png or 'not plotted'})")
        elif stage == "sample":
            for size in result.sizes:
                note = "  [yellow]beyond the training sizes[/yellow]" if size.beyond_training else ""
                console.print(f"   {size.size.name} px: {size.grid}{note}", soft_wrap=True)


ENCODERS_HELP = "pixel (weight-free), dc-ae-f32c32, sd-vae-ft-ema or va-vae-f16d32"


@app.command()
def encode(
    source: Annotated[Path, typer.Argument(help="ImageNet-style folder (<class>/<image>; labels in sorted folder "
                                                "order) or a CSV/Parquet file list with columns path,label.",
                                           exists=True, show_default=False)],
    out: Annotated[Path, typer.Argument(help="Catalog folder to create or resume.", show_default=False)],
    definition: Annotated[Optional[str], typer.Option(
        help="Catalog definition in catalogs/ (e.g. imagenet1k) or a .toml path; the options below override it.",
        show_default=False)] = None,
    encoder: Annotated[Optional[str], typer.Option(help=f"Encoder: {ENCODERS_HELP} \\[default: pixel].",
                                                   show_default=False)] = None,
    encoder_source: Annotated[Optional[str], typer.Option(
        help="Hub id or local folder/checkpoint of the encoder \\[default: the encoder's hub id].",
        show_default=False)] = None,
    factor: Annotated[Optional[int], typer.Option(help="Pixel encoder only: space-to-depth factor \\[default: 8].",
                                                  show_default=False)] = None,
    variant: Annotated[Optional[list[str]], typer.Option(
        help="Variant to store (repeatable): native, 256, 512, native:max_area=N, fit:S, center-crop:S "
             "\\[default: native].", show_default=False)] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Also store the latent of the mirrored "
                                                 "image \\[default: --flip].", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Stored latent dtype: bfloat16, float16, float32 "
                                                 "\\[default: the encoder's].", show_default=False)] = None,
    patch_size: Annotated[Optional[int], typer.Option(help="Patch size of the model to train: native sides become "
                                                           "multiples of factor x patch \\[default: 1, or the "
                                                           "definition's].", show_default=False)] = None,
    batch_pixels: Annotated[int, typer.Option(help="Most pixels per encoder call (flips included); "
                                                   "lower it if the GPU runs out of memory.")] = 32 * 512 * 512,
    limit: Annotated[Optional[int], typer.Option(help="Encode only this many images, spread over the listing "
                                                      "(a quick trial).", show_default=False)] = None,
    ray_address: Annotated[Optional[str], typer.Option(
        help="Ray cluster to join ('auto' = the local one) \\[default: the Ray job's cluster, else an embedded "
             "Ray on this machine].", show_default=False)] = None,
    encoders: Annotated[Optional[int], typer.Option(help="Encoder actors \\[default: one per GPU, else one].",
                                                    show_default=False)] = None,
    max_failure_rate: Annotated[float, typer.Option(help="Stop when more than this fraction of images fails "
                                                         "(checked after 500).")] = 0.05,
    shard_rows: Annotated[int, typer.Option(help="Rows per catalog shard (a commit point).")] = 2048,
    repa_pixels: Annotated[int, typer.Option(
        help="Also store each latent's REPA image, this many pixels per latent cell (uint8, read by `nr train` "
             "with REPA instead of decoding the source at every step): the REPA encoder's patch size / the model's "
             "patch size, e.g. 16 for RADIO or a ViT-/16 on DC-AE f32 with patch 1. 0 stores none.")] = 0,
) -> None:
    """Encode images into a latent catalog on Ray Data, at native resolution and fixed crops.

    Decode/resize on CPU workers, encode on an actor pool (one per GPU, or CPU), write atomic shards.

    Failed images become rows of the errors table. Re-running the same command resumes: committed
    rows are skipped. On a cluster: ray job submit --address http://HEAD:8265 -- nr encode ...
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nrdata.catalog import CatalogLockedError
    from nrdata.definitions import load_definition
    from pipelines.encode import EncodeAborted, EncodeConfig, EncoderSpec, run_encode

    try:
        spec = load_definition(definition) if definition else None
    except (FileNotFoundError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    enc = dict(spec.encoder) if spec else {}
    config = EncodeConfig(
        source=str(source), out=str(out),
        encoder=EncoderSpec(name=encoder or enc.get("name", "pixel"),
                            source=encoder_source or (enc.get("source") if not encoder else None),
                            dtype=dtype or (enc.get("dtype") if not encoder else None),
                            factor=factor or enc.get("factor", 8)),
        policies=tuple(variant or (spec.policies if spec else ("native",))),
        flip=flip if flip is not None else (spec.flip if spec else True),
        patch_size=patch_size or (spec.patch_size if spec else 1), batch_pixels=batch_pixels, limit=limit, ray_address=ray_address,
        encoders=encoders, max_failure_rate=max_failure_rate, shard_rows=shard_rows, repa_pixels=repa_pixels,
        notes={"definition": str(spec.path)} if spec else {},
    )
    columns = (TextColumn("[bold]encode[/bold]"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("encode", total=None, rate="starting Ray...")

        def show(p) -> None:
            progress.update(task, total=p.total, completed=p.done,
                            rate=f"{p.failed} failed, {p.images_per_second:.1f} img/s (decode {p.decode_rate:.0f}/s/worker, "
                                 f"encode {p.encode_rate:.0f}/s/actor)")

        try:
            summary = run_encode(config, on_progress=show)
        except EncodeAborted as exc:
            err_console.print(f"[red]aborted:[/red] {exc}")
            raise typer.Exit(1) from None
        except (FileNotFoundError, ValueError, CatalogLockedError) as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
    p = summary.progress
    console.print(f"{summary.encoded} rows encoded, {summary.skipped} already in the catalog, {summary.failed} new "
                  f"error rows; {summary.items} images in {summary.seconds:.1f} s "
                  f"({p.images_per_second:.1f} img/s; Ray {summary.ray.get('mode')}, "
                  f"{summary.ray.get('actors', 0)} encoder actor(s))")
    console.print(f"catalog: {summary.catalog}  (nr catalog info {summary.catalog}; "
                  f"nr catalog errors {summary.catalog})", soft_wrap=True)
    if summary.items and summary.encoded == 0 and summary.skipped == 0:
        # every image failed: a catalog without rows is not a result (pack and train would refuse it later)
        err_console.print(f"[red]error:[/red] none of the {summary.items} images of {source} was encoded "
                          f"({summary.failed} error rows); see why with `nr catalog errors {summary.catalog}`")
        raise typer.Exit(1)


@app.command()
def pack(
    catalogs: Annotated[list[Path], typer.Argument(help="One or several catalogs; their rows are merged in order.",
                                                    exists=True, file_okay=False, show_default=False)],
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-L", help="Most tokens per pack (NiT-XL: 16384).",
                                            show_default=False)],
    out: Annotated[Path, typer.Option(help="Packs file to write (Parquet).", show_default=False)],
    algorithm: Annotated[str, typer.Option(help="lpfhp, spfhp, or bfd (best-fit-decreasing baseline).")] = "lpfhp",
    patch_size: Annotated[int, typer.Option(help="Model patch size: tokens = latent_h*latent_w/patch².")] = 1,
    variant: Annotated[Optional[list[str]], typer.Option(help="Only rows of this variant (repeatable).")] = None,
    max_images: Annotated[Optional[int], typer.Option(help="Most images per pack \\[default: unlimited].",
                                                      show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed; epoch e packs with (seed, e).")] = 0,
    epochs: Annotated[int, typer.Option(help="Epochs to pre-compute, each packed afresh.")] = 1,
    ranks: Annotated[int, typer.Option(help="Data-parallel ranks to balance packs over.")] = 1,
    drop_too_long: Annotated[bool, typer.Option(help="Drop rows longer than --max-tokens (counted) instead of "
                                                     "stopping with an error.")] = False,
    nit_json: Annotated[Optional[Path], typer.Option(
        help="Also write epoch 0 as NiT sampler-meta JSON: each pack a list of line numbers of the data-meta "
             "JSONL that `nr export nit CATALOG` writes (with --variant V when one --variant is given; several "
             "catalogs: their JSONLs concatenated in the order given). Pack only native and center-crop "
             "variants.", show_default=False)] = None,
) -> None:
    """Pack catalog rows into sequences of at most L tokens (numba LPFHP), afresh for every epoch.

    Writes the packs file, a report JSON and a PNG of lengths and pack fill next to it.
    """
    import json

    from nrdata.extras import available, missing_notice
    from nrdata.packing import packing_report, plot_packing, write_nit_sampler_meta
    from nrdata.packing.catalog_packs import pack_catalogs, write_pack_result
    from nrdata.packing.packs_file import PacksLockedError, PackWriteError, pack_outputs

    for name, value in (("--epochs", epochs), ("--ranks", ranks)):
        if value < 1:
            err_console.print(f"[red]error:[/red] {name} {value}: must be >= 1")
            raise typer.Exit(2)
    report_path, png_path = out.with_suffix(".report.json"), out.with_suffix(".png")
    plots = available("matplotlib")
    try:
        # the lock is taken first, so a second `nr pack` to the same --out is refused before it packs
        with pack_outputs(out) as outputs:
            result = pack_catalogs(catalogs, max_tokens=max_tokens, algorithm=algorithm, patch_size=patch_size,
                                   variants=variant, max_images=max_images, seed=seed, epochs=epochs,
                                   world_size=ranks, on_too_long="drop" if drop_too_long else "error")
            if result.packings[0].n_items == 0:
                where = ", ".join(map(str, catalogs)) + (f" (variants {', '.join(variant)})" if variant else "")
                why = ("every row is longer than --max-tokens" if len(result.selection.lengths)
                       else "there are no rows")
                raise ValueError(f"nothing to pack in {where}: {why}; see why images failed with `nr catalog "
                                 f"errors CATALOG`, or raise --max-tokens")
            if nit_json:  # before anything is written: refused packs leave no files behind
                from nrdata.interop.nit import pack_sampler_meta

                nit_packs = pack_sampler_meta(result.packings[0], result.metadata)
            report = packing_report(result.packings[0], result.ranks[0])
            summary = {"packs_file": str(out), **result.metadata, "epoch0": report.as_dict()}
            outputs.write(out, lambda tmp: write_pack_result(tmp, result))
            outputs.write(report_path, lambda tmp: tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n"))
            if plots:
                outputs.write(png_path, lambda tmp: plot_packing(tmp, result.packings[0], result.selection.lengths))
            if nit_json:
                outputs.write(nit_json, lambda tmp: write_nit_sampler_meta(tmp, nit_packs))
    except (ValueError, PacksLockedError, PackWriteError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(1 if isinstance(exc, PackWriteError) else 2) from None
    console.print(report.format(), soft_wrap=True)
    console.print(f"{len(result.selection.lengths):,} rows from {len(catalogs)} catalog(s), {epochs} epoch(s) -> {out}")
    console.print(f"report: {report_path}, plot: {png_path if plots else 'none'}")
    if not plots:
        _note(missing_notice("matplotlib", skipped=png_path.name))
    if nit_json:
        console.print(f"NiT sampler-meta (epoch 0): {nit_json}")


@app.command()
def train(
    config: Annotated[Optional[Path], typer.Argument(help="Config file (TOML; e.g. configs/nit-xl.toml). "
                                                          "Options below override it.", show_default=False)] = None,
    packs: Annotated[Optional[Path], typer.Option(help="Packs file from `nr pack`.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder: checkpoints, metrics, config.",
                                                show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Model preset: tiny, S, B, L, XL.", show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps in all.", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate.", show_default=False)] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run in --out from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Start afresh in an --out that holds a run: its checkpoints, "
                                                 "metrics and TensorBoard logs are deleted first.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Any config key: --set ema_decay=0.999, "
                                                      "--set repa_encoder=radio.pt (repeatable).",
                                                      show_default=False)] = None,
    ray_workers: Annotated[Optional[int], typer.Option(help="Run as a Ray Train job with this many workers "
                                                            "(one per GPU) on the Ray cluster.",
                                                       show_default=False)] = None,
) -> None:
    """Train a NiT-style packed transformer on the packs of one or several catalogs.

    One process per GPU with torchrun: torchrun --nproc_per_node 8 $(which nr) train CONFIG ...
    Writes config.json, metrics.jsonl, TensorBoard logs, loss.png and checkpoints/step-*/ to --out.
    """
    from nrdata.extras import MissingExtraError
    from nrdata.packing.catalog_packs import PacksMismatchError
    from nrtrain.checkpoint import CheckpointMismatchError, CheckpointWriteError
    from nrtrain.config import load_config, parse_override
    from nrtrain.train import NonFiniteLossError
    from nrtrain.train import train as run_training

    try:
        overrides = dict(parse_override(item) for item in set_ or [])
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    for key, value in (("packs", packs), ("out", out), ("model", model), ("steps", steps), ("lr", lr)):
        if value is not None:
            overrides[key] = str(value) if isinstance(value, Path) else value
    if resume:
        overrides["resume"] = True
    if overwrite:
        overrides["overwrite"] = True
    try:
        cfg = load_config(config, overrides)
        if not cfg.packs:
            raise ValueError("no packs file: pass --packs (make one with `nr pack CATALOG -L 16384 --out ...`)")

        def show(record: dict) -> None:
            extra = f", MFU {record['mfu']:.1%}" if "mfu" in record else ""
            console.print(f"step {record['step']:>7}  loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                          f"{record['images_per_step']:.0f} img/step  {record['tokens_per_s']:,.0f} tok/s{extra}")

        from nrtrain.run_folder import run_notices

        for notice in run_notices(cfg):
            _note(notice)
        if ray_workers:
            from nrtrain.ray_train import train_on_ray

            train_on_ray(cfg, workers=ray_workers)
            console.print(f"Ray Train finished; checkpoints and metrics in {cfg.out}")
            return
        summary = run_training(cfg, on_log=show)
    except MissingExtraError as exc:  # its message names 'nr[ray-train]', which must not be read as markup
        from rich.markup import escape

        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(2) from None
    except (ValueError, FileNotFoundError, CheckpointMismatchError, PacksMismatchError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    except (NonFiniteLossError, CheckpointWriteError) as exc:
        err_console.print(f"[red]stopped:[/red] {exc}")
        raise typer.Exit(1) from None
    except OSError as exc:  # a run folder that cannot be written (read-only, disk full): one line
        err_console.print(f"[red]error:[/red] {exc.filename or out or 'the run folder'}: {exc.strerror or exc}; "
                          "check that --out is writable and has free space, then run again")
        raise typer.Exit(1) from None
    except RuntimeError as exc:  # a Ray Train run that failed otherwise: one line, not Ray's traceback
        from rich.markup import escape

        from nrtrain.ray_train import RayTrainFailedError

        if not isinstance(exc, RayTrainFailedError):
            raise
        err_console.print(f"[red]error:[/red] {escape(str(exc))}")
        raise typer.Exit(1) from None
    if summary.steps == 0:
        console.print(f"nothing to do: the run in {cfg.out} is already at step {summary.final_step} (--steps "
                      f"{cfg.steps}); pass a larger --steps to train further")
    elif summary.checkpoint:
        console.print(f"{summary.steps} steps in {summary.seconds:.0f} s; checkpoint {summary.checkpoint}")


@app.command()
def sample(
    checkpoint: Annotated[Path, typer.Argument(help="Run folder or checkpoints/step-* folder.", exists=True,
                                               show_default=False)],
    out: Annotated[Path, typer.Option(help="Output folder (PNGs, samples.npz, grid.png, provenance.json).",
                                      show_default=False)],
    size: Annotated[Optional[list[str]], typer.Option(help="HxW in pixels, e.g. 256x256 or 432x768 (repeatable); "
                                                      "rounded to the unit and logged \\[default: the preset's].",
                                                      show_default=False)] = None,
    count: Annotated[Optional[int], typer.Option(help="Samples per size.", show_default=False)] = None,
    classes: Annotated[str, typer.Option(help="'random' or class ids, e.g. 1,207,360.")] = "random",
    per_class: Annotated[Optional[int], typer.Option(help="N samples of each class (FID runs).",
                                                     show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Base seed: sample j uses seed + j, so any sample can be "
                                           "regenerated alone.")] = 0,
    index: Annotated[Optional[list[int]], typer.Option(help="Make only sample j (repeatable).",
                                                       show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option(help="A row of NiT's README: nit-256, nit-512, nit-1024, "
                                                       "nit-432x768, ...", show_default=False)] = None,
    solver: Annotated[Optional[str], typer.Option(help="euler, heun or euler-maruyama \\[default: euler].",
                                                  show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help="Solver steps \\[default: 50].", show_default=False)] = None,
    cfg: Annotated[Optional[float], typer.Option(help="Guidance scale (1 = off) \\[default: 1].",
                                                 show_default=False)] = None,
    cfg_interval: Annotated[Optional[tuple[float, float]], typer.Option(
        help="Guide only for t in [LOW, HIGH] (t=1 is noise); outside it one model call per step.",
        show_default=False)] = None,
    shift: Annotated[Optional[float], typer.Option(help="Timestep shift (>1 spends steps near noise).",
                                                   show_default=False)] = None,
    heun_guidance: Annotated[Optional[str], typer.Option(
        help="heun only: guide the corrector by its own time ('corrector') or by the step's start ('step-start', "
             "NiT's sampler) \\[default: step-start with a nit-* preset, else corrector].", show_default=False)] = None,
    rope_extrapolation: Annotated[str, typer.Option(help="For sizes beyond training: none, linear, dynntk, "
                                                         "yarn.")] = "none",
    decouple: Annotated[bool, typer.Option(help="Extrapolate each axis by its own ratio (FiT).")] = False,
    rope_train_size: Annotated[Optional[str], typer.Option(
        help="HxW in pixels that RoPE extrapolation counts as the training size \\[default: the largest latent "
             "the checkpoint was trained on].", show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Model dtype \\[default: bfloat16 on GPU, float32 on CPU].",
                                                 show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per model call.")] = 16,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    ema: Annotated[bool, typer.Option("--ema/--no-ema", help="Sample with the EMA weights.")] = True,
    catalog: Annotated[Optional[list[Path]], typer.Option(help="Check the checkpoint against these catalogs "
                                                               "first (repeatable).", show_default=False)] = None,
    encoder_source: Annotated[Optional[str], typer.Option(help="Where the decoder's weights are, when not "
                                                               "where the catalog's manifest says.",
                                                          show_default=False)] = None,
) -> None:
    """Generate images at any size and aspect ratio from a checkpoint.

    Decodes them with the catalog's encoder and writes PNGs, what the ADM evaluator reads (.npz), a
    grid and a provenance JSON.

    Re-running skips samples that exist. Several GPUs: torchrun --nproc_per_node N $(which nr) sample ...
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nrtrain.checkpoint import CheckpointMismatchError
    from nrtrain.sample import SampleSettings, generate
    from nrtrain.sample_plan import SampleRequest, parse_size
    from nrtrain.distributed import setup_distributed

    try:
        request = SampleRequest(
            sizes=tuple(parse_size(s) for s in size or ()), count=count, per_class=per_class, seed=seed,
            classes="random" if classes == "random" else tuple(int(c) for c in classes.split(",")),
            indices=tuple(index) if index else None)
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    ddp = setup_distributed(device)
    with Progress(TextColumn("[bold]sample[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not ddp.main) as bar:
        task = bar.add_task("sample", total=None)
        try:
            settings = SampleSettings(
                preset=preset, solver=solver, steps=steps, cfg_scale=cfg, cfg_interval=cfg_interval, shift=shift,
                heun_guidance=heun_guidance, rope_extrapolation=rope_extrapolation, decouple=decouple,
                rope_train_size=parse_size(rope_train_size) if rope_train_size else None, device=ddp.device,
                dtype=dtype, batch_size=batch_size, ema=ema, catalogs=tuple(catalog or ()),
                encoder_source=encoder_source, rank=ddp.rank, world_size=ddp.world_size)
            summary = generate(checkpoint, request, out, settings,
                               progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (ValueError, FileNotFoundError, CheckpointMismatchError) as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        except OSError as exc:  # an output folder that cannot be written (read-only, disk full)
            err_console.print(f"[red]error:[/red] {exc.filename or out}: {exc.strerror or exc}; check that --out "
                              "is writable and has free space, then run again (samples already made are kept)")
            raise typer.Exit(1) from None
    if not ddp.main:
        return
    s = summary.sampler
    console.print(f"{summary.generated} made, {summary.skipped} already there; {s.solver} {s.steps} steps, NFE "
                  f"{summary.nfe} ({summary.guided_nfe} guided), CFG {s.cfg_scale} on {list(s.cfg_interval)}, "
                  f"{summary.seconds:.1f} s")
    for outcome in summary.sizes:
        c = outcome.size
        notes = [n for n, on in (("rounded from %dx%d" % c.requested, c.rounded),
                                 ("beyond the training size", outcome.beyond_training),
                                 (f"RoPE {rope_extrapolation}", outcome.extrapolated)) if on]
        console.print(f"  {c.name} ({c.tokens[0]}x{c.tokens[1]} tokens){': ' + ', '.join(notes) if notes else ''}"
                      f"  npz {outcome.npz or '-'}  grid {outcome.grid or '-'}", soft_wrap=True)
    for warning in summary.warnings:
        err_console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print(f"provenance: {summary.provenance}")


@app.command("export")
def export_catalog(
    format: Annotated[str, typer.Argument(help="nit, fit, lightningdit, fastdit (also U-DiT) or uvit (also DiMR).",
                                          show_default=False)],
    catalog: CatalogPath,
    out: Annotated[Path, typer.Option(help="Output folder in the peer's layout.", show_default=False)],
    variant: Annotated[Optional[str], typer.Option(help="Variant to export when the catalog holds several.",
                                                   show_default=False)] = None,
    packs: Annotated[Optional[Path], typer.Option(help="nit only: also write NiT sampler-meta JSON from this "
                                                       "packs file.", show_default=False)] = None,
    prefix: Annotated[Optional[str], typer.Option(help="nit only: name prefix of the data-meta JSONL, sampler meta "
                                                       "and latent folders \\[default: the encoder source's name, "
                                                       "e.g. dc-ae-f32c32-sana-1.1-diffusers].",
                                                  show_default=False)] = None,
    draw: Annotated[Optional[str], typer.Option(help="fit, lightningdit, fastdit: from stored moments take a "
                                                     "'sample' or the 'mode' \\[default: sample].",
                                                show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the per-row draws.")] = 0,
    flips: Annotated[Optional[str], typer.Option(help="fastdit only: 'random' twin per image or 'none'.",
                                                 show_default=False)] = None,
    shard_rows: Annotated[Optional[int], typer.Option(help="lightningdit only: rows per shard \\[default: 10000].",
                                                      show_default=False)] = None,
    udit_padding: Annotated[bool, typer.Option(help="fastdit only: one extra file, because U-DiT drops its "
                                                    "last one.")] = True,
) -> None:
    """Write a catalog in the layout of NiT, FiT, LightningDiT, fast-DiT/U-DiT or U-ViT/DiMR.

    Streaming and resumable. A catalog the format cannot express is refused with the encode command
    that makes one."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nrdata.interop import EXPORTERS, ExportMismatchError, UnsupportedCatalogError
    from nrdata.packing.catalog_packs import PacksMismatchError

    if format not in EXPORTERS:
        err_console.print(f"[red]error:[/red] unknown format {format!r}; choose one of {', '.join(EXPORTERS)}")
        raise typer.Exit(2)
    options = {"variant": variant}
    allowed = {"packs": ("nit",), "prefix": ("nit",), "draw": ("fit", "lightningdit", "fastdit"),
               "flips": ("fastdit",), "shard_rows": ("lightningdit",)}
    for name, value in (("packs", packs), ("prefix", prefix), ("draw", draw), ("flips", flips),
                        ("shard_rows", shard_rows)):
        if value is None:
            continue
        if format not in allowed[name]:
            err_console.print(f"[red]error:[/red] --{name.replace('_', '-')} applies to {', '.join(allowed[name])}, "
                              f"not {format}")
            raise typer.Exit(2)
        options[name] = value
    if format in ("fit", "lightningdit", "fastdit"):
        options["seed"] = seed
    if format == "fastdit":
        options["udit_padding"] = udit_padding
    with Progress(TextColumn(f"[bold]export {format}[/bold]"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("export", total=None)
        try:
            summary = EXPORTERS[format](catalog, out, progress=lambda done, total: bar.update(task, completed=done,
                                                                                              total=total), **options)
        except (UnsupportedCatalogError, ExportMismatchError, PacksMismatchError, ValueError,
                FileNotFoundError) as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
    console.print(f"{summary.rows} rows: {summary.written} written, {summary.skipped} already there -> {summary.out_dir}")
    for name, path in summary.outputs.items():
        console.print(f"  {name}: {path}", soft_wrap=True)


import_app = typer.Typer(help="Bring latents made by other codebases into a catalog.", no_args_is_help=True)
app.add_typer(import_app, name="import")


@import_app.command("nit")
def import_nit_command(
    nit_dir: Annotated[Path, typer.Argument(help="NiT's preprocessed ImageNet folder (data_meta JSONL + "
                                                 "per-image safetensors).", exists=True, file_okay=False,
                                            show_default=False)],
    out: Annotated[Path, typer.Option(help="Catalog to create or resume.", show_default=False)],
    data_meta: Annotated[Optional[Path], typer.Option(help="The JSONL to read \\[default: found under DIR].",
                                                      show_default=False)] = None,
    dtype: Annotated[Optional[str], typer.Option(help="Stored dtype: float32 (NiT's), float16, bfloat16.",
                                                 show_default=False)] = None,
    image_root: Annotated[str, typer.Option(help="Where the source JPEGs are, recorded in the manifest.")] = "",
) -> None:
    """Turn NiT's released latents into an nr catalog, without re-encoding.

    Writes a DC-AE f32c32 manifest and keeps the flips, so the packer, loader and trainer work on
    them. Resumable."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from nrdata.interop import import_nit

    with Progress(TextColumn("[bold]import nit[/bold]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("import", total=None)
        try:
            summary = import_nit(nit_dir, out, data_meta=data_meta, dtype=dtype, image_root=image_root,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (ValueError, FileNotFoundError) as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
    console.print(f"{summary.committed} rows imported, {summary.skipped} already there, {summary.errors} error rows "
                  f"-> {out}  (nr catalog info {out})", soft_wrap=True)


@import_app.command("nit-model")
def import_nit_model_command(
    checkpoint: Annotated[Path, typer.Argument(help="NiT's checkpoint, e.g. model_1000K.safetensors (.pt too).",
                                               exists=True, dir_okay=False, show_default=False)],
    out: Annotated[Path, typer.Option(help="Run folder to write (new or empty).", show_default=False)],
    encoder: Annotated[str, typer.Option(help="The autoencoder NiT was trained on.")] = "dc-ae-f32c32",
    encoder_source: Annotated[Optional[str], typer.Option(
        help="Its weights: a hub id or a local folder \\[default: mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers].",
        show_default=False)] = None,
    preset: Annotated[Optional[str], typer.Option(help="Check the file holds this size: S, B, L or XL.",
                                                  show_default=False)] = None,
    scaling_factor: Annotated[Optional[float], typer.Option(help="Latent scale \\[default: the encoder config's].",
                                                            show_default=False)] = None,
    train_size: Annotated[str, typer.Option(help="HxW px RoPE extrapolation starts from when sampling larger "
                                                 "(nr sample --rope-train-size overrides it).")] = "512x512",
    ignore_extra: Annotated[Optional[list[str]], typer.Option(
        help="Prefix of checkpoint keys to skip (repeatable) \\[default: projector., NiT's REPA projector].",
        show_default=False)] = None,
) -> None:
    """Bring NiT's released weights in as a run folder that nr sample and init_from read.

    Records the model config read from the tensors, NiT's RoPE grid, the scalar normalisation
    (z x scaling_factor), the decoder's identity and the training size."""
    from nrtrain.checkpoint import CheckpointMismatchError
    from nrtrain.pretrained import import_nit_model
    from nrtrain.sample_plan import parse_size

    try:
        summary = import_nit_model(checkpoint, out, encoder=encoder, encoder_source=encoder_source, preset=preset,
                                   scaling_factor=scaling_factor, train_size=parse_size(train_size),
                                   ignore_extra=tuple(ignore_extra) if ignore_extra else ("projector.",))
    except (ValueError, FileNotFoundError, FileExistsError, OSError, CheckpointMismatchError) as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    c = summary.config
    skipped = summary.report.skipped
    console.print(f"NiT depth {c.depth}, hidden {c.hidden}, heads {c.heads}, {c.num_classes} classes, "
                  f"{len(summary.report.loaded)} tensors ({len(skipped)} skipped{': ' + skipped[0] + ', ...' if skipped else ''}); "
                  f"normalisation {summary.scaling.describe()} -> {summary.checkpoint}", soft_wrap=True)
    console.print(f"next: nr sample {out} --preset nit-256 --count 8 --out samples/nit-256", soft_wrap=True)


# -- nr catalog ------------------------------------------------------------------------------

@catalog_app.command("info")
def catalog_info(path: CatalogPath) -> None:
    """What the catalog holds and how it was made (encoder, dtype, policies, flips, normalisation)."""
    from nrdata.catalog.inspect import describe

    facts = describe(_open_catalog(path))
    table = Table(show_header=False, box=None, title=f"catalog {facts['path']}", title_justify="left")
    for key in ("fingerprint", "content_fingerprint", "encoder", "encoder_weights", "factor", "channels", "stored_quantity", "dtype",
                "flip", "normalization", "repa_images", "source_root", "code_version", "created"):
        table.add_row(key.replace("_", " "), str(facts[key]))
    for policy in facts["policies"]:
        params = ", ".join(f"{k}={v}" for k, v in policy.items() if k not in ("variant", "kind") and v is not None)
        table.add_row(f"variant {policy['variant']}", f"{policy['kind']} ({params})")
    table.add_row("rows", f"{facts['rows']:,}")
    for row in facts["rows_per_variant"]:
        table.add_row(f"  {row['variant']}", f"{row['rows']:,} rows, {row['latent_pixels']:,} latent pixels")
    table.add_row("shards", str(facts["shards"]))
    table.add_row("errors", str(facts["errors"]))
    table.add_row("on disk", f"{facts['disk_bytes'] / 2**20:,.1f} MiB")
    console.print(table)
    console.print(f"[dim]open the index with: polars.scan_parquet('{facts['path']}/index/*.parquet')[/dim]")


@catalog_app.command("head")
def catalog_head(
    path: CatalogPath,
    n: Annotated[int, typer.Option("-n", help="Rows to show.")] = 10,
    variant: Annotated[Optional[str], typer.Option(help="Only rows of this variant.")] = None,
) -> None:
    """The first rows of the index (the main columns; polars.scan_parquet shows them all)."""
    from nrdata.catalog.inspect import head

    frame = head(_open_catalog(path), n, variant)
    table = Table("row", "key", "variant", "label", "class", "original w×h", "image w×h", "latent c×h×w", "flip")
    for r in frame.iter_rows(named=True):
        table.add_row(str(r["row_id"]), r["key"], r["variant"], str(r["label"]), r["class_name"] or "",
                      f"{r['orig_w']}×{r['orig_h']}", f"{r['image_w']}×{r['image_h']}",
                      f"{r['latent_c']}×{r['latent_h']}×{r['latent_w']}", "yes" if r["flip"] else "no")
    console.print(table)


@catalog_app.command("stats")
def catalog_stats(
    path: CatalogPath,
    variant: Annotated[Optional[str], typer.Option(help="Only rows of this variant.")] = None,
    png: Annotated[Optional[Path], typer.Option(help="Also draw the sizes and aspect ratios into this PNG.")] = None,
) -> None:
    """Histograms of latent sizes and aspect ratios, as text (and a PNG on request)."""
    from nrdata.catalog.inspect import plot_size_histograms, size_histograms

    cat = _open_catalog(path)
    hists = size_histograms(cat, variant)
    if not hists:
        console.print("no rows")
    for hist in hists:
        top = max(hist.counts) or 1
        table = Table(title=hist.title, title_justify="left", box=None)
        table.add_column("bin", justify="right")
        table.add_column("rows", justify="right")
        table.add_column("")
        for label, count in zip(hist.labels, hist.counts):
            table.add_row(label, f"{count:,}", "█" * max(int(40 * count / top), 1 if count else 0))
        console.print(table)
    norm = cat.manifest.normalization
    if norm.ready:
        table = Table(title=f"per-channel normalisation ({norm.convention})", title_justify="left", box=None)
        for name in ("channel", "mean", "std"):
            table.add_column(name, justify="right")
        for i, (mean, std) in enumerate(zip(norm.mean, norm.std)):
            table.add_row(str(i), f"{mean:+.4f}", f"{std:.4f}")
        console.print(table)
    if png:
        from rich.markup import escape

        from nrdata.extras import MissingExtraError

        try:
            console.print(f"wrote {plot_size_histograms(cat, png)}")
        except MissingExtraError as exc:
            err_console.print(f"[red]error:[/red] --png: {escape(str(exc))}")
            raise typer.Exit(2) from None


@catalog_app.command("validate")
def catalog_validate(
    path: CatalogPath,
    quick: Annotated[bool, typer.Option(help="Check structure only; skip hashing the latent bytes.")] = False,
) -> None:
    """Check manifest, index, shards and checksums against each other. Exit code 1 when anything is wrong."""
    from rich.progress import Progress

    from nrdata.catalog import validate_catalog

    with Progress(console=err_console, transient=True) as progress:
        task = progress.add_task("validating shards", total=None)
        report = validate_catalog(path, checksums=not quick,
                                  progress=lambda done, total: progress.update(task, completed=done, total=total))
    for warning in report.warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}", soft_wrap=True)
    for problem in report.problems:
        console.print(f"[red]problem:[/red] {problem}", soft_wrap=True)
    summary = (f"{report.rows:,} rows in {report.shards} shards, {report.errors} error rows, "
               f"{report.bytes_checked / 2**20:,.1f} MiB hashed")
    if not report.ok:
        console.print(f"[red]INVALID[/red] {path}: {len(report.problems)} problem(s); {summary}")
        raise typer.Exit(1)
    console.print(f"[green]valid[/green] {path}: {summary}")


@catalog_app.command("errors")
def catalog_errors(
    path: CatalogPath,
    n: Annotated[int, typer.Option("-n", help="Rows to show (0 = all).")] = 50,
    include_resolved: Annotated[bool, typer.Option("--all", help="Include errors a later run fixed.")] = False,
) -> None:
    """Rows that failed (key, variant, stage, message), for example unreadable images."""
    errors = _open_catalog(path).errors(include_resolved=include_resolved)
    if errors.num_rows == 0:
        console.print("no errors")
        return
    rows = errors.to_pylist()
    table = Table("key", "variant", "stage", "message", title=f"{len(rows)} error row(s)", title_justify="left")
    for row in rows[: n or None]:
        table.add_row(row["key"], row["variant"] or "", row["stage"], row["message"])
    console.print(table)


class _EvalGroup(typer.core.TyperGroup):
    """`nr eval SAMPLES --ref REF` runs the `samples` command; `nr eval reference ...` its own."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["samples", *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(cls=_EvalGroup, no_args_is_help=True,
                       help="FID, sFID, Inception Score, precision and recall as ADM's evaluator computes them: "
                            "nr eval SAMPLES --ref REF.npz; reference batches at any size: nr eval reference.")
app.add_typer(eval_app, name="eval")
InceptionWeights = Annotated[Optional[Path], typer.Option(
    help="torch-fidelity's Inception weights file (weights-inception-2015-12-05-6726825d.pth) \\[default: "
         "$NR_INCEPTION_WEIGHTS, else torch hub's cache, downloaded there when a network exists].",
    show_default=False)]


def _feature_progress(label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn(f"[bold]{label}[/bold]"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err_console, transient=True)


def _load_inception(weights: Optional[Path], device: str):
    import torch

    from nreval.inception import InceptionUnavailable, load_inception

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return load_inception(weights, device)
    except InceptionUnavailable as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None


def _rate_updater(bar, task):
    import time

    started = time.perf_counter()

    def update(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total, rate=f"{done / (time.perf_counter() - started):.1f} img/s")
    return update


@eval_app.command("samples")
def eval_samples(
    samples: Annotated[Path, typer.Argument(help="An nr sample folder, an ADM-style .npz (arr_0 uint8 NHWC) or a "
                                                 "folder of images (any sizes).", exists=True,
                                     show_default=False)],
    ref: Annotated[Path, typer.Option(help="Reference batch: ADM's (e.g. VIRTUAL_imagenet256_labeled.npz) or one "
                                           "made by nr eval reference.", exists=True, dir_okay=False,
                                      show_default=False)],
    inception_weights: InceptionWeights = None,
    batch_size: Annotated[int, typer.Option(help="Images per Inception call (ADM: 64).")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader workers decoding images.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Score samples against a reference batch; print the lines ADM's evaluator prints.

    Also writes eval-<REF>.json next to the samples: the numbers, counts, sizes, the weights' sha256
    and the samples' provenance.
    """
    from nreval.evaluate import evaluate

    inception = _load_inception(inception_weights, device)
    with _feature_progress("eval") as bar:
        task = bar.add_task("samples", total=None, rate="")
        try:
            result = evaluate(samples, ref, inception, batch_size=batch_size, workers=workers,
                              progress=_rate_updater(bar, task), reference_progress=_rate_updater(bar, task))
        except ValueError as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
    console.print("Computing evaluations...")
    for line in result.lines():
        console.print(line, highlight=False)
    console.print(f"wrote {result.json_path}", soft_wrap=True)


@eval_app.command("reference")
def eval_reference(
    source: Annotated[Path, typer.Argument(help="A catalog folder (its source images) or any folder of images.",
                                           exists=True, show_default=False)],
    size: Annotated[str, typer.Option(help="HxW of the reference images, e.g. 256x256 or 432x768 (the area cap "
                                           "of native, sqrt(H*W) the target of fit).", show_default=False)],
    out: Annotated[Path, typer.Option(help="The reference .npz to write (a provenance .json goes beside it).",
                                      show_default=False)],
    policy: Annotated[str, typer.Option(help="center-crop (ADM's), resize (to exactly HxW), native (NiT) or "
                                             "fit (FiT).")] = "center-crop",
    count: Annotated[int, typer.Option(help="Images kept in arr_0 (statistics are over all).")] = 10_000,
    unit: Annotated[int, typer.Option(help="native and fit: sides are multiples of this (encoder factor x "
                                           "patch).")] = 32,
    seed: Annotated[int, typer.Option(help="Seed of the kept subset.")] = 0,
    inception_weights: InceptionWeights = None,
    batch_size: Annotated[int, typer.Option(help="Images per Inception call.")] = 64,
    workers: Annotated[int, typer.Option(help="DataLoader workers decoding images.")] = 4,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
) -> None:
    """Build an ADM-format reference batch at any size: arr_0 (up to COUNT images) and statistics over all."""
    from nreval.reference_builder import POLICIES, build_reference, parse_size

    try:
        reference_size = parse_size(size)
        if policy not in POLICIES:
            raise ValueError(f"--policy {policy!r}: choose one of {', '.join(POLICIES)}")
    except ValueError as exc:
        err_console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2) from None
    inception = _load_inception(inception_weights, device)
    with _feature_progress("reference") as bar:
        task = bar.add_task("reference", total=None, rate="")
        try:
            summary = build_reference(source, out, size=reference_size, policy=policy, inception=inception,
                                      count=count, unit=unit, seed=seed, batch_size=batch_size, workers=workers,
                                      progress=_rate_updater(bar, task))
        except ValueError as exc:
            err_console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
    sizes = ", ".join(f"{n} {name}" for name, n in sorted(summary.sizes.items(), key=lambda kv: -kv[1])[:5])
    console.print(f"{summary.images} images ({policy}: {sizes}{', ...' if len(summary.sizes) > 5 else ''}); "
                  f"statistics over all, {summary.kept} kept -> {summary.path} (provenance "
                  f"{summary.provenance_path})", soft_wrap=True)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
