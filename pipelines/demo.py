"""`nr demo`: the whole journey on built-in data, stage by stage, through the same library calls as
nr encode / pack / train / sample.

`run_demo` makes the images, encodes them on an embedded Ray, validates and plots the catalog, packs
it, trains the small NiT of configs/demo.toml and samples every class at the sizes of catalogs/demo.toml.
It prints nothing: it tells a `DemoObserver` when a stage starts, how far it is, and what it made, and
returns a `DemoOutcome`; the CLI draws the progress bars and the lines. Re-running resumes: committed
catalog rows are skipped, training continues from its last checkpoint, and samples are remade only
after new training.
"""

from __future__ import annotations

import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class DemoObserver(Protocol):
    def begin(self, stage: str, total: int | None, completed: int) -> None:
        """A stage with a progress count starts (encode, train, sample)."""

    def advance(self, completed: int, total: int | None, note: str) -> None:
        """Progress inside the stage begun last."""

    def done(self, stage: str, outcome: DemoOutcome) -> None:
        """A stage finished; `outcome` holds what it and the stages before it made (the field named
        after the stage). The first call, "notices", comes before any work: `outcome.notices`."""


@dataclass
class PackOutcome:
    path: Path
    rows: int
    packs: int
    max_tokens: int
    efficiency: float
    epochs: int
    png: Path | None


@dataclass
class TrainOutcome:
    run_dir: Path
    model: str
    steps: int
    trained: bool  # False when the run was already at its last step
    loss_png: Path | None


@dataclass
class ValidateOutcome:
    ok: bool
    rows: int
    shards: int
    error_rows: int
    sizes_png: Path | None


@dataclass
class DemoOutcome:
    out: Path
    images: Any = None  # nrdata.demo_data.DemoImages
    encode: Any = None  # pipelines.encode.EncodeSummary
    encoder_factor: int = 0
    variants: tuple[str, ...] = ()
    validate: ValidateOutcome | None = None
    pack: PackOutcome | None = None
    train: TrainOutcome | None = None
    sample: Any = None  # nrtrain.sample.SampleSummary
    notices: list[str] = field(default_factory=list)  # outputs skipped for a missing optional dependency

    @property
    def catalog(self) -> Path:
        return self.out / "catalog"

    @property
    def ok(self) -> bool:
        return self.validate is not None and self.validate.ok and self.sample is not None


class _Silent:
    def begin(self, stage, total, completed):
        pass

    def advance(self, completed, total, note):
        pass

    def done(self, stage, outcome):
        pass


def run_demo(out: str | Path, *, per_class: int | None = None, seed: int | None = None, steps: int | None = None,
             observer: DemoObserver | None = None) -> DemoOutcome:
    """Run (or resume) the demo into `out`. Stops after validation when the catalog is invalid
    (`DemoOutcome.ok` is then False and the later stages are None)."""
    from nrdata.definitions import load_definition
    from nrdata.demo_data import write_demo_images
    from nrdata.extras import available, missing_notice
    from nrtrain.run_folder import tensorboard_notice

    watch = observer or _Silent()
    out = Path(out)
    definition = load_definition("demo")
    plan = tomllib.loads(definition.path.read_text())["demo"]
    outcome = DemoOutcome(out=out, encoder_factor=definition.encoder["factor"], variants=tuple(definition.policies))
    train_config = _train_config(definition, plan, out, steps)
    plots = available("matplotlib")
    if not plots:
        outcome.notices.append(missing_notice("matplotlib", skipped="catalog_sizes.png, packs.png and loss.png"))
    outcome.notices += filter(None, [tensorboard_notice(train_config)])
    watch.done("notices", outcome)

    outcome.images = write_demo_images(out / "images", per_class=per_class or definition.source["per_class"],
                                       seed=definition.source["seed"] if seed is None else seed)
    watch.done("images", outcome)

    outcome.encode = _encode(definition, outcome, watch)
    watch.done("encode", outcome)

    outcome.validate = _validate(outcome.catalog, out / "catalog_sizes.png" if plots else None)
    watch.done("validate", outcome)
    if not outcome.validate.ok:
        return outcome

    outcome.pack = _pack(definition, plan, outcome.catalog, out, plots)
    watch.done("pack", outcome)

    outcome.train = _train(train_config, out, watch)
    watch.done("train", outcome)

    outcome.sample = _sample(plan, outcome, watch)
    watch.done("sample", outcome)
    return outcome


def _encode(definition, outcome: DemoOutcome, watch: DemoObserver):
    from pipelines.encode import EncodeConfig, EncoderSpec, run_encode

    config = EncodeConfig(source=str(outcome.images.root), out=str(outcome.catalog),
                          encoder=EncoderSpec("pixel", factor=definition.encoder["factor"]),
                          policies=definition.policies, flip=definition.flip, patch_size=definition.patch_size,
                          max_failure_rate=0.5, notes={"made_by": "nr demo", "definition": str(definition.path)})
    watch.begin("encode", None, 0)
    watch.advance(0, None, "starting Ray...")
    return run_encode(config, on_progress=lambda p: watch.advance(p.done, p.total, f"{p.images_per_second:.0f} img/s"))


def _validate(catalog_path: Path, sizes_png: Path | None) -> ValidateOutcome:
    from nrdata.catalog import Catalog, validate_catalog
    from nrdata.catalog.inspect import plot_size_histograms

    report = validate_catalog(catalog_path)
    cat = Catalog(catalog_path)
    png = plot_size_histograms(cat, sizes_png) if sizes_png is not None else None
    return ValidateOutcome(ok=report.ok, rows=report.rows, shards=report.shards, error_rows=len(cat.errors()),
                           sizes_png=png)


def _pack(definition, plan: dict, catalog_path: Path, out: Path, plots: bool) -> PackOutcome:
    from nrdata.packing import packing_report, plot_packing
    from nrdata.packing.catalog_packs import pack_catalogs, write_pack_result

    packs_path = out / "packs.parquet"
    packed = pack_catalogs([catalog_path], max_tokens=plan["max_tokens"], patch_size=definition.patch_size,
                           epochs=plan["epochs"], seed=0)
    write_pack_result(packs_path, packed)
    report = packing_report(packed.packings[0], packed.ranks[0])
    png = plot_packing(out / "packs.png", packed.packings[0], packed.selection.lengths) if plots else None
    return PackOutcome(path=packs_path, rows=len(packed.selection.lengths), packs=len(packed.packings[0].tokens),
                       max_tokens=plan["max_tokens"], efficiency=report.efficiency, epochs=plan["epochs"], png=png)


def _train_config(definition, plan: dict, out: Path, steps: int | None):
    from nrtrain.config import load_config

    overrides: dict[str, Any] = {"packs": str(out / "packs.parquet"), "out": str(out / "run")}
    if steps:
        overrides["steps"] = steps
    return load_config(Path(definition.path).parent.parent / plan["train_config"], overrides)


def _train(config, out: Path, watch: DemoObserver) -> TrainOutcome:
    from nrtrain.checkpoint import read_run_info
    from nrtrain.train import train as run_training

    run_dir = Path(config.out)
    try:
        done = read_run_info(run_dir)["step"]
    except FileNotFoundError:
        done = 0
    trained = done < config.steps
    if trained:
        config.resume = done > 0
        config.overwrite = done == 0  # what a run stopped before its first checkpoint left is redone
        watch.begin("train", config.steps, done)
        run_training(config, on_log=lambda r: watch.advance(
            r["step"], config.steps, f"loss {r['loss']:.3f}, {r['tokens_per_s']:,.0f} tok/s"))
        # samples of an earlier checkpoint are stale now (nr sample refuses to mix checkpoints in a folder)
        shutil.rmtree(out / "samples", ignore_errors=True)
    loss_png = run_dir / "loss.png"
    return TrainOutcome(run_dir=run_dir, model=config.model, steps=config.steps, trained=trained,
                        loss_png=loss_png if loss_png.is_file() else None)


def _sample(plan: dict, outcome: DemoOutcome, watch: DemoObserver):
    from nrtrain.sample import generate
    from nrtrain.sample_plan import SampleRequest

    classes = len(outcome.images.classes)
    request = SampleRequest(sizes=tuple(tuple(size) for size in plan["sample_sizes"]),
                            per_class=plan["samples_per_class"], classes=tuple(range(classes)), seed=0)
    watch.begin("sample", None, 0)
    return generate(outcome.train.run_dir, request, outcome.out / "samples", steps=plan["sample_steps"],
                    cfg_scale=plan["cfg"], cfg_interval=tuple(plan["cfg_interval"]),
                    grid_count=classes * plan["samples_per_class"],
                    progress=lambda d, t: watch.advance(d, t, ""))
