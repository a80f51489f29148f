"""Benchmark: analytic Jacobians against the usual autograd recipes (issue 2).

LSTM H=128, B=32, T=50, float32, full state (D = 256), on this machine's CPU threads. Compared:
(a) the forum recipe: a loop over basis vectors with ``torch.autograd.grad`` (one backward per state
    unit and step), (b) ``torch.func.vmap(jacrev(step))`` over all (sample, step) pairs (rnnjac's
    ``method="autograd"``), (c) ``torch.autograd.functional.jacobian(vectorize=True)`` per step with the
    batch-sum trick, (d) the memory floor: filling a tensor of the output's size.
All are checked to agree with the analytic result before timing.

    python analyses/benchmark_jacobians.py        # prints the table, writes figures/benchmark_jacobians.md
"""

from __future__ import annotations

import argparse
import time

import torch
from _bench import machine, table, timeit, write

import rnnjac
from rnnjac._dynamics import as_dynamics


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--loop-steps", type=int, default=5, help="steps timed for recipe (a), scaled to T")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(16, args.hidden, batch_first=True)
    x = torch.randn(args.batch, args.steps, 16)
    dyn = as_dynamics(lstm)
    d = dyn.state_size
    with torch.no_grad():
        ref = rnnjac.jacobians(lstm, x)
        states = rnnjac.trajectory(lstm, x)
    b, t = args.batch, args.steps

    def analytic():
        with torch.no_grad():
            return rnnjac.jacobians(lstm, x)

    def autograd_vmap():
        with torch.no_grad():
            return rnnjac.jacobians(lstm, x, method="autograd")

    def loop_basis(n_steps):
        out = torch.empty(b, n_steps, d, d)
        for k in range(n_steps):
            s = states[:, k].clone().requires_grad_(True)
            nxt = dyn.step(s, x[:, k])
            for i in range(d):
                (g,) = torch.autograd.grad(nxt[:, i].sum(), s, retain_graph=True)
                out[:, k, i] = g
        return out

    def functional(n_steps=t):
        out = torch.empty(b, n_steps, d, d)
        for k in range(n_steps):
            jk = torch.autograd.functional.jacobian(
                lambda s, k=k: dyn.step(s, x[:, k]).sum(0), states[:, k], vectorize=True
            )
            out[:, k] = jk.permute(1, 0, 2)
        return out

    def fill():
        return torch.empty(b, t, d, d).fill_(1.0)

    # correctness first
    torch.testing.assert_close(autograd_vmap(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loop_basis(2), ref[:, :2], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(functional(2), ref[:, :2], rtol=1e-4, atol=1e-5)

    t_analytic = timeit(analytic, repeat=7)
    t_vmap = timeit(autograd_vmap, repeat=3)
    t_func = timeit(functional, repeat=2)
    t0 = time.perf_counter()
    loop_basis(args.loop_steps)
    t_loop = (time.perf_counter() - t0) * t / args.loop_steps
    t_fill = timeit(fill, repeat=7)
    rows = [
        ["rnnjac analytic (closed form)", f"{t_analytic * 1e3:.1f}", "1.0x", ""],
        [
            "(a) basis loop, autograd.grad",
            f"{t_loop * 1e3:.0f}",
            f"{t_loop / t_analytic:.0f}x",
            f"measured on {args.loop_steps} of {t} steps, scaled",
        ],
        ["(b) torch.func vmap(jacrev)", f"{t_vmap * 1e3:.0f}", f"{t_vmap / t_analytic:.1f}x", ""],
        [
            "(c) autograd.functional.jacobian",
            f"{t_func * 1e3:.0f}",
            f"{t_func / t_analytic:.1f}x",
            "vectorize=True, per step",
        ],
        [
            "(d) fill output tensor (floor)",
            f"{t_fill * 1e3:.1f}",
            f"{t_fill / t_analytic:.2f}x",
            f"{b * t * d * d * 4 / 2**20:.0f} MiB",
        ],
    ]
    headers = ["method", "time [ms]", "vs analytic", "note"]
    text = table(rows, headers)
    print(text)
    targets = (
        f"Targets: >=10x faster than (a): {t_loop / t_analytic:.0f}x; >=30x faster than (b): "
        f"{t_vmap / t_analytic:.1f}x; within 5x of (d): {t_analytic / t_fill:.2f}x."
    )
    print(targets)
    write(
        "benchmark_jacobians.md",
        f"# Jacobians: LSTM H={args.hidden}, B={b}, T={t}, float32, D={d}\n\n"
        f"Machine: {machine()}\n\n{text}\n\n{targets}\n\nReproduce: `python analyses/benchmark_jacobians.py`\n",
    )


if __name__ == "__main__":
    main()
