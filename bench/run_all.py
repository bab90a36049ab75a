"""Run every CPU benchmark in turn and print what each prints; BENCHMARKS.md records these outputs.

Each script measures its own baseline in the same run and prints the ratio, so the figures of one
`run_all` are comparable with each other, not with another machine or another day. Run it on an idle
machine: the ratios move when other work shares the cores.

    .venv/bin/python bench/run_all.py            # all of them, about 10 minutes on 2 cores
    .venv/bin/python bench/run_all.py pack loader  # some of them

The GPU figures come from one other command, bench/gpu_check.py, built for a lent GPU (its docstring
gives the device call); it reuses the train, sample and encode measurements these scripts print.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# name -> (script, arguments): the CPU defaults of each script
BENCHMARKS = {
    "catalog": ("catalog_random_read.py", []),
    "pack": ("pack_speed.py", []),
    "loader": ("loader_throughput.py", []),
    "encode": ("encode_throughput.py", []),
    "export": ("export_throughput.py", []),
    "train": ("train_throughput.py", ["--threads", "1"]),
    "sample": ("sample_throughput.py", ["--threads", "1"]),
}


def main(names: list[str]) -> int:
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    print(f"bench/run_all.py on {platform.node()} ({platform.machine()}, {os.cpu_count()} cores), "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    failed = []
    for name in names or list(BENCHMARKS):
        script, args = BENCHMARKS[name]
        command = [sys.executable, str(HERE / script), *args]
        print(f"\n## {name}: {' '.join(['python', 'bench/' + script, *args])}", flush=True)
        start = time.perf_counter()
        if subprocess.run(command, env=env, cwd=HERE.parent).returncode != 0:
            failed.append(name)
        print(f"({name}: {time.perf_counter() - start:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
