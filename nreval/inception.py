"""The TF-ported Inception v3 of torch-fidelity (the weights of ADM's `classify_image_graph_def.pb`),
giving per image the three feature sets ADM's evaluator reads:

- pool (2048): `pool_3`, for FID and precision/recall;
- spatial (2023): `mixed_6/conv` (the ported `Mixed_6d.branch1x1` output, 17x17x192), its first 7
  channels flattened in H, W, C order, for sFID;
- logits (1008): `pool_3 @ W` without the bias, for the Inception Score.

Inputs are uint8 NCHW of any size; the model resizes them to 299x299 with TF1's bilinear
(`align_corners=False`) and maps them to (x - 128) / 128, as the graph does.

Where the weights come from: `weights` (a path), else $NR_INCEPTION_WEIGHTS, else torch-fidelity's
own download into torch hub's cache (`WEIGHTS_URL`), which needs a network.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch

WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_ENV = "NR_INCEPTION_WEIGHTS"
SPATIAL_CHANNELS = 7
FEATURE_NAMES = ("2048", "logits_unbiased")


class InceptionUnavailable(RuntimeError):
    """torch-fidelity is missing or the weights cannot be found; the message says what to do."""


def _tf_inception_module():
    """torch-fidelity's Inception module, imported without running the package's __init__.

    That __init__ imports every extractor torch-fidelity has, CLIP's among them, which imports
    torchvision; PyPI's torchvision is a CUDA build that fails to load beside a CPU torch wheel
    ("operator torchvision::nms does not exist"), and a GPU image may not have it. The Inception
    extractor needs only torch, so its package is entered through a bare stand-in, removed again so
    that a later `import torch_fidelity` runs the real __init__.
    """
    import importlib
    import importlib.util
    import sys
    import types

    name = "torch_fidelity.feature_extractor_inceptionv3"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise InceptionUnavailable("nr eval needs torch-fidelity: pip install -e '.[eval]'")
    stand_in = "torch_fidelity" not in sys.modules
    if stand_in:
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module(name)
    finally:
        if stand_in:
            del sys.modules["torch_fidelity"]


def _extractor_class():
    return _tf_inception_module().FeatureExtractorInceptionV3


def cached_weights_path() -> Path:
    """Where torch-fidelity's download lands (torch hub's checkpoint cache)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_URL.rsplit("/", 1)[1]


def resolve_weights(weights: str | os.PathLike | None) -> Path | None:
    """The local weights file to load, or None to let torch-fidelity download them."""
    chosen = weights or os.environ.get(WEIGHTS_ENV)
    if chosen:
        path = Path(chosen).expanduser()
        if not path.is_file():
            origin = "--inception-weights" if weights else f"${WEIGHTS_ENV}"
            raise InceptionUnavailable(f"{origin} names {path}, which is not a file; download {WEIGHTS_URL} "
                                       f"there, or point {origin} at the file")
        return path
    cached = cached_weights_path()
    return cached if cached.is_file() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Inception:
    """A loaded extractor, where its weights came from, and their sha256 (the identity of the features)."""

    model: torch.nn.Module
    weights_path: Path
    weights_sha256: str

    def __post_init__(self) -> None:
        self._spatial: torch.Tensor | None = None
        self.model.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output) -> None:
        # NCHW -> NHWC before flattening: ADM flattens TF's NHWC tensor
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(output), -1).float()

    @property
    def device(self) -> torch.device:
        return self.model.fc.weight.device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 [N, 3, H, W] -> {"pool": [N, 2048], "spatial": [N, 2023], "logits": [N, 1008]} (float32)."""
        pool, logits = self.model(images.to(self.device, non_blocking=True))
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "spatial": spatial, "logits": logits}


def load_inception(weights: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> Inception:
    """torch-fidelity's InceptionV3 with the features ADM reads; a clear error when offline without weights."""
    extractor = _extractor_class()
    path = resolve_weights(weights)
    if path is None:
        try:
            extractor("inception-v3-compat", list(FEATURE_NAMES))  # downloads into cached_weights_path()
        except Exception as exc:  # noqa: BLE001 - any download failure gets the same advice
            raise InceptionUnavailable(
                f"the Inception weights are not here and could not be downloaded ({type(exc).__name__}: {exc}). "
                f"Download {WEIGHTS_URL} (91 MB) on a machine with a network and either put it at "
                f"{cached_weights_path()} or pass --inception-weights PATH (or set ${WEIGHTS_ENV})") from exc
        path = cached_weights_path()
    model = extractor("inception-v3-compat", list(FEATURE_NAMES), feature_extractor_weights_path=str(path))
    return Inception(model.to(device), path, file_sha256(path))


def write_random_weights(path: str | os.PathLike, seed: int = 0) -> Path:
    """Save a random-weight InceptionV3 in torch-fidelity's format (a state dict for its
    `feature_extractor_weights_path`), for tests and benchmarks where the real weights cannot be
    fetched. He-normal convolutions keep activations of order one through the 94 layers."""
    extractor = _extractor_class()
    shapes = _state_dict_shapes(extractor)
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            state[name] = torch.randn(shape, generator=generator) * (2.0 / fan_in) ** 0.5
        elif name.endswith(("bn.weight", "bn.running_var")):
            state[name] = torch.ones(shape)
        elif name.endswith("num_batches_tracked"):
            state[name] = torch.zeros(shape, dtype=torch.long)
        elif name == "fc.weight":
            state[name] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        else:  # bn.bias, bn.running_mean, fc.bias
            state[name] = torch.randn(shape, generator=generator) * 0.1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _state_dict_shapes(extractor) -> dict[str, torch.Size]:
    # the extractor loads weights in its constructor: build one on the meta device with the download
    # and the loading switched off, to learn the names and shapes of the state it expects
    from unittest import mock

    tf_inception = _tf_inception_module()
    with mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *args, **kwargs: {}), \
            mock.patch.object(extractor, "load_state_dict", lambda self, state: None), torch.device("meta"):
        module = extractor("inception-v3-compat", list(FEATURE_NAMES))
    return {name: tensor.shape for name, tensor in module.state_dict().items()}
