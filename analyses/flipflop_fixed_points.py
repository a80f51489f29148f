"""Fixed points of the 3-bit flip-flop networks: the 8 memory corners and the saddles between them.

The bundled GRU (``rnnjac/data/flipflop_gru.safetensors``, H=32) and an LSTM trained the same way
(``analyses/train_flipflop.py``, 1500 iterations, seed 0; ``--no-lstm`` skips it): fixed points of the zero-input map found from 1024
states of flip-flop trajectories, classified by stability and, through the trained readout, by the 3 bits
each stable point stores.

    python analyses/flipflop_fixed_points.py [--no-lstm]   # figures/flipflop_fixed_points.{png,md}
"""

from __future__ import annotations

import argparse
import importlib.resources
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from _bench import FIGURES, table, write  # noqa: E402
from safetensors import safe_open  # noqa: E402

import rnnjac  # noqa: E402
from rnnjac._fixed_points import fixed_points  # noqa: E402
from rnnjac.tasks import flipflop  # noqa: E402

CKPT = importlib.resources.files("rnnjac") / "data" / "flipflop_gru.safetensors"


def bundled_gru():
    gru = rnnjac.load_checkpoint(CKPT)
    with safe_open(str(CKPT), "pt") as f:
        readout = (f.get_tensor("readout.weight"), f.get_tensor("readout.bias"))
    return gru, readout


def trained_lstm(iters: int):
    from train_flipflop import train

    t0 = time.time()
    net, loss = train(cell="lstm", iters=iters, log_every=0)
    print(f"LSTM trained in {time.time() - t0:.0f} s (loss {loss:.4f})")
    return net.rnn, (net.readout.weight.detach(), net.readout.bias.detach())


def analyse(name: str, rnn, readout, seed: int = 0):
    x, _ = flipflop(64, 300, generator=torch.Generator().manual_seed(seed + 1))
    traj = rnnjac.trajectory(rnn, x).detach()
    t0 = time.time()
    ds = fixed_points(rnn, None, traj, n_initial=1024, generator=torch.Generator().manual_seed(seed))
    elapsed = time.time() - t0
    fixed = ds.is_fixed_point.values == 1
    stable = ds.stable.values == 1
    n_unst = ds.n_unstable.values
    h_idx = np.flatnonzero(ds.part.values == "h")
    w, b = readout
    out = ds.fixed_point_states.values[:, h_idx] @ w.double().numpy().T + b.double().numpy()
    corners = {tuple(int(v) for v in np.sign(o)) for o, keep in zip(out, fixed & stable, strict=True) if keep}
    row = {
        "model": name,
        "searches converged": f"{ds.attrs['n_converged']} / {ds.attrs['n_initial']}",
        "stable fixed points": int((fixed & stable).sum()),
        "memory corners (readout signs)": f"{len(corners)} of 8",
        "saddles (1 unstable direction)": int((fixed & (n_unst == 1)).sum()),
        "unstable, >= 2 directions": int((fixed & (n_unst >= 2)).sum()),
        "slow points": int((~fixed).sum()),
        "max q of fixed points": f"{ds.q.values[fixed].max():.1e}",
        "time [s]": f"{elapsed:.1f}",
    }
    return ds, traj, row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-lstm", action="store_true", help="skip training the LSTM (about 20 s on one thread)")
    ap.add_argument("--lstm-iters", type=int, default=1500)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    models = [("GRU (bundled, H=32)", *bundled_gru())]
    if not args.no_lstm:
        models.append((f"LSTM (H=32, {args.lstm_iters} iterations)", *trained_lstm(args.lstm_iters)))
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 5 * len(models)), constrained_layout=True, squeeze=False)
    rows = []
    for (name, rnn, readout), (ax_pts, ax_eig) in zip(models, axes, strict=True):
        ds, traj, row = analyse(name, rnn, readout)
        rows.append(row)
        print(row, flush=True)
        rnnjac.plot.fixed_points(ds, traj, ax=ax_pts)
        rnnjac.plot.fixed_point_eigenvalues(ds, ax=ax_eig)
        ax_pts.set_title(f"{name}: fixed points over trajectories (PCA)")
    png = FIGURES / "flipflop_fixed_points.png"
    fig.savefig(png, dpi=110)
    print(f"wrote {png}")
    headers = list(rows[0])
    text = (
        "# Fixed points of the 3-bit flip-flop networks\n\n"
        "`rnnjac.fixed_points` (Newton/Levenberg-Marquardt, tol q <= 1e-10, float64) on the zero-input map,\n"
        "1024 initial states drawn from 64 flip-flop trajectories of 300 steps. Memory corners: the distinct\n"
        "sign patterns of the trained readout at the stable fixed points.\n\n"
        + table([[r[h] for h in headers] for r in rows], headers)
        + "\n\n![fixed points](flipflop_fixed_points.png)\n\n`python analyses/flipflop_fixed_points.py` writes this file.\n"
    )
    write("flipflop_fixed_points.md", text)


if __name__ == "__main__":
    main()
