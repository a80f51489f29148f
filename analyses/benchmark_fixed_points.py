"""Benchmark: rnnjac.fixed_points (batched Levenberg-Marquardt on F(s) - s with the closed-form J) against
Adam on q(s) = 1/2 ||F(s) - s||^2 with autograd gradients (the reference tool's algorithm, written here).

GRU and LSTM, H=128, input 3, PyTorch's default initialisation with the recurrent weights scaled by 2.5
(several fixed points), 1024 initial states drawn from trajectories under random flip-flop inputs, the
fixed points of the zero-input map, float64, one thread. Time to reach q <= 1e-10 for every search that
converges; Adam is capped in time and its q at the cap reported. Same set: Adam's converged points matched
to rnnjac's within 1e-3.

    python analyses/benchmark_fixed_points.py   # writes figures/benchmark_fixed_points.md
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from _bench import machine, table, write
from torch import nn

import rnnjac
from rnnjac._fixed_points import fixed_points
from rnnjac.tasks import flipflop

TOL = 1e-10


def make_model(arch: str, hidden: int, seed: int = 0):
    torch.manual_seed(seed)
    model = {"gru": nn.GRU, "lstm": nn.LSTM}[arch](3, hidden, batch_first=True).double()
    with torch.no_grad():
        model.weight_hh_l0.mul_(2.5)
    return model


def initial_states(model, n: int, seed: int = 1) -> torch.Tensor:
    x, _ = flipflop(64, 100, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    traj = (
        rnnjac.trajectory(model, x).detach().reshape(-1, model.hidden_size * (2 if isinstance(model, nn.LSTM) else 1))
    )
    return traj[torch.randperm(traj.shape[0], generator=torch.Generator().manual_seed(seed))[:n]]


def module_map(model):
    """F(s) through the module's own forward (seq length 1), on the flat state [h; c]."""
    h = model.hidden_size

    def f(s):
        x = s.new_zeros(s.shape[0], 1, model.input_size)
        if isinstance(model, nn.LSTM):
            _, (hn, cn) = model(x, (s[:, :h].unsqueeze(0).contiguous(), s[:, h:].unsqueeze(0).contiguous()))
            return torch.cat([hn[0], cn[0]], -1)
        return model(x, s.unsqueeze(0).contiguous())[1][0]

    return f


def reference_adam(model, s0: torch.Tensor, *, lr: float = 1e-2, cap_s: float = 60.0):
    """Adam on the summed q of all states with autograd; each state is frozen once q <= TOL."""
    f = module_map(model)
    for p in model.parameters():
        p.requires_grad_(False)
    s = s0.clone().requires_grad_(True)
    opt = torch.optim.Adam([s], lr=lr)
    done = torch.zeros(s.shape[0], dtype=torch.bool)
    t0, it = time.perf_counter(), 0
    while time.perf_counter() - t0 < cap_s:
        q = 0.5 * (f(s) - s).pow(2).sum(-1)
        done |= q.detach() <= TOL
        if bool(done.all()):
            break
        opt.zero_grad()
        (q * ~done).sum().backward()
        s.grad[done] = 0
        keep = s.detach()[done].clone()
        opt.step()
        with torch.no_grad():
            s[done] = keep  # frozen: Adam's momentum must not move converged states
        it += 1
    elapsed = time.perf_counter() - t0
    with torch.no_grad():
        q = 0.5 * (f(s) - s).pow(2).sum(-1)
    return s.detach(), q, elapsed, it


def matched(a: np.ndarray, b: np.ndarray, tol: float = 1e-3) -> int:
    """How many points of ``a`` have a point of ``b`` within ``tol``."""
    if len(a) == 0 or len(b) == 0:
        return 0
    return int((np.linalg.norm(a[:, None] - b[None], axis=-1).min(1) <= tol).sum())


def run(arch: str, hidden: int, n: int, cap_s: float):
    model = make_model(arch, hidden)
    s0 = initial_states(model, n)
    t0 = time.perf_counter()
    ds = fixed_points(model, None, s0, outlier_distance=None)
    t_newton = time.perf_counter() - t0
    fixed = ds.fixed_point_states.values[ds.is_fixed_point.values == 1]
    s_adam, q_adam, t_adam, iters = reference_adam(model, s0, cap_s=cap_s)
    conv = (q_adam <= TOL).numpy()
    # Adam's converged states, deduplicated at 1e-3 like rnnjac's points
    pts: list[np.ndarray] = []
    for p in s_adam[torch.from_numpy(conv)].numpy():
        if not any(np.linalg.norm(p - r) <= 1e-3 for r in pts):
            pts.append(p)
    adam_pts = np.array(pts).reshape(-1, s0.shape[1])
    return {
        "model": f"{arch.upper()} H={hidden}",
        "n": n,
        "newton_s": t_newton,
        "newton_conv": ds.attrs["n_converged"],
        "newton_points": len(fixed),
        "newton_iters": ds.attrs["iterations"],
        "adam_s": t_adam,
        "adam_capped": not bool(conv.all()),
        "adam_iters": iters,
        "adam_conv": int(conv.sum()),
        "adam_points": len(adam_pts),
        "adam_median_q": float(q_adam.median()),
        "adam_max_q": float(q_adam.max()),
        "adam_in_newton": matched(adam_pts, fixed),
        "max_q_newton": float(ds.q.values[ds.is_fixed_point.values == 1].max()) if len(fixed) else float("nan"),
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1024)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--cap", type=float, default=120.0, help="time cap of the Adam reference per model (s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows, results = [], []
    for arch in ("gru", "lstm"):
        r = run(arch, args.hidden, args.n, args.cap)
        results.append(r)
        adam_time = f"{'>' if r['adam_capped'] else ''}{r['adam_s']:.1f}"
        rows.append(
            [
                r["model"],
                r["n"],
                f"{r['newton_s']:.2f} ({r['newton_iters']} it)",
                f"{r['newton_conv']} / {r['newton_points']}",
                f"{r['max_q_newton']:.1e}",
                f"{adam_time} ({r['adam_iters']} it)",
                f"{r['adam_conv']} / {r['adam_points']}",
                f"{r['adam_median_q']:.1e} / {r['adam_max_q']:.1e}",
                f"{r['adam_in_newton']} of {r['adam_points']}",
                f"{'>=' if r['adam_capped'] else ''}{r['adam_s'] / r['newton_s']:.0f}x",
            ]
        )
        print(rows[-1], flush=True)
    headers = [
        "model",
        "initial states",
        "rnnjac newton [s]",
        "converged / fixed points",
        "max q",
        "Adam+autograd [s]",
        "converged / points",
        "Adam q median / max",
        "Adam points found by rnnjac",
        "speed-up",
    ]
    text = (
        "# Fixed points: rnnjac (Levenberg-Marquardt, closed-form J) vs Adam on q with autograd\n\n"
        f"{machine()}; float64, one thread, tol q <= {TOL:g}, zero input, recurrent weights x2.5 (PyTorch init),\n"
        f"{args.n} initial states from flip-flop trajectories. Adam (lr 1e-2, converged states frozen) is stopped at\n"
        f"{args.cap:.0f} s when not every search has converged ('>' marks the cap; the speed-up is then a lower bound).\n\n"
        + table(rows, headers)
        + "\n\n`python analyses/benchmark_fixed_points.py` writes this file.\n"
    )
    print(text)
    write("benchmark_fixed_points.md", text)


if __name__ == "__main__":
    main()
