"""The demo end to end.

The default suite runs a short demo (few images, 150 steps, about two minutes on 2 cores): every
step leaves its output and the loss falls. The full demo, as the README's first command runs it, is
`slow` (1500 steps, 7 to 13 minutes on 2 cores, more than the suite's budget): run it with
`./run test -m slow`; a small CNN trained on real demo images (another seed) must label its samples
at well above chance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from cli import app
from nrdata.catalog import validate_catalog
from nrdata.demo_data import CLASSES, write_demo_images
from nrdata.images import decode_image
from nrdata.sources import list_image_folder
from nrtrain.run_folder import read_metrics


def _features(image: np.ndarray) -> np.ndarray:
    """Colour-free texture view: luminance at 32x32, contrast-normalised, sign removed (the classes
    are two-colour textures with random colours)."""
    small = np.asarray(Image.fromarray(image).resize((32, 32), Image.BILINEAR), np.float32).mean(-1)
    return np.abs((small - small.mean()) / (small.std() + 1e-3))[None]


def _train_classifier(root: Path) -> nn.Module:
    real = write_demo_images(root, per_class=60, seed=1, bad_files=False)
    xs, ys = [], []
    for item in list_image_folder(real.root):
        pixels = np.asarray(decode_image(item.path))
        for view in (pixels, pixels[:, ::-1], pixels[::-1]):
            xs.append(_features(np.ascontiguousarray(view)))
            ys.append(item.label)
    x, y = torch.tensor(np.stack(xs)), torch.tensor(ys)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                        nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, len(CLASSES)))
    optimizer = torch.optim.Adam(net.parameters(), 1e-3)
    for _ in range(25):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            batch = order[i:i + 64]
            loss = F.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


def _accuracy(net: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    with torch.no_grad():
        guesses = net(torch.tensor(np.stack([_features(i) for i in images]))).argmax(1).numpy()
    return float((guesses == labels).mean())


def _every_output_is_there(out: Path, output: str) -> None:
    assert validate_catalog(out / "catalog").ok
    for name in ("catalog_sizes.png", "packs.png", "run/loss.png"):
        assert (out / name).stat().st_size > 1000, name
    grids = sorted((out / "samples").glob("grid-*.png"))
    assert {g.stem for g in grids} == {"grid-48x48", "grid-32x96", "grid-96x32", "grid-96x96"}
    assert any("96x96" in line and "beyond the training sizes" in line for line in output.splitlines())
    for npz in (out / "samples").glob("samples-*.npz"):
        labels = np.load(npz)["arr_1"]
        assert sorted(set(labels.tolist())) == list(range(len(CLASSES))), npz.name  # every class sampled


@pytest.mark.timeout(600)
def test_a_short_demo_leaves_every_output_and_its_loss_falls(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--steps", "150", "--per-class", "12"])
    assert result.exit_code == 0, result.output
    _every_output_is_there(out, result.output)
    losses = [r["loss"] for r in read_metrics(out / "run")]
    assert losses[-1] < 0.75 * losses[0], losses  # it learns something in 150 steps (measured: 1.88 -> 0.76)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_demo_runs_end_to_end_and_its_samples_show_the_classes(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    _every_output_is_there(out, result.output)

    net = _train_classifier(tmp_path / "real")
    held_out = write_demo_images(tmp_path / "held-out", per_class=20, seed=7, bad_files=False)
    items = list_image_folder(held_out.root)
    real = _accuracy(net, np.stack([np.asarray(decode_image(i.path).resize((48, 48))) for i in items]),
                     np.array([i.label for i in items]))
    assert real > 0.85  # the classifier itself works
    chance = 1 / len(CLASSES)
    per_size, right = {}, 0
    for npz in sorted((out / "samples").glob("samples-*.npz")):
        data = np.load(npz)
        per_size[npz.stem] = _accuracy(net, data["arr_0"], data["arr_1"])
        right += per_size[npz.stem] * len(data["arr_1"])
    total = sum(len(np.load(npz)["arr_1"]) for npz in (out / "samples").glob("samples-*.npz"))
    # all grids together at least twice chance, and every size (wide, tall, larger than training) above it
    assert right / total > 2 * chance, per_size
    assert min(per_size.values()) > chance + 0.05, per_size
