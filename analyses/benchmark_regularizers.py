"""Benchmark: one training step with each penalty against the unregularised step (issues 7 and 14).

GRU and LSTM, 1 and 2 layers, H=128 and 256, B=64, T=100, input 16, a linear readout and MSE, Adam; the penalty
is added with weight 1e-3 and the whole step (forward, loss, penalty, backward, optimiser step) is timed. Every
regularised step shares its forward with the task loss (``forward_with_states``, ``states=``). The steps of
one configuration are measured alternating (one of each in turn, ``--repeat`` rounds, medians), on one CPU
thread (``torch.set_num_threads(1)``) unless ``--threads``. With ``--old DIR`` (a copy of a previous
``rnnjac`` package, e.g. ``git archive HEAD rnnjac | tar -x -C /tmp/old``) the old code is timed in the same
rounds for the penalties with a target, one layer (with ``states=`` where it had ``forward_with_states``, else
``outputs=``). With ``--compile`` every penalty is also timed with ``compile=True`` (its elementwise passes through
``torch.compile``) in the same rounds; the compile time of the first round is reported separately.
Where a target is missed, the top operators of one profiled step say where the time goes.

Targets (issue 14): exact Frobenius <= 1.5x (GRU), <= 2.0x (LSTM); spectral (3 power iterations) <= 2.5x;
Lyapunov (k=8) <= 4x.

    python analyses/benchmark_regularizers.py --old /tmp/old/rnnjac   # writes figures/benchmark_regularizers.md
    python analyses/benchmark_regularizers.py --cells gru --hidden 128 --layers 1 --penalties exact  # a subset
    python analyses/benchmark_regularizers.py --layers 1 --compile --out benchmark_regularizers_compile.md

On a GPU (one H100: about 4 minutes; the stacked exact Frobenius at H=512 is O(B T H^3) but fast there)::

    python analyses/benchmark_regularizers.py --device cuda --hidden 256 512 --steps 200 --repeat 5 \
        --exact-stacked-max 512 --out benchmark_regularizers_gpu.md

There the unregularised step's ``rnn(x)`` and ``forward_with_states`` both run on cuDNN; a ``[double_backward=True]``
row times the exact penalty with the shared forward on torch's own fused CUDA kernels (differentiable twice).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import random
import statistics
import sys
import time

import torch
from _bench import machine, table, write
from torch import nn

from rnnjac import regularizers as current

# name -> (target, penalty(regularizers module, rnn, x, states or outputs))
PENALTIES = {
    "frobenius, exact": ({"gru": 1.5, "lstm": 2.0}, lambda r, m, x, s: r.jacobian_penalty(m, x, **s)),
    "frobenius, projection (n_proj=1)": (
        None,
        lambda r, m, x, s: r.jacobian_penalty(m, x, estimator="projection", **s),
    ),
    "spectral (n_iter=3)": (2.5, lambda r, m, x, s: r.jacobian_penalty(m, x, kind="spectral", n_iter=3, **s)),
    "spectral (n_iter=3, power_dtype=bfloat16)": (
        2.5,
        lambda r, m, x, s: r.jacobian_penalty(m, x, kind="spectral", n_iter=3, power_dtype=torch.bfloat16, **s),
    ),
    "lyapunov (k=8, warmup=10)": (4.0, lambda r, m, x, s: r.lyapunov_penalty(m, x, k=8, warmup=10, **s)),
}


def _load_old(path: str):
    spec = importlib.util.spec_from_file_location(
        "rnnjac_old", f"{path}/__init__.py", submodule_search_locations=[path]
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rnnjac_old"] = mod
    spec.loader.exec_module(mod)
    import rnnjac_old.regularizers as old  # noqa: PLC0415

    return old


def _steps(cell, hidden, layers, args, old):
    """``{label: (target, step function)}`` for one configuration, and its objects."""
    torch.manual_seed(0)
    dev = torch.device(args.device)
    rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](16, hidden, num_layers=layers, batch_first=True).to(dev)
    head = nn.Linear(hidden, 3).to(dev)
    opt = torch.optim.Adam([*rnn.parameters(), *head.parameters()], lr=1e-3)
    x, y = torch.randn(args.batch, args.steps, 16, device=dev), torch.randn(args.batch, args.steps, 3, device=dev)
    new = current

    def make(pen, mod, shared):
        def step():
            if pen is None:
                out, pen_val = rnn(x)[0], 0.0
            elif shared in ("states", "compile", "no cudnn"):
                kw = {"double_backward": True} if shared == "no cudnn" else {}  # CUDA: torch's kernels, not cuDNN
                out, states = mod.forward_with_states(rnn, x, **kw)  # the same package's: it keeps what it reads
                pen_val = pen(mod, rnn, x, {"states": states} | ({"compile": True} if shared == "compile" else {}))
            else:
                out = rnn(x)[0]
                pen_val = pen(mod, rnn, x, {"outputs": out} if layers == 1 else {})
            loss = nn.functional.mse_loss(head(out), y) + 1e-3 * pen_val
            opt.zero_grad()
            loss.backward()
            opt.step()

        return step

    out = {"none": (None, make(None, None, None))}
    big = layers > 1 and hidden > args.exact_stacked_max
    for name, (target, pen) in PENALTIES.items():
        if not any(word in name for word in args.penalties) or (name == "frobenius, exact" and big):
            continue
        tgt = target.get(cell) if isinstance(target, dict) else target
        out[name] = (tgt, make(pen, new, "states"))
        if args.compile:
            out[name + " [compile]"] = (tgt, make(pen, new, "compile"))
        if args.device == "cuda" and name == "frobenius, exact":  # the shared forward without cuDNN, for comparison
            out[name + " [double_backward=True]"] = (None, make(pen, new, "no cudnn"))
        if old is not None and layers == 1 and target is not None:  # the previous code, its own shared forward
            shared = "states" if hasattr(old, "forward_with_states") else "outputs"
            if args.compile:  # against the compiled rows (the previous code must take compile= too)
                out[name + " [old, compile]"] = (None, make(pen, old, "compile"))
            elif "power_dtype" not in name:
                out[name + " [old]"] = (None, make(pen, old, shared))
    return out


def _measure(steps: dict, repeat: int, sync, clock=time.perf_counter, shuffle: bool = False) -> dict:
    """Median seconds per step over ``repeat`` alternating rounds (``shuffle``: each round in a random order, seeded,
    so that no configuration always runs after the same one), and the warm-up round's time per label."""
    times = {k: [] for k in steps}
    for r in range(repeat + 1):  # the first round warms up (and compiles)
        order = list(steps.items())
        if shuffle and r > 0:
            random.Random(r).shuffle(order)
        for label, (_, fn) in order:
            t0 = clock()
            fn()
            sync()
            times[label].append(clock() - t0)
    return {k: statistics.median(v[1:]) for k, v in times.items()}, {k: v[0] for k, v in times.items()}


def _profile(fn, device) -> str:
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        fn()
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev) or 1
    names = ["compiled graph" if "CompiledFxGraph" in e.key else e.key for e in ev[:3]]
    return ", ".join(f"{n} {100 * e.self_cpu_time_total / total:.0f}%" for n, e in zip(names, ev[:3], strict=True))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--exact-stacked-max", type=int, default=128, help="largest H of the stacked exact Frobenius")
    ap.add_argument("--old", default=None, help="directory of a previous rnnjac package to time alongside")
    ap.add_argument("--out", default="benchmark_regularizers.md")
    ap.add_argument("--cells", nargs="+", default=["gru", "lstm"], choices=["gru", "lstm"])
    ap.add_argument("--penalties", nargs="+", default=[""], help="run the penalties whose label contains a word")
    ap.add_argument("--compile", action="store_true", help="also time every penalty with compile=True")
    ap.add_argument("--shuffle", action="store_true", help="run each round's steps in a random (seeded) order")
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="time each step by this thread's CPU time (time.thread_time) instead of the wall clock: on a shared "
        "machine the time the thread waited for a core is left out (one thread, CPU only)",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    old = _load_old(args.old) if args.old else None
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    rows, t_start, load0, compile_s = [], time.perf_counter(), os.getloadavg()[0], {}
    for cell in args.cells:
        for hidden in args.hidden:
            for layers in args.layers:
                steps = _steps(cell, hidden, layers, args, old)
                clock = time.thread_time if args.cpu_time else time.perf_counter
                med, first = _measure(steps, args.repeat, sync, clock, args.shuffle)
                for label in steps:
                    if label.endswith("[compile]"):
                        print(f"{cell} H={hidden} L={layers} {label}: first step {first[label]:.1f} s", flush=True)
                        compile_s[cell.upper()] = max(compile_s.get(cell.upper(), 0.0), first[label])
                for label, (target, fn) in steps.items():
                    ratio = med[label] / med["none"]
                    missed = target is not None and ratio > target
                    note = _profile(fn, args.device) if missed else ""
                    tgt = "" if target is None else f"<= {target}x" + (" **missed**" if missed else " met")
                    row = [cell.upper(), hidden, layers, label, f"{med[label] * 1e3:.0f}", f"{ratio:.2f}x", tgt, note]
                    rows.append(row)
                    print(row, flush=True)
                # after every configuration, so that a run cut at its time limit keeps its rows
                _report(args, argv, rows, compile_s, t_start, load0)


def _report(args, argv, rows, compile_s, t_start, load0) -> None:
    text = table(rows, ["model", "H", "layers", "penalty", "step [ms]", "vs unregularised", "target", "top ops"])
    dev = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    cudnn = (
        " On CUDA both the unregularised step's `rnn(x)` and `forward_with_states` run on cuDNN; the "
        "`[double_backward=True]` row shares `forward_with_states(..., double_backward=True)` instead (torch's own "
        "fused CUDA kernels, differentiable twice)."
        if args.device == "cuda"
        else ""
    )
    write(
        args.out,
        f"# One training step with penalties: B={args.batch}, T={args.steps}, {dev}\n\n"
        f"Machine: {machine()}; {args.threads} thread(s) (torch.set_num_threads); "
        + ("times are the stepping thread's CPU time (`--cpu-time`); " if args.cpu_time else "")
        + f"total {time.perf_counter() - t_start:.0f} s; "
        f"1-minute load average {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (a shared machine slows "
        "the memory-bound elementwise passes more than the recurrent kernel: compare ratios of one run only)."
        "\n\nEvery regularised step shares its forward with the task loss (`forward_with_states`, `states=`); "
        "`[old]` rows: the previous code, one layer, same shared forward (`[old, compile]`: with `compile=True`). Steps of one configuration are timed "
        f"alternating{' (each round in a random order)' if args.shuffle else ''}, median of {args.repeat} rounds. Stacked exact Frobenius is run up to H={args.exact_stacked_max}: "
        "its cross-layer block is a product of two step-dependent (H, H) matrices, O(B T H^3) (exact is inherently "
        f"cubic there: the projection estimator is the fast route).{cudnn}"
        + (
            " `[compile]` rows: the same penalty with `compile=True`; the longest warm-up step (which compiles; "
            "later configurations reuse the compiled code or Inductor's on-disk cache) took "
            + ", ".join(f"{k} {v:.0f} s" for k, v in compile_s.items())
            + "."
            if compile_s
            else ""
        )
        + "\n\n"
        f"{text}\n\nReproduce: `python analyses/benchmark_regularizers.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n",
    )


if __name__ == "__main__":
    main()
