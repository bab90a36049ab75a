"""What `nr doctor` reports: library versions, devices, and the attention backend a run will use."""

from __future__ import annotations

import platform
from dataclasses import dataclass
from importlib import metadata

from nrdata.version import code_version

# distribution names, in the order a person debugging an install wants to see them
PACKAGES = ("torch", "ray", "diffusers", "flash-attn", "numba", "pyarrow", "polars", "safetensors", "pillow",
            "matplotlib", "tensorboard")


@dataclass(frozen=True)
class Check:
    name: str
    value: str
    ok: bool = True
    hint: str = ""


def installed_version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment_report() -> list[Check]:
    checks = [Check("nr", code_version()), Check("python", platform.python_version())]
    for dist in PACKAGES:
        version = installed_version(dist)
        optional = dist in ("ray", "diffusers", "flash-attn", "matplotlib", "tensorboard")
        hint = {"flash-attn": "optional, CUDA only: pip install flash-attn --no-build-isolation",
                "ray": "needed by nr encode: pip install 'nr[encode]'",
                "diffusers": "needed by the VAE encoders: pip install 'nr[encode]'",
                "matplotlib": "optional, for the PNG plots: pip install 'nr[plots]'",
                "tensorboard": "optional, for TensorBoard logs: pip install 'nr[tensorboard]'"}.get(dist, "")
        checks.append(Check(dist, version or "not installed", ok=version is not None or optional,
                            hint="" if version else hint))
    import torch

    cuda = torch.cuda.is_available()
    checks.append(Check("torch CUDA build", torch.version.cuda or "none (CPU build)"))
    if cuda:
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        checks.append(Check("devices", ", ".join(f"cuda:{i} {n}" for i, n in enumerate(names))))
        checks.append(Check("bf16", "supported" if torch.cuda.is_bf16_supported() else "not supported"))
    else:
        checks.append(Check("devices", f"cpu ({torch.get_num_threads()} threads)"))
    from nrtrain.attention import choose_backend
    from nrtrain.train import precision_dtype

    device = torch.device("cuda" if cuda else "cpu")
    backend, why = choose_backend(device.type, precision_dtype("auto", device))  # what `nr train` picks
    checks.append(Check("attention backend", f"{backend} ({why})"))
    return checks
