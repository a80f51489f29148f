"""How the Jacobian spectra of a GRU and an LSTM change while they learn the 3-bit flip-flop task.

Each network is trained on CPU (about a minute each) with checkpoints saved along the way; the
checkpoints are analysed as one sweep (``rnnjac.analyze_checkpoints``) on held-out flip-flop trials,
and the spectra over training are drawn with ``rnnjac.plot.compare``.

Writes figures/training_dynamics.png and figures/training_dynamics.md:

    python analyses/training_dynamics.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _bench import FIGURES, table, write  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from train_flipflop import accuracy, train  # noqa: E402

import rnnjac  # noqa: E402
from rnnjac._pipeline import InputSpec, SpectraOptions  # noqa: E402
from rnnjac.tasks import flipflop  # noqa: E402


def run(cell: str, iters: int, save_at: set[int], folder: Path, test):
    losses = []

    def callback(it, net, loss):
        losses.append(loss)
        if it in save_at:
            save_file(
                {k: v.detach().contiguous() for k, v in net.state_dict().items()},
                str(folder / f"{cell}_step{it:05d}.safetensors"),
                metadata={"step": str(it), "arch": cell},
            )

    torch.manual_seed(0)
    from train_flipflop import FlipFlopNet

    net0 = FlipFlopNet(32, cell=cell)
    save_file(
        {k: v.contiguous() for k, v in net0.state_dict().items()},
        str(folder / f"{cell}_step00000.safetensors"),
        metadata={"step": "0", "arch": cell},
    )
    net, _ = train(hidden=32, cell=cell, iters=iters, seed=0, log_every=0, callback=callback)
    return np.array(losses), accuracy(net, *test)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=1500)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t_start = time.time()
    save_at = {25, 50, 100, 200, 400, 800, args.iters}
    test = flipflop(64, 200, generator=torch.Generator().manual_seed(999))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        np.save(folder / "inputs.npy", flipflop(8, 300, generator=torch.Generator().manual_seed(7))[0].numpy())
        for cell in ("gru", "lstm"):
            losses, acc = run(cell, args.iters, save_at, folder, test)
            paths = sorted(folder.glob(f"{cell}_step*.safetensors"))
            ds = rnnjac.analyze_checkpoints(
                paths,
                inputs=InputSpec(path=str(folder / "inputs.npy")),
                options=SpectraOptions(warmup=20, tangent_warmup=30, dtype="float64", singular_values=True),
                load_kwargs={"prefix": "rnn."},
            )
            results[cell] = (losses, acc, ds)
            print(
                f"{cell}: final loss {losses[-1]:.4f}, sign accuracy {acc:.3f}; analysed {ds.sizes['checkpoint']} "
                f"checkpoints",
                flush=True,
            )

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    for row, (cell, (losses, _acc, ds)) in zip(axes, results.items(), strict=True):
        steps = ds.training_step.values
        ax = row[0]
        ax.semilogy(np.arange(1, len(losses) + 1), losses, lw=0.8, color="0.3")
        for s in steps[1:]:
            ax.axvline(s, color="C1", lw=0.6, ls=":")
        ax.set_xlabel("training iteration")
        ax.set_ylabel("MSE loss")
        ax.set_title(f"{cell.upper()} H=32 on the 3-bit flip-flop (dotted: checkpoints)")
        rows = [ds.isel(checkpoint=i) for i in range(ds.sizes["checkpoint"])]
        rnnjac.plot.compare(rows, [f"step {s}" for s in steps], "lyapunov_exponents", ax=row[1])
        row[1].set_title(f"{cell.upper()}: Lyapunov spectrum over training")
        lam = ds.lyapunov_exponents.median("batch")
        for i in range(4):
            row[2].plot(steps, lam.isel(le_index=i), marker="o", ms=3, label=f"λ_{i + 1}")
        row[2].set_xscale("symlog", linthresh=25)
        row[2].axhline(0, color="k", lw=0.8)
        row[2].set_xlabel("training step [step]")
        row[2].set_ylabel("Lyapunov exponent [nats/step]")
        row[2].set_title(f"{cell.upper()}: top exponents against training step")
        row[2].legend(fontsize="small")
    out_png = FIGURES / "training_dynamics.png"
    fig.savefig(out_png, dpi=120)
    print(f"wrote {out_png}")

    lines = [
        "# Spectra over training: GRU and LSTM (H = 32) on the 3-bit flip-flop\n",
        f"Trained {args.iters} iterations each (Adam, lr 3e-3, batch 64, 100 steps, seed 0); spectra on 8 held-out "
        f"trials of 300 steps (20 warm-up + 30 tangent warm-up steps, float64). Runtime {time.time() - t_start:.0f} s.\n",
    ]
    for cell, (losses, acc, ds) in results.items():
        lam = ds.lyapunov_exponents.median("batch")
        sv = ds.singular_values.median(("batch", "time"))
        rows = [
            [
                int(s),
                f"{losses[max(int(s), 1) - 1]:.4f}",
                *(f"{float(lam.isel(checkpoint=i, le_index=j)):+.3f}" for j in range(3)),
                int((lam.isel(checkpoint=i) > -0.05).sum()),
                f"{float(sv.isel(checkpoint=i, sv_index=0)):.2f}",
            ]
            for i, s in enumerate(ds.training_step.values)
        ]
        lines += [
            f"## {cell.upper()} (final sign accuracy {acc:.3f})\n",
            table(
                rows, ["step", "loss", "lambda_1", "lambda_2", "lambda_3", "# exponents > -0.05", "median sigma_1(J_t)"]
            ),
            "",
        ]
    reading = []
    for cell, (_, _, ds) in results.items():
        lam = ds.lyapunov_exponents.median("batch")
        first, last = lam.isel(checkpoint=0).values, lam.isel(checkpoint=-1).values
        reading.append(
            f"- {cell.upper()}: lambda_1..3 go from {', '.join(f'{v:+.2f}' for v in first[:3])} at step 0 to "
            f"{', '.join(f'{v:+.2f}' for v in last[:3])} after training, while the mean of the remaining exponents "
            f"moves from {first[3:].mean():+.2f} to {last[3:].mean():+.2f} nats/step."
        )
    lines += [
        "Reading (numbers from the tables):",
        *reading,
        "Learning to hold three bits lifts about three exponents towards 0: slow directions that keep a bit",
        "between pulses. The jump comes early (by step 50-100, when the loss starts to fall) and the exponents",
        "then settle slightly below 0; the rest of the spectrum stays clearly contracting.",
        "",
        "Reproduce: `python analyses/training_dynamics.py`",
    ]
    write("training_dynamics.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
