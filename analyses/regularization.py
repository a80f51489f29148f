"""Training with Jacobian penalties: none vs Frobenius vs Lyapunov ("gradient flossing").

Task: a long-memory 3-bit flip-flop (pulse probability 0.02, so bits must be held ~50 steps on
average and often much longer), GRU H=32, trained with identical seeds and data under three
objectives:

- ``none``: MSE only;
- ``frobenius``: MSE + 0.01 * mean ||J_t||_F^2 (exact, every iteration);
- ``lyapunov``: MSE + 0.1 * mean over the top 3 exponents of lambda_i^2 (target 0, Engelken 2023),
  every 4th iteration on 8 trials of 100 steps.

Task performance is measured on held-out trials twice as long as the training trials. Writes
figures/regularization.png and figures/regularization.md (a few minutes on 2 cores):

    python analyses/regularization.py
"""

from __future__ import annotations

import argparse
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _bench import FIGURES, table, write  # noqa: E402
from torch import nn  # noqa: E402
from train_flipflop import FlipFlopNet, accuracy  # noqa: E402

import rnnjac  # noqa: E402
from rnnjac.regularizers import jacobian_penalty, lyapunov_penalty  # noqa: E402
from rnnjac.tasks import flipflop  # noqa: E402

P_PULSE = 0.02


def train(mode: str, iters: int, seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = FlipFlopNet(32, cell="gru")
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    test = flipflop(64, 400, p=P_PULSE, generator=torch.Generator().manual_seed(1234))
    curve, pen_time = [], 0.0
    for it in range(1, iters + 1):
        x, y = flipflop(64, 200, p=P_PULSE, generator=gen)
        loss = nn.functional.mse_loss(net(x), y)
        t0 = time.perf_counter()
        if mode == "frobenius":
            loss = loss + 0.01 * jacobian_penalty(net.rnn, x)
        elif mode == "lyapunov" and it % 4 == 0:
            loss = loss + 0.1 * lyapunov_penalty(
                net.rnn, x[:8, :100], k=3, warmup=10, tangent_warmup=10, generator=torch.Generator().manual_seed(it)
            )
        pen_time += time.perf_counter() - t0
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if it % 25 == 0 or it == 1:
            with torch.no_grad():
                test_loss = nn.functional.mse_loss(net(test[0]), test[1]).item()
            curve.append((it, test_loss, accuracy(net, *test)))
    return net, np.array(curve), pen_time


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=800)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t_start = time.time()
    probe = flipflop(8, 600, p=P_PULSE, generator=torch.Generator().manual_seed(77), dtype=torch.float64)[0]
    runs = {}
    for mode in ("none", "frobenius", "lyapunov"):
        t0 = time.time()
        net, curve, pen_time = train(mode, args.iters)
        ds = rnnjac.spectra(
            net.rnn,
            probe,
            warmup=50,
            tangent_warmup=50,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(0),
        )
        runs[mode] = (curve, ds, time.time() - t0)
        print(
            f"{mode}: test loss {curve[-1, 1]:.4f}, accuracy {curve[-1, 2]:.3f}, lambda_1 "
            f"{float(ds.lyapunov_exponents.median('batch')[0]):+.4f} ({time.time() - t0:.0f} s)",
            flush=True,
        )

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3), constrained_layout=True)
    for mode, (curve, _, _) in runs.items():
        axes[0].semilogy(curve[:, 0], curve[:, 1], label=mode)
        axes[1].plot(curve[:, 0], curve[:, 2], label=mode)
    axes[0].set_xlabel("training iteration")
    axes[0].set_ylabel("held-out MSE (trials of 400 steps)")
    axes[0].set_title("Task performance")
    axes[1].set_xlabel("training iteration")
    axes[1].set_ylabel("held-out sign accuracy [fraction]")
    axes[1].set_title("Bits recalled correctly")
    for ax in axes[:2]:
        ax.legend(fontsize="small")
    rnnjac.plot.compare([r[1] for r in runs.values()], list(runs), "lyapunov_exponents", ax=axes[2])
    axes[2].set_title("Lyapunov spectra after training (GRU H=32)")
    out_png = FIGURES / "regularization.png"
    fig.savefig(out_png, dpi=130)
    print(f"wrote {out_png}")

    rows = []
    for mode, (curve, ds, secs) in runs.items():
        lam = ds.lyapunov_exponents.median("batch").values
        fro = float(ds.singular_values.pipe(lambda s: (s**2).sum("sv_index")).median())
        rows.append(
            [
                mode,
                f"{curve[-1, 1]:.4f}",
                f"{curve[-1, 2]:.3f}",
                f"{lam[0]:+.3f}",
                f"{lam[1]:+.3f}",
                f"{lam[2]:+.3f}",
                f"{lam[5]:+.3f}",
                f"{fro:.2f}",
                f"{secs:.0f}",
            ]
        )
    first = {m: next((int(c[0]) for c in r[0] if c[2] >= 0.95), None) for m, r in runs.items()}
    bulk = {m: float(r[1].lyapunov_exponents.median("batch").values[3:].mean()) for m, r in runs.items()}
    top = {m: float(r[1].lyapunov_exponents.median("batch").values[0]) for m, r in runs.items()}
    fro_of = {m: float((r[1].singular_values ** 2).sum("sv_index").median()) for m, r in runs.items()}
    lines = [
        "# Regularisation: no penalty vs Frobenius vs Lyapunov (GRU H=32, long-memory 3-bit flip-flop)\n",
        f"{args.iters} iterations each, identical seeds and data; pulse probability {P_PULSE}; spectra on 8 trials of 600 "
        f"steps (50 + 50 warm-up steps). Total runtime {time.time() - t_start:.0f} s on 2 CPU cores.\n",
        table(
            rows,
            [
                "penalty",
                "held-out MSE",
                "sign accuracy",
                "lambda_1",
                "lambda_2",
                "lambda_3",
                "lambda_6",
                "median ||J_t||_F^2",
                "train time [s]",
            ],
        ),
        "",
        "First iteration with held-out sign accuracy >= 0.95: "
        + ", ".join(f"{m}: {v}" for m, v in first.items())
        + ".",
        "",
        "What changed (numbers from the table and the figure):",
        f"- Frobenius: median ||J_t||_F^2 {fro_of['frobenius']:.2f} vs {fro_of['none']:.2f} unregularised; the exponents "
        f"below the top three fall (mean of lambda_4..lambda_D {bulk['frobenius']:+.2f} vs {bulk['none']:+.2f} nats/step) "
        f"while the top three, which hold the bits, stay near 0; it reaches 95% accuracy later ({first['frobenius']} vs "
        f"{first['none']} iterations).",
        f"- Lyapunov (target 0 for the top 3): the top exponents were already near 0 without it "
        f"(lambda_1 = {top['none']:+.3f}); the penalty lifts the rest of the spectrum instead (mean of lambda_4..lambda_D "
        f"{bulk['lyapunov']:+.2f} nats/step), i.e. slower contraction overall, at "
        f"{runs['lyapunov'][2] / runs['none'][2]:.1f}x the training time.",
        "- On this task all three reach full held-out accuracy; the penalties change the geometry of the dynamics",
        "  (how fast off-task perturbations die out) more than the task score.",
        "",
        "Reproduce: `python analyses/regularization.py`",
    ]
    write("regularization.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
