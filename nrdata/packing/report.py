"""Packing report (numbers) and a PNG of the length and pack-fill histograms."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from nrdata.extras import require
from nrdata.packing.assign import Packing


@dataclass(frozen=True)
class PackingReport:
    algorithm: str
    max_tokens: int
    max_images: int | None
    epoch: int
    rows: int  # rows given to the packer
    items: int  # rows placed in packs
    dropped: int  # rows longer than max_tokens, left out
    packs: int
    lower_bound_packs: int  # ceil(tokens / max_tokens)
    tokens: int
    efficiency: float  # real tokens / (packs x max_tokens)
    images_per_pack: float  # mean
    min_images: int
    max_images_in_pack: int
    world_size: int | None = None
    steps: int | None = None
    remainder_packs: int | None = None
    cost_imbalance: float | None = None  # sum of per-step max cost / sum of per-step mean
    max_step_cost_imbalance: float | None = None
    mean_step_cost_imbalance: float | None = None
    token_imbalance: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """A small two-column table as text (the caller prints it)."""
        rows = [
            ("algorithm", self.algorithm),
            ("max tokens (L)", f"{self.max_tokens:,}"),
            ("max images / pack", "unlimited" if self.max_images is None else str(self.max_images)),
            ("epoch", str(self.epoch)),
            ("items packed", f"{self.items:,} of {self.rows:,}"),
            ("dropped (> L)", f"{self.dropped:,}"),
            ("packs", f"{self.packs:,} (lower bound {self.lower_bound_packs:,})"),
            ("efficiency", f"{100 * self.efficiency:.4f} %"),
            (
                "images / pack",
                f"{self.images_per_pack:.2f} "
                f"(min {self.min_images}, max {self.max_images_in_pack})",
            ),
        ]
        if self.world_size is not None:
            rows += [
                (
                    "ranks x steps",
                    f"{self.world_size} x {self.steps:,} (+{self.remainder_packs} left over)",
                ),
                ("cost imbalance", f"{self.cost_imbalance:.4f} (epoch: sum max / sum mean)"),
                (
                    "per-step cost max/mean",
                    f"mean {self.mean_step_cost_imbalance:.4f}, "
                    f"worst {self.max_step_cost_imbalance:.4f}",
                ),
                ("token imbalance", f"{self.token_imbalance:.4f}"),
            ]
        w = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def packing_report(packing: Packing, ranks=None) -> PackingReport:
    """Numbers for one epoch's packing, plus the rank balance when ``ranks`` is given."""
    extra = {}
    if ranks is not None:
        extra = dict(
            world_size=ranks.world_size,
            steps=ranks.n_steps,
            remainder_packs=int(ranks.remainder.size),
            cost_imbalance=ranks.cost_imbalance,
            max_step_cost_imbalance=ranks.max_step_cost_imbalance,
            mean_step_cost_imbalance=ranks.mean_step_cost_imbalance,
            token_imbalance=ranks.token_imbalance,
        )
    tokens = packing.total_tokens
    return PackingReport(
        algorithm=packing.algorithm,
        max_tokens=packing.max_tokens,
        max_images=packing.max_images,
        epoch=packing.epoch,
        rows=packing.n_rows,
        items=packing.n_items,
        dropped=int(packing.dropped.size),
        packs=packing.n_packs,
        lower_bound_packs=math.ceil(tokens / packing.max_tokens),
        tokens=tokens,
        efficiency=packing.efficiency,
        images_per_pack=packing.images_per_pack,
        min_images=int(packing.images.min()) if packing.n_packs else 0,
        max_images_in_pack=int(packing.images.max()) if packing.n_packs else 0,
        **extra,
    )


def plot_packing(path, packing: Packing, lengths=None, *, dpi: int = 110) -> Path:
    """PNG with the histogram of item lengths (when ``lengths`` is given) and of pack fill.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change). Raises
    MissingExtraError when matplotlib is not installed.
    """
    require("matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_axes = 2 if lengths is not None else 1
    fig = Figure(figsize=(6 * n_axes, 4), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_axes, squeeze=False)[0]
    ax_i = 0
    if lengths is not None:
        lens = np.asarray(lengths, dtype=np.int64)
        ax = axes[ax_i]
        ax_i += 1
        if lens.size:
            top = int(lens.max())
            ax.hist(lens, bins=min(200, max(top, 1)), range=(0.5, top + 0.5), log=True)
            if packing.max_tokens <= 1.5 * top:
                ax.axvline(packing.max_tokens, color="tab:red", ls="--", lw=1, label="L")
                ax.legend(loc="upper right")
        ax.set_xlabel("item length (tokens)")
        ax.set_ylabel("items")
        ax.set_title(f"lengths: {lens.size:,} items, {int(packing.dropped.size):,} > L dropped")
    ax = axes[ax_i]
    fill = packing.tokens / packing.max_tokens if packing.n_packs else np.zeros(0)
    lo = float(fill.min()) if fill.size else 0.0
    ax.hist(fill, bins=50, range=(min(lo, 0.99), 1.0))
    ax.set_yscale("log")
    ax.set_xlabel("pack fill (tokens / L)")
    ax.set_ylabel("packs")
    ax.set_title(
        f"{packing.algorithm} L={packing.max_tokens}: {packing.n_packs:,} packs, "
        f"eff {100 * packing.efficiency:.3f} %"
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
