"""Benchmark: sweep throughput (checkpoints per minute) with the synchronous scheduler and with
local Dask clusters of 1 and 2 worker processes (issue 8).

16 GRU checkpoints (H=128), each analysed on 8 Gaussian trials of 300 steps (singular values and all
Lyapunov exponents). Cluster start-up is included in the wall time, as a user would see it.

    python analyses/benchmark_sweeps.py     # writes figures/benchmark_sweeps.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from _bench import machine, table, write

import rnnjac
from rnnjac._pipeline import InputSpec, SpectraOptions


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=16)
    args = ap.parse_args(argv)
    host = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(args.n):
            torch.manual_seed(i)
            path = Path(tmp) / f"ckpt_step{i * 100:05d}.pt"
            torch.save(torch.nn.GRU(16, 128).state_dict(), path)
            paths.append(path)
        inputs, options = InputSpec(batch=8, steps=300), SpectraOptions()
        ref = None
        for label, kw in (
            ("synchronous", {}),
            ("LocalCluster, 1 worker", {"workers": 1}),
            ("LocalCluster, 2 workers", {"workers": 2}),
        ):
            torch.set_num_threads(2 if not kw else 1)
            t0 = time.perf_counter()
            ds = rnnjac.analyze_checkpoints(paths, inputs=inputs, options=options, **kw)
            dt = time.perf_counter() - t0
            if ref is None:
                ref = ds
            diff = float(abs(ds.lyapunov_exponents - ref.lyapunov_exponents).max())
            rows.append([label, f"{dt:.1f}", f"{args.n / dt * 60:.1f}", f"{diff:.1e}"])
            print(rows[-1], flush=True)
    text = table(rows, ["scheduler", "wall time [s]", "checkpoints / minute", "max |diff| of exponents vs synchronous"])
    print(text)
    write(
        "benchmark_sweeps.md",
        f"# Sweep throughput: {args.n} GRU H=128 checkpoints, 8 trials x 300 steps each\n\n"
        f"Machine: {host}\n\n{text}\n\nThe synchronous run uses torch's 2 threads; each worker process uses 1. "
        "Cluster start-up is included. The checkpoints are float32: another thread count changes the GEMM "
        "summation order, hence differences at float32 round-off level (the float64 sweeps of tests/test_sweeps.py "
        "agree with single analyses to 1e-12).\n\nReproduce: `python analyses/benchmark_sweeps.py`\n",
    )


if __name__ == "__main__":
    main()
