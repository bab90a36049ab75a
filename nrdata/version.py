"""The code version written into every manifest and provenance file."""

from __future__ import annotations

import functools
import subprocess
from importlib import metadata
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parent.parent


def package_version() -> str:
    try:
        return metadata.version("nr")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "0+unknown"


@functools.cache
def code_version() -> str:
    """Package version plus the git commit (and '-dirty') when running from a checkout.

    A catalog written by uncommitted code says so, because its latents may not be reproducible
    from any commit.
    """
    version = package_version()
    if not (_REPO_ROOT / ".git").exists():
        return version
    try:
        out = subprocess.run(
            ["git", "-C", str(_REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=12"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{out}" if out else version
