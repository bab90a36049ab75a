"""Optional dependencies: which extra of `pip install 'nr[EXTRA]'` brings which module, and the one-line
message a command gives when it is missing.

Plots (matplotlib), TensorBoard and Ray Train are not needed to encode, pack, train or sample, so they
are extras (`plots`, `tensorboard`, `ray-train`). Where a plot or a log is incidental (loss.png,
packs.png, catalog_sizes.png, TensorBoard events) the caller skips it and returns `missing_notice`;
where the user asked for exactly that (`nr catalog stats --png`, `nr train --ray-workers`) the command
stops with `MissingExtraError`.
"""

from __future__ import annotations

import importlib

# module to import -> (package to install, extra that installs it, what it is for)
EXTRAS = {
    "matplotlib": ("matplotlib", "plots", "plots (loss.png, packs.png, catalog_sizes.png)"),
    "torch.utils.tensorboard": ("tensorboard", "tensorboard", "TensorBoard logs"),
    "ray.train": ("ray[train]", "ray-train", "Ray Train (nr train --ray-workers)"),
}


class MissingExtraError(ImportError):
    """An optional dependency that the asked-for output needs is not installed; the message names the
    extra that installs it."""


def available(module: str) -> bool:
    """Whether `module` imports here (a failed import of an installed but broken package counts as missing)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def missing_notice(module: str, *, skipped: str) -> str:
    """One line for a skipped incidental output, e.g. 'matplotlib is not installed: loss.png skipped; ...'."""
    package, extra, _ = EXTRAS[module]
    return f"{package} is not installed: {skipped} skipped; pip install 'nr[{extra}]' to get it"


def require(module: str):
    """Import `module`, or raise MissingExtraError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package, extra, purpose = EXTRAS[module]
        raise MissingExtraError(f"{purpose}: {package} is not installed ({exc}); "
                                f"pip install 'nr[{extra}]'") from exc
