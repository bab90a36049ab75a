"""Diffusers autoencoders as catalog encoders.

A DC-AE stores its deterministic latent (quantity "mode"); a KL VAE (SD-VAE, VA-VAE) stores the
posterior's "moments", mean then log-variance along channels, so that a trainer can sample from
it or take the mean. Hub ids and local folders load through the same `from_pretrained` call.

torch and diffusers are imported inside the functions that use them: `import nrdata` must stay
light and work without either.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nrdata.catalog.manifest import EncoderInfo

if TYPE_CHECKING:
    import torch

STORAGE_DTYPES = ("bfloat16", "float16", "float32")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_WEIGHT_FILES = ("config.json", "diffusion_pytorch_model*")


def as_torch_dtype(name: Any) -> torch.dtype:
    """`torch.bfloat16` for "bfloat16" (a torch dtype passes through)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name not in STORAGE_DTYPES:
        raise ValueError(f"dtype {name!r} is not one of {STORAGE_DTYPES}")
    return getattr(torch, name)


def compute_dtype_for(device: Any, requested: Any = None, cuda_default: str = "float32") -> torch.dtype:
    """The dtype a network runs in: `requested`, else float32 off CUDA and `cuda_default` on it."""
    import torch

    if requested is not None:
        return as_torch_dtype(requested)
    return as_torch_dtype(cuda_default if torch.device(device).type == "cuda" else "float32")


def locate_source(source: str) -> Path | None:
    """The local path `source` names, or None when it is a hub id ("owner/name").

    A source that is neither an existing path nor shaped like a hub id raises FileNotFoundError.
    """
    path = Path(source).expanduser()
    if path.exists():
        return path.resolve()
    if _HUB_ID.match(source):
        return None
    raise FileNotFoundError(f"encoder source {source!r}: no such file or folder, and not a hub id ('owner/name')")


def weights_digest(paths: list[Path]) -> str:
    """A content hash of local weight files, recorded as the revision when there is no hub commit."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()[:16]


def architecture_config(model: Any) -> dict[str, Any]:
    """The model's class and the config values that differ from its class defaults.

    Values equal to a default are left out, so that a diffusers release adding a config key (with
    the old behaviour as its default) does not change what the weights are; keys starting with
    "_" (diffusers version, name_or_path) say where and how the config was saved, not the network.
    """
    import inspect

    def plain(value: Any) -> Any:  # tuples in code, lists in config.json
        return json.loads(json.dumps(value, default=str))

    params = inspect.signature(type(model).__init__).parameters
    config = {"class": type(model).__name__}
    for key, value in sorted(dict(model.config).items()):
        default = params[key].default if key in params else inspect.Parameter.empty
        if key.startswith("_") or (default is not inspect.Parameter.empty and plain(default) == plain(value)):
            continue
        config[key] = plain(value)
    return config


def weights_identity(model: Any) -> str:
    """A content hash of a network's weights and architecture config: the encoder's identity in a
    manifest.

    It does not depend on where the weights were read from (hub, local copy, another hub revision
    of the same tensors, an LDM checkpoint or the diffusers folder converted from it), on the file
    format or the order of tensors in it: every tensor is hashed by name, shape and value, floating
    point ones as float32 (float16/bfloat16 widen exactly), in name order. Call it before casting
    the network to a lower compute dtype, which would change the values.
    """
    import torch

    digest = hashlib.sha256(json.dumps(architecture_config(model), sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu")
        if tensor.is_floating_point():
            tensor = tensor.to(torch.float32)
        digest.update(f"{name}:{str(tensor.dtype).removeprefix('torch.')}:{list(tensor.shape)}\n".encode())
        digest.update(memoryview(tensor.contiguous().numpy()).cast("B"))
    return "sha256:" + digest.hexdigest()[:16]


def folder_weight_files(folder: Path) -> list[Path]:
    files = sorted({p for pattern in _WEIGHT_FILES for p in folder.glob(pattern) if p.is_file()})
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: no config.json; expected a diffusers model folder (save_pretrained output)")
    return files


def load_diffusers_model(class_name: str, source: str, *, revision: str | None = None,
                         torch_dtype: torch.dtype | None = None) -> tuple[Any, str, str | None]:
    """Load a diffusers autoencoder from a hub id or a local folder.

    Returns (model in eval mode, source as recorded, revision): the hub commit when known, else the
    requested revision, and for local folders a hash of their weight files.
    """
    import diffusers

    model_class = getattr(diffusers, class_name)
    path = locate_source(source)
    if path is not None:
        if not path.is_dir():
            raise NotADirectoryError(f"{path}: is a file; {class_name} loads from a diffusers model folder")
        files = folder_weight_files(path)
        location = str(path)
    else:
        location = source
    try:
        config, commit = model_class.load_config(location, revision=revision, return_commit_hash=True)
        if config.get("_class_name") not in (None, class_name):
            raise ValueError(f"{location}: holds a {config['_class_name']} model, not the {class_name} asked for")
        model = model_class.from_pretrained(location, revision=revision, torch_dtype=torch_dtype)
    except OSError as exc:
        if path is not None:
            raise
        raise OSError(f"encoder source {source!r} is not a local path and could not be loaded from the hub "
                      f"(offline? pass a local folder made with save_pretrained): {exc}") from exc
    if commit is None:
        commit = weights_digest(files) if path is not None else revision
    return model.eval(), location, commit


class VAEEncoder:
    """A diffusers autoencoder behind the `Encoder` interface.

    `dtype` is the storage dtype of the returned latents; `compute_dtype` the dtype the network runs
    in (by default float32 on CPU and `cuda_compute_dtype` on CUDA). bfloat16 latents come back as
    numpy uint16 arrays holding the raw bf16 words, the form the catalog stores. `weights_id` is
    `weights_identity` of the network as loaded, taken here unless given (it must be taken before
    the network is cast to its compute dtype).
    """

    def __init__(self, model: Any, info: EncoderInfo, *, dtype: str = "bfloat16", device: Any = "cpu",
                 compute_dtype: Any = None, cuda_compute_dtype: str = "float32", weights_id: str | None = None) -> None:
        if info.quantity not in ("mode", "moments"):
            raise ValueError(f"{info.name}: stored quantity {info.quantity!r} is not supported (mode or moments)")
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"{info.name}: storage dtype {dtype!r} is not one of {STORAGE_DTYPES}")
        self.model = model
        self.info = info
        self.dtype = dtype
        self.weights_id = weights_id or weights_identity(model)
        self._requested_compute = compute_dtype
        self._cuda_compute_dtype = cuda_compute_dtype
        self.to(device)

    def to(self, device: Any) -> VAEEncoder:
        """Move the network; an unset compute dtype follows the device's default."""
        import torch

        self.device = torch.device(device)
        self.compute_dtype = compute_dtype_for(self.device, self._requested_compute, self._cuda_compute_dtype)
        self.model.to(self.device)
        if next(self.model.parameters()).dtype != self.compute_dtype:  # diffusers warns on every dtype cast
            self.model.to(dtype=self.compute_dtype)
        return self

    def _run(self):
        import contextlib

        import torch

        stack = contextlib.ExitStack()
        stack.enter_context(torch.inference_mode())
        # the caller may be inside autocast; the VAE must run in exactly its compute dtype
        stack.enter_context(torch.autocast(device_type=self.device.type, enabled=False))
        return stack

    def pixels_to_tensor(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] → [N, 3, H, W] in [-1, 1], compute dtype, on the device."""
        import torch

        f = self.info.factor
        if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
                and images.shape[3] == 3 and images.shape[1] % f == 0 and images.shape[2] % f == 0):
            shape = getattr(images, "shape", None)
            raise ValueError(f"{self.info.name} encodes uint8 [N, H, W, 3] with H, W multiples of {f}, got "
                             f"{getattr(images, 'dtype', type(images).__name__)} {shape}")
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2)
        return (x.float() / 127.5 - 1.0).to(self.compute_dtype)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """Stored latents [N, stored_channels, H/f, W/f] in the storage dtype (bf16 as uint16 words)."""
        import torch

        with self._run():
            x = self.pixels_to_tensor(images)
            if self.info.quantity == "mode":
                latents = self.model.encode(x).latent
            else:
                posterior = self.model.encode(x).latent_dist
                latents = torch.cat([posterior.mean, posterior.logvar], dim=1)
            stored = latents.to(as_torch_dtype(self.dtype)).cpu().contiguous()
        if self.dtype == "bfloat16":
            return stored.view(torch.int16).numpy().view(np.uint16)
        return stored.numpy()

    def latents_to_tensor(self, latents: Any) -> torch.Tensor:
        """[N, C or stored C, h, w] from a torch tensor, a float array or raw bf16 words (uint16)."""
        import torch

        if isinstance(latents, torch.Tensor):
            tensor = latents
        else:
            array = np.asarray(latents)
            if array.dtype in (np.uint16, np.int16):  # the catalog's form of bfloat16
                tensor = torch.from_numpy(np.array(array, dtype=np.uint16).view(np.int16)).view(torch.bfloat16)
            elif array.dtype.kind == "f":
                tensor = torch.from_numpy(np.array(array))
            else:
                raise TypeError(f"{self.info.name} decodes float latents or raw bf16 words, got {array.dtype}")
        channels = self.info.channels
        if tensor.ndim != 4 or tensor.shape[1] not in (channels, self.info.stored_channels):
            raise ValueError(f"{self.info.name} decodes [N, {channels} or {self.info.stored_channels}, h, w], "
                             f"got {tuple(tensor.shape)}")
        # one memory layout whatever the caller's: conv kernels differ by layout in the last bits
        return tensor[:, :channels].to(device=self.device, dtype=self.compute_dtype).contiguous()

    def decode(self, latents: Any) -> np.ndarray:
        """uint8 images [N, h·f, w·f, 3]; for moments the mean half is decoded."""
        import torch

        with self._run():
            z = self.latents_to_tensor(latents)
            x = self.model.decode(z).sample
            pixels = ((x.float() + 1.0) / 2.0 * 255.0).clamp(0, 255).round().to(torch.uint8)
            return pixels.permute(0, 2, 3, 1).cpu().numpy()
