"""Shared helpers of the benchmark scripts: timing, machine description, markdown tables."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIGURES = ROOT / "figures"


def timeit(fn, *, repeat: int = 5, warmup: int = 1, sync=None) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"Python {platform.python_version()}"
    )


def table(rows: list[list], headers: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    out = [
        "| " + " | ".join(f"{h:<{w}}" for h, w in zip(headers, widths, strict=False)) + " |",
        "| " + " | ".join("-" * w for w in widths) + " |",
    ]
    out += ["| " + " | ".join(f"{str(x):<{w}}" for x, w in zip(r, widths, strict=False)) + " |" for r in rows]
    return "\n".join(out)


def write(name: str, text: str) -> Path:
    FIGURES.mkdir(exist_ok=True)
    path = FIGURES / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    print(f"wrote {path}")
    return path
