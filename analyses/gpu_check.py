"""GPU check: correctness on CUDA against the CPU, route measurements, and a benchmark table.

Needs only torch, numpy and xarray; run from the repository root:

    PYTHONPATH=. python analyses/gpu_check.py [--out DIR]

On a CUDA machine it (1) compares Jacobians, verification, spectra and penalties on CUDA with the CPU
in float64, in eval mode, including a double backward (no cuDNN is differentiated); (2) measures
the QR route (Householder vs shifted CholeskyQR3) for many small tall blocks and the svdvals driver;
(3) times the workloads of issue 8: Jacobians and per-step singular values for LSTM H=512, B=256,
T=200; Lyapunov top-64 for GRU H=1024, B=64, T=1000; the exact Frobenius penalty's training-step
overhead. Without CUDA it runs the same code on small sizes as a smoke test and says that no GPU
numbers were measured. Writes benchmark_gpu.md into --out (default figures/). Under 3 minutes.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _bench import table, timeit  # noqa: E402  (stdlib + torch only)

import rnnjac  # noqa: E402
from rnnjac import _linalg  # noqa: E402
from rnnjac.regularizers import jacobian_penalty, lyapunov_penalty  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
LINES: list[str] = []


def say(text: str = "") -> None:
    print(text, flush=True)
    LINES.append(text)


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, repeat: int = 3, warmup: int = 1) -> float:
    """Median wall time with the device synchronised around each call."""
    return timeit(fn, repeat=repeat, warmup=warmup, sync=sync)


def module(arch: str, hidden: int, layers: int = 1, proj: int = 0, inp: int = 8, seed: int = 0, dtype=torch.float64):
    torch.manual_seed(seed)
    if arch == "lstm":
        m = torch.nn.LSTM(inp, hidden, num_layers=layers, proj_size=proj, batch_first=True)
    elif arch == "gru":
        m = torch.nn.GRU(inp, hidden, num_layers=layers, batch_first=True)
    else:
        m = torch.nn.RNN(inp, hidden, num_layers=layers, batch_first=True)
    return m.to(dtype).eval()


def maxdiff(a, b) -> float:
    a = a.detach().cpu().double() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a)).double()
    b = b.detach().cpu().double() if isinstance(b, torch.Tensor) else torch.as_tensor(np.asarray(b)).double()
    return float((a - b).abs().max())


# ----------------------------------------------------------------------------- 1. correctness
def correctness() -> list[list]:
    rows = []
    gen = torch.Generator().manual_seed(0)
    for arch, layers, proj in (("rnn", 2, 0), ("gru", 1, 0), ("lstm", 2, 3)):
        m_cpu = module(arch, 12, layers, proj)
        m_dev = module(arch, 12, layers, proj).to(DEV)
        x = torch.randn(4, 30, 8, generator=gen, dtype=torch.float64)
        xd = x.to(DEV)
        name = f"{arch} L{layers}" + (f" proj{proj}" if proj else "")
        for method in ("analytic", "autograd"):
            d = maxdiff(rnnjac.jacobians(m_dev, xd, method=method), rnnjac.jacobians(m_cpu, x, method=method))
            rows.append([name, f"jacobians ({method})", f"{d:.1e}", d < 1e-10])
        v = rnnjac.verify(m_dev, xd)
        rows.append(
            [name, "verify on device (FD float64)", f"{float(v.fd_max_abs_error.max()):.1e}", bool(v.attrs["passed"])]
        )
        kw = dict(eigenvalues=True, end_to_end=True, k=6, warmup=3, local_lyapunov=True)
        a = rnnjac.spectra(m_cpu, x, generator=torch.Generator().manual_seed(1), **kw)
        b = rnnjac.spectra(m_dev, xd, generator=torch.Generator().manual_seed(1), **kw)
        for var in ("singular_values", "lyapunov_exponents", "spectral_radius"):
            d = maxdiff(b[var].values, a[var].values)
            rows.append([name, f"spectra: {var}", f"{d:.1e}", d < 1e-8])
        ea, eb = a.end_to_end_log_singular_values.values, b.end_to_end_log_singular_values.values
        resolved = ea >= ea[..., :1] - 30  # values within 30 nats of the top (float64 resolves them)
        d = float(np.abs(ea - eb)[resolved].max() / np.abs(ea[resolved]).max())
        rows.append([name, "spectra: end-to-end log sv (within 30 nats of top), relative", f"{d:.1e}", d < 1e-7])
        for kind in ("frobenius", "spectral", "end_to_end"):
            pa = jacobian_penalty(m_cpu, x, kind=kind, n_iter=30, generator=torch.Generator().manual_seed(3))
            pb = jacobian_penalty(m_dev, xd, kind=kind, n_iter=30, generator=torch.Generator().manual_seed(3))
            (ga,) = torch.autograd.grad(pa, m_cpu.weight_hh_l0)
            (gb,) = torch.autograd.grad(pb, m_dev.weight_hh_l0)
            d = max(maxdiff(pa, pb) / max(abs(float(pa)), 1e-30), maxdiff(ga, gb) / float(ga.abs().max()))
            rows.append([name, f"penalty {kind}: value + grad (eval mode)", f"{d:.1e}", d < 1e-8])
        la = lyapunov_penalty(m_cpu, x, k=3, generator=torch.Generator().manual_seed(2))
        lb = lyapunov_penalty(m_dev, xd, k=3, generator=torch.Generator().manual_seed(2))
        d = maxdiff(la, lb)
        rows.append([name, "lyapunov penalty", f"{d:.1e}", d < 1e-8])
        (g,) = torch.autograd.grad(jacobian_penalty(m_dev, xd), m_dev.weight_hh_l0, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), m_dev.weight_hh_l0)
        rows.append(
            [
                name,
                "double backward, eval mode",
                "finite" if torch.isfinite(gg).all() else "NaN",
                bool(torch.isfinite(gg).all()),
            ]
        )
    return rows


# ----------------------------------------------------------------------------- 2. routes
def routes(big: bool) -> tuple[list[list], str, str | None]:
    rows = []
    b, m, k = (64, 1024, 64) if big else (8, 128, 16)
    a = torch.randn(b, m, k, device=DEV) @ torch.diag(torch.logspace(0, -3, k, device=DEV))  # cond 1e3
    ref_q, ref_r = torch.linalg.qr(a.double())
    ref_d = torch.diagonal(ref_r, dim1=-2, dim2=-1).abs()
    times = {}
    for route in ("householder", "cholesky"):
        t = timed(lambda route=route: _linalg.qr(a, route), repeat=5)
        q, r = _linalg.qr(a, route)
        orth = float((q.mT @ q - torch.eye(k, device=DEV)).abs().max())
        drel = float((torch.diagonal(r, dim1=-2, dim2=-1).abs().double() - ref_d).abs().div(ref_d).max())
        times[route] = t
        rows.append(
            [f"QR of ({b}, {m}, {k}) float32", route, f"{t * 1e3:.2f} ms", f"|QtQ-I| {orth:.1e}, diag R rel {drel:.1e}"]
        )
    qr_best = min(times, key=times.get)
    # svdvals of actual LSTM Jacobians (D = 1024 at H = 512)
    hidden = 512 if big else 32
    n_mat = 16 if big else 8
    lstm = module("lstm", hidden, inp=16, dtype=torch.float32).to(DEV)
    x = torch.randn(n_mat, 3, 16, device=DEV)
    jac = rnnjac.jacobians(lstm, x)[:, -1].contiguous()  # (n_mat, D, D)
    ref = torch.linalg.svdvals(jac.double())
    drivers = [None, "gesvd", "gesvdj", "gesvda"] if CUDA else [None]
    svd_times = {}
    for drv in drivers:
        try:
            fn = lambda drv=drv: torch.linalg.svdvals(jac, driver=drv) if drv else torch.linalg.svdvals(jac)  # noqa: E731
            t = timed(fn, repeat=3)
            err = float(((fn().double() - ref).abs() / ref[:, :1]).max())
            svd_times[drv] = (t, err)
            rows.append(
                [
                    f"svdvals of {n_mat} LSTM J_t, D={2 * hidden}",
                    str(drv or "default"),
                    f"{t / n_mat * 1e3:.2f} ms/matrix",
                    f"max err / sigma_1 {err:.1e}",
                ]
            )
        except Exception as err:  # noqa: BLE001 - a driver may not exist for these shapes
            rows.append([f"svdvals of {n_mat} LSTM J_t", str(drv), "failed", type(err).__name__])
    t = timed(lambda: _linalg.svdvals(jac), repeat=3)
    err = float(
        (
            (torch.linalg.eigvalsh(jac.double().mT @ jac.double()).clamp_min(0).sqrt().flip(-1) - ref).abs()
            / ref[:, :1]
        ).max()
    )
    rows.append(
        [
            f"svdvals of {n_mat} LSTM J_t, D={2 * hidden}",
            "gram64: sqrt eigvalsh(J^T J) in float64 (rnnjac)",
            f"{t / n_mat * 1e3:.2f} ms/matrix",
            f"max err / sigma_1 {err:.1e}",
        ]
    )
    svd_times["gram64"] = (t, err)
    ok = {d: v for d, v in svd_times.items() if v[1] < 1e-5}
    svd_best = min(ok, key=lambda d: ok[d][0]) if ok else None
    return rows, qr_best, svd_best


# ----------------------------------------------------------------------------- 3. benchmarks
def benchmarks(big: bool, qr_best: str) -> list[list]:
    rows = []
    # (a) Jacobians + per-step singular values: LSTM H=512, B=256, T=200
    h, b, t = (512, 256, 200) if big else (32, 8, 20)
    lstm = module("lstm", h, inp=16, dtype=torch.float32).to(DEV)
    x = torch.randn(b, t, 16, device=DEV)

    def all_jacobians():
        n = 0
        for _, chunk in rnnjac.iter_jacobians(lstm, x, time_chunk=4 if big else 5):
            n += chunk.shape[1]
        return n

    tj = timed(all_jacobians, repeat=2)
    gib = b * t * (2 * h) ** 2 * 4 / 2**30
    rows.append(
        [
            f"Jacobians LSTM H={h}, B={b}, T={t} (D={2 * h}, {gib:.0f} GiB in time chunks)",
            DEV,
            f"{tj:.2f} s",
            f"{gib / tj:.0f} GiB/s of J written",
        ]
    )
    steps_sv = 2 if big else 5
    xs = x[:, :steps_sv]
    tsv = timed(lambda: rnnjac.spectra(lstm, xs, lyapunov=False), repeat=1, warmup=0)
    rows.append(
        [
            f"per-step singular values, same LSTM (timed on {steps_sv} of {t} steps)",
            DEV,
            f"{tsv / steps_sv * t:.1f} s (extrapolated to T={t})",
            f"{tsv / steps_sv:.2f} s/step, {b} matrices/step",
        ]
    )
    # (b) Lyapunov top-64: GRU H=1024, B=64, T=1000
    h, b, t, k = (1024, 64, 1000, 64) if big else (64, 4, 100, 8)
    gru = module("gru", h, inp=16, dtype=torch.float32).to(DEV)
    x = torch.randn(b, t, 16, device=DEV)
    for route in ("cholesky", "householder"):
        old = dict(_linalg.QR_ROUTE)
        _linalg.QR_ROUTE[DEV] = route
        try:
            steps = t if (route == "cholesky" or not big) else 100
            tl = timed(lambda steps=steps: rnnjac.lyapunov_spectrum(gru, x[:, :steps], k=k), repeat=1)
            rows.append(
                [
                    f"Lyapunov top-{k} GRU H={h}, B={b}, T={t}",
                    f"{DEV}, QR {route}",
                    f"{tl * t / steps:.2f} s" + ("" if steps == t else f" (timed on {steps} steps)"),
                    f"{tl / steps * 1e3:.2f} ms/step",
                ]
            )
        finally:
            _linalg.QR_ROUTE.clear()
            _linalg.QR_ROUTE.update(old)
    gru_cpu = module("gru", h, inp=16, dtype=torch.float32)
    steps = 20 if big else t
    tc = timed(lambda: rnnjac.lyapunov_spectrum(gru_cpu, x[:, :steps].cpu(), k=k), repeat=1, warmup=0)
    rows.append(
        [
            f"Lyapunov top-{k} GRU H={h}, B={b}, T={t}",
            f"cpu ({torch.get_num_threads()} threads)",
            f"{tc * t / steps:.1f} s (timed on {steps} steps)",
            f"{tc / steps * 1e3:.1f} ms/step",
        ]
    )
    # (c) Frobenius penalty overhead in a training step
    for arch in ("gru", "lstm"):
        m = module(arch, 128, inp=16, dtype=torch.float32).to(DEV).train()
        head = torch.nn.Linear(128, 3).to(DEV)
        opt = torch.optim.Adam([*m.parameters(), *head.parameters()], lr=1e-3)
        x = torch.randn(64, 100, 16, device=DEV)
        y = torch.randn(64, 100, 3, device=DEV)
        res = {}
        for pen in ("none", "recompute", "shared"):

            def step(pen=pen):
                out, _ = m(x)
                loss = torch.nn.functional.mse_loss(head(out), y)
                if pen == "recompute":  # the penalty runs its own cuDNN-free trajectory
                    loss = loss + 1e-3 * jacobian_penalty(m, x)
                elif pen == "shared":  # reuses the (cuDNN, train-mode) forward above
                    loss = loss + 1e-3 * jacobian_penalty(m, x, outputs=out)
                opt.zero_grad()
                loss.backward()
                opt.step()

            res[pen] = timed(step, repeat=5)
        for pen in ("recompute", "shared"):
            rows.append(
                [
                    f"training step {arch.upper()} H=128, B=64, T=100, exact Frobenius ({pen} trajectory)",
                    DEV,
                    f"{res['none'] * 1e3:.1f} ms -> {res[pen] * 1e3:.1f} ms",
                    f"{res[pen] / res['none']:.2f}x",
                ]
            )
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "figures"))
    args = ap.parse_args(argv)
    t0 = time.time()
    big = CUDA
    name = torch.cuda.get_device_name(0) if CUDA else "none (CPU smoke test)"
    say("# GPU check")
    say("")
    say(
        f"GPU: {name}; torch {torch.__version__}; CPU {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores; Python {platform.python_version()}"
    )
    if not CUDA:
        say("")
        say("**No CUDA device here: this run is a CPU smoke test on small sizes; no GPU numbers were measured.**")
    sections = []
    for title, fn in (("Correctness on the device against the CPU (float64)", correctness),):
        try:
            rows = fn()
            sections.append((title, table(rows, ["model", "check", "max difference", "ok"])))
            say(f"correctness: {sum(bool(r[3]) for r in rows)}/{len(rows)} checks ok ({time.time() - t0:.0f} s)")
        except Exception:  # noqa: BLE001 - report and carry on with the other sections
            sections.append((title, "FAILED:\n\n```\n" + traceback.format_exc() + "\n```"))
            say(traceback.format_exc())
    qr_best, svd_best = "cholesky", None
    try:
        rows, qr_best, svd_best = routes(big)
        sections.append(
            (
                "Routes for many small matrices (chosen by time among accurate ones)",
                table(rows, ["operation", "route", "time", "accuracy"])
                + f"\n\nFastest QR route: **{qr_best}**; fastest accurate svdvals driver: **{svd_best or 'default'}**.",
            )
        )
        say(f"routes done ({time.time() - t0:.0f} s): QR {qr_best}, svdvals {svd_best}")
    except Exception:  # noqa: BLE001
        sections.append(("Routes", "FAILED:\n\n```\n" + traceback.format_exc() + "\n```"))
        say(traceback.format_exc())
    _linalg.QR_ROUTE[DEV] = qr_best
    if svd_best == "gram64":
        _linalg.SVD_ROUTE[DEV] = "gram64"
    else:
        _linalg.SVD_ROUTE[DEV] = "svd"
        _linalg.SVD_DRIVER = svd_best
    try:
        rows = benchmarks(big, qr_best)
        sections.append(("Benchmarks", table(rows, ["workload", "device", "time", "note"])))
    except Exception:  # noqa: BLE001
        sections.append(("Benchmarks", "FAILED:\n\n```\n" + traceback.format_exc() + "\n```"))
        say(traceback.format_exc())
    for title, body in sections:
        say("")
        say(f"## {title}")
        say("")
        say(body)
    say("")
    say(f"Total runtime {time.time() - t0:.0f} s. Reproduce: `PYTHONPATH=. python analyses/gpu_check.py`")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "benchmark_gpu.md").write_text("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
