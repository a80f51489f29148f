"""Transition to chaos in random tanh RNNs (Sompolinsky, Crisanti & Sommers 1988; discrete time).

``h_t = tanh(W h_{t-1})`` with ``W_ij ~ N(0, g^2 / N)``, N = 500, zero input. For g < 1 the origin is
the attractor and J = W there, so the largest exponent is log(spectral radius of W) ~ log g
(circular law). Past g = 1 the dynamics become chaotic: the largest exponent turns positive, towards the
mean-field value 1/2 ln(g^2 E[phi'(z)^2]), z ~ N(0, q*), q* = g^2 E[tanh(z)^2] (Molgedey, Schuchhardt & Schuster,
PRL 69, 3717, 1992; chi_1 of Poole et al. 2016), which finite networks approach from below (about 3/N).

Every exponent comes with rnnjac's 95% interval (``*_bounds``: trajectories and time blocks of one network; the
spread between networks is shown by plotting the networks separately, not folded into the intervals).

Writes figures/transition_to_chaos.png and figures/transition_to_chaos.md (about 1.5 minutes on 2 cores,
far longer on a shared machine; ``--quick``: N = 100 and short runs, for a smoke test):

    python analyses/transition_to_chaos.py
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

import rnnjac  # noqa: E402


def network(n: int, gain: float, seed: int) -> torch.nn.RNN:
    rnn = torch.nn.RNN(1, n, bias=False, batch_first=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(torch.randn(n, n, generator=g) * gain / n**0.5)
        rnn.weight_ih_l0.zero_()
    return rnn


def mean_field_lambda1(g: float, nodes: int = 300) -> float:
    """The mean-field lambda_1 of the module docstring for g > 1 (Gauss-Hermite quadrature), log g below."""
    if g <= 1:
        return float(np.log(g))
    x, w = np.polynomial.hermite_e.hermegauss(nodes)
    w = w / w.sum()
    q = 1.0
    for _ in range(10_000):
        q_new = g * g * float(np.sum(w * np.tanh(np.sqrt(q) * x) ** 2))
        if abs(q_new - q) < 1e-14:
            break
        q = q_new
    return 0.5 * float(np.log(g * g * np.sum(w * (1 - np.tanh(np.sqrt(q) * x) ** 2) ** 2)))


def interval(ds, name: str, index: int | None = None) -> tuple[float, float, float]:
    """``(mean, lower, upper)`` of a variable's 95% interval (``name_mean`` and ``name_bounds``)."""
    mean, bounds = ds[f"{name}_mean"], ds[f"{name}_bounds"]
    if index is not None:
        mean, bounds = mean.isel(le_index=index), bounds.isel(le_index=index)
    return float(mean), float(bounds.sel(bound="lower")), float(bounds.sel(bound="upper"))


def fmt(est: tuple[float, float, float], digits: int = 4, sign: str = "+") -> str:
    return f"{est[0]:{sign}.{digits}f} [{est[1]:{sign}.{digits}f}, {est[2]:{sign}.{digits}f}]"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t_start = time.time()
    n = args.n if not args.quick else 100
    gains = np.round(np.arange(0.5, 3.01, 0.25), 2)
    trials, seeds = 2, (0, 1)
    warmup, tangent_warmup, counted = (500, 100, 400) if not args.quick else (100, 20, 80)
    steps = warmup + tangent_warmup + counted
    top = {}
    for gain in gains:
        vals, est = [], []
        for seed in seeds:
            rnn = network(n, float(gain), seed)
            h0 = torch.randn(1, trials, n, generator=torch.Generator().manual_seed(100 + seed))
            ds = rnnjac.lyapunov_spectrum(
                rnn,
                torch.zeros(trials, steps, 1),
                h0,
                k=10,
                warmup=warmup,
                tangent_warmup=tangent_warmup,
                generator=torch.Generator().manual_seed(seed),
            )
            vals.append(ds.lyapunov_exponents.values[:, 0])
            est.append(interval(ds, "lyapunov_exponents", 0))
            radius = float(torch.linalg.eigvals(rnn.weight_hh_l0.detach().double()).abs().max())
        top[float(gain)] = (np.concatenate(vals), radius, est)
        print(f"g={gain:.2f}: lambda_1 = " + "; ".join(fmt(e) for e in est) + " nats/step (per network)", flush=True)
    full = {}
    for gain in (0.8, 1.5, 3.0):
        rnn = network(n, gain, 0)
        h0 = torch.randn(1, 1, n, generator=torch.Generator().manual_seed(100))
        full[gain] = rnnjac.lyapunov_spectrum(
            rnn,
            torch.zeros(1, steps, 1),
            h0,
            warmup=warmup,
            tangent_warmup=tangent_warmup,
            generator=torch.Generator().manual_seed(0),
        )
        ky = fmt(interval(full[gain], "kaplan_yorke_dimension"), 1, "")
        print(f"full spectrum g={gain}: D_KY = {ky}", flush=True)

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    g_arr = np.array(list(top))
    for j, (seed, dx, mk) in enumerate(zip(seeds, (-0.03, 0.03), ("o", "s"), strict=False)):
        e = np.array([v[2][j] for v in top.values()])
        yerr = np.abs(e[:, 1:].T - e[:, 0])
        label = f"λ₁, network {seed} (95% interval, {trials} trajectories)"
        ax1.errorbar(g_arr + dx, e[:, 0], yerr=yerr, marker=mk, ms=4, capsize=3, lw=1, label=label)
    gg = np.linspace(0.5, 1.0, 50)
    ax1.plot(gg, np.log(gg), "k--", lw=1, label="log g (origin stable, J = W)")
    gm = np.linspace(1.0, float(g_arr.max()), 60)
    ax1.plot(gm, [mean_field_lambda1(g) for g in gm], "k:", lw=1.2, label="mean field (N → ∞)")
    ax1.axhline(0, color="0.5", lw=0.8)
    ax1.axvline(1, color="0.5", lw=0.8, ls=":")
    ax1.set_xlabel("gain g (W ~ N(0, g²/N))")
    ax1.set_ylabel("λ₁ [nats/step]")
    ax1.set_title(f"Transition to chaos, tanh RNN N={n}, zero input")
    ax1.legend(fontsize="small")
    labels = [f"g = {g}, D_KY = {fmt(interval(ds, 'kaplan_yorke_dimension'), 1, '')}" for g, ds in full.items()]
    rnnjac.plot.compare(list(full.values()), labels, "lyapunov_exponents", ax=ax2)
    for line, ds in zip(ax2.get_lines()[: len(full)], full.values(), strict=True):
        b = ds.lyapunov_exponents_bounds
        idx = np.arange(1, b.sizes["le_index"] + 1)
        ax2.fill_between(idx, b.sel(bound="lower"), b.sel(bound="upper"), color=line.get_color(), alpha=0.3, lw=0)
    ax2.set_title(f"Full Lyapunov spectra (N={n}, 1 trajectory, 95% bands)")
    out_png = FIGURES / "transition_to_chaos.png"
    fig.savefig(out_png, dpi=130)
    print(f"wrote {out_png}")

    rows = [
        [f"{g:.2f}", f"{np.log(r):+.3f}", f"{mean_field_lambda1(g):+.4f}", *(fmt(e) for e in est)]
        for g, (_, r, est) in top.items()
    ]
    crossing = next((g for g, (v, _, _) in top.items() if v.mean() > 0), None)
    net_cols = [f"lambda_1 network {s} [95% interval]" for s in seeds]
    lines = [
        f"# Transition to chaos: random tanh RNN, N={n}, W ~ N(0, g^2/N), zero input\n",
        f"Exponents from {warmup} warm-up steps, {tangent_warmup} tangent warm-up steps and {counted} counted steps;"
        f" {len(seeds)} networks x {trials} initial states per gain. Runtime {time.time() - t_start:.0f} s on 2 CPU "
        "cores. Each network's lambda_1 is its mean over the trajectories with rnnjac's 95% interval "
        "(`lyapunov_exponents_mean`/`_bounds`: trajectories and time blocks); the two networks differ by more than "
        "their intervals near g = 1, which is the spread between networks, not noise. Mean field: "
        "1/2 ln(g^2 E[phi'(z)^2]) for g > 1 (log g below), the N -> infinity limit.\n",
        table(rows, ["g", "log spectral radius of W", "mean field [nats/step]", *net_cols]),
        "",
        "- lambda_1 follows log(spectral radius of W) ~ log g below g = 1, where the origin is the attractor.",
        f"- lambda_1 crosses 0 between g = 1.0 and g = {crossing} (the first gain with a positive mean): chaos sets in "
        "just above g = 1, as the mean-field theory predicts for N -> infinity; finite N and finite time blur the onset, "
        "and lambda_1 approaches the mean-field curve from below as g grows.",
        "- Full spectra (right panel of the figure, one trajectory each, 95% intervals from time blocks): "
        + "; ".join(
            f"g = {g}: lambda_1 = {fmt(interval(ds, 'lyapunov_exponents', 0), 3)}, "
            f"{int((ds.lyapunov_exponents[0] > 0).sum())} positive exponents, Kaplan-Yorke dimension "
            f"{fmt(interval(ds, 'kaplan_yorke_dimension'), 1, '')}, entropy {fmt(interval(ds, 'ks_entropy'), 3, '')} "
            "nats/step"
            for g, ds in full.items()
        )
        + ".",
        "",
        "Reproduce: `python analyses/transition_to_chaos.py` (`--quick`: N = 100, short runs)",
    ]
    write("transition_to_chaos.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
