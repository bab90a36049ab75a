"""What the torch benchmarks share: the --device/--threads options, the machine line they print,
random weights where NiT initialises zeros, and the time budget gpu_check gives each of them."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import time

import torch


def add_device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core)")


def resolve_device(parser: argparse.ArgumentParser, args: argparse.Namespace) -> torch.device:
    """Apply --threads and turn --device into a torch.device, or exit with the fix."""
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device!r}: {error}")
    if device.type not in ("cpu", "cuda"):
        parser.error(f"--device {args.device!r}: use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this torch ({torch.__version__}) sees no CUDA device")
    return device


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def print_header(title: str, device: torch.device) -> None:
    """Title, the exact command, the machine, and a warning when contended threads will skew CPU figures."""
    cuda = device.type == "cuda"
    gpu = torch.cuda.get_device_name(device) if cuda else "no GPU"
    print(title)
    print(f"command: {shlex.join([os.path.relpath(sys.executable), *sys.argv])}")
    print(f"machine: {platform.node()}, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), "
          f"{platform.machine()}, python {platform.python_version()}, torch {torch.__version__}, "
          f"device {device} ({gpu}), load average (1, 5, 15 min) {load_average()}")
    threads = torch.get_num_threads()
    if not cuda and threads > 1 and os.getloadavg()[0] + threads > os.cpu_count() + 0.5:
        print(f"note: other work already loads this CPU ({os.getloadavg()[0]:.1f}) and torch uses "
              f"{threads} threads on {os.cpu_count()} cores; contended threads slow small ops "
              "unevenly, --threads 1 gives steadier figures")


def randomize_zero_layers(model: torch.nn.Module, seed: int) -> None:
    """Draw the zero-initialised (adaLN-Zero, final) weights at std 0.02 so outputs are not all zero."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2 and not parameter.any():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.02)


def budget_short(deadline: float | None, needed: float, measured_any: bool) -> float | None:
    """Seconds left when the next variant (about `needed` seconds) no longer fits before `deadline`,
    else None. The first variant always runs, so a section never reports nothing."""
    if deadline is None or not measured_any:
        return None
    left = deadline - time.monotonic()
    return left if left < needed else None
