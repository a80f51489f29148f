"""Benchmark: one training step with each penalty against the unregularised step (issue 7).

GRU and LSTM, H=128, B=64, T=100, input 16, a linear readout and MSE, Adam; the penalty is added to
the loss with weight 1e-3 and the whole step (forward, penalty, backward, optimiser) is timed.
Target: the exact Frobenius penalty costs <= 1.5x the unregularised step. ``outputs=`` reuses the step's own
forward (the task loss's) instead of recomputing the trajectory.

    python analyses/benchmark_regularizers.py   # writes figures/benchmark_regularizers.md
"""

from __future__ import annotations

import argparse

import torch
from _bench import machine, table, timeit, write
from torch import nn

from rnnjac.regularizers import jacobian_penalty, lyapunov_penalty

# each penalty gets (rnn, x, out): ``out`` is the step's own forward, reused through ``outputs=``
PENALTIES = {
    "none": None,
    "frobenius, exact (own trajectory)": lambda rnn, x, out: jacobian_penalty(rnn, x),
    "frobenius, exact, outputs= (shared forward)": lambda rnn, x, out: jacobian_penalty(rnn, x, outputs=out),
    "frobenius, exact, shared, time_stride=4": lambda rnn, x, out: jacobian_penalty(rnn, x, outputs=out, time_stride=4),
    "frobenius, projection (n_proj=1), shared": lambda rnn, x, out: jacobian_penalty(
        rnn, x, estimator="projection", outputs=out
    ),
    "spectral (n_iter=3), shared": lambda rnn, x, out: jacobian_penalty(rnn, x, kind="spectral", n_iter=3, outputs=out),
    "end-to-end, projection (n_proj=1), shared": lambda rnn, x, out: jacobian_penalty(
        rnn, x, kind="end_to_end", estimator="projection", outputs=out
    ),
    "lyapunov (k=8, 10 warm-up steps), shared": lambda rnn, x, out: lyapunov_penalty(
        rnn, x, k=8, warmup=10, outputs=out
    ),
}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    rows = []
    for cell in ("gru", "lstm"):
        torch.manual_seed(0)
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](16, args.hidden, batch_first=True)
        head = nn.Linear(args.hidden, 3)
        opt = torch.optim.Adam([*rnn.parameters(), *head.parameters()], lr=1e-3)
        x = torch.randn(args.batch, args.steps, 16)
        y = torch.randn(args.batch, args.steps, 3)
        base = None
        for name, pen in PENALTIES.items():

            def step(pen=pen):
                out, _ = rnn(x)
                loss = nn.functional.mse_loss(head(out), y)
                if pen is not None:
                    loss = loss + 1e-3 * pen(rnn, x, out)
                opt.zero_grad()
                loss.backward()
                opt.step()

            t = timeit(step, repeat=5)
            base = t if pen is None else base
            rows.append([cell.upper(), name, f"{t * 1e3:.0f}", f"{t / base:.2f}x"])
            print(rows[-1], flush=True)
    text = table(rows, ["model", "penalty", "step time [ms]", "vs unregularised"])
    print(text)
    write(
        "benchmark_regularizers.md",
        f"# One training step with penalties: H={args.hidden}, B={args.batch}, T={args.steps}\n\n"
        f"Machine: {machine()}\n\n{text}\n\nTarget: exact Frobenius <= 1.5x the unregularised step.\n\n"
        "Reproduce: `python analyses/benchmark_regularizers.py`\n",
    )


if __name__ == "__main__":
    main()
