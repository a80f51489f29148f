"""How fast the command line answers ``--version`` and ``--help`` (issue: startup well under a second).

Runs each command as a fresh process (the console script and ``python -m rnnjac``) several times and
prints the median wall time; writes the table to ``figures/benchmark_startup.md``. ``import rnnjac``
loads nothing heavy (PEP 562 lazy exports), so these commands never import torch or xarray.
"""

from __future__ import annotations

import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPEATS = 7
COMMANDS = {
    "rnnjac --version": [shutil.which("rnnjac") or "rnnjac", "--version"],
    "rnnjac --help": [shutil.which("rnnjac") or "rnnjac", "--help"],
    "rnnjac analyze --help": [shutil.which("rnnjac") or "rnnjac", "analyze", "--help"],
    "python -m rnnjac --version": [sys.executable, "-m", "rnnjac", "--version"],
    "python -c 'import torch' (reference)": [sys.executable, "-c", "import torch"],
}


def wall(argv) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    times = {name: [] for name in COMMANDS}
    for _ in range(REPEATS):  # alternate the commands so that machine load hits all alike
        for name, argv in COMMANDS.items():
            times[name].append(wall(argv))
    rows = [f"| `{name}` | {statistics.median(t):.3f} | {min(t):.3f} |" for name, t in times.items()]
    table = "\n".join(
        [
            f"Startup time, median and best of {REPEATS} fresh processes; {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}. Target: `rnnjac --version` < 0.5 s.",
            "",
            "| command | median (s) | best (s) |",
            "|---|---|---|",
            *rows,
        ]
    )
    print(table)
    out = Path(__file__).resolve().parent.parent / "figures" / "benchmark_startup.md"
    out.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
