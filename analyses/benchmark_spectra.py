"""Benchmark: spectra with the structured J Q against the materialise-then-multiply recipe (issue 4).

1. Top-k Lyapunov exponents (k=16), GRU H=1024, B=8, T=100 (and H=256, B=16): rnnjac's factored
   ``J Q`` (one shared GEMM per weight matrix) against materialising ``J_t`` (B, D, D) every step then
   ``torch.bmm`` + ``torch.linalg.qr`` (how published research code does it).
2. Full spectrum (k = D): rnnjac's total time against the bare cost of ``torch.linalg.qr`` on the
   same (B, D, D) shapes for T steps.
3. Per-step singular values: ``rnnjac.spectra(lyapunov=False)`` against bare ``torch.linalg.svdvals``
   on (B*T, D, D) matrices.
4. T = 10,000, GRU H=128, B=8, all exponents: peak resident memory (fresh process).

Issue 18 (one thread, the two sides alternated in one run, median of 3):

5. The published algorithm (written here from its description: per step the closed-form Jacobian, h->h only
   for LSTM, ``J Q``, a Householder QR every step, ``log|diag R|`` accumulated) against rnnjac
   (``reortho_every="auto"``), RNN/GRU/LSTM, 1 and 2 layers, H=64 and 128, B=8, T=500, all exponents, float32;
   both sides' errors against the published algorithm run in float64.
6. The continuous-time rate network (N=100 and 500, Euler dt=0.1, QR every 10 steps): a NumPy loop against
   rnnjac with a closed-form ``CustomCell``.
7. Top-16 per-step singular values at H=1024 (GRU, B=8): block Krylov against full SVDs, for random recurrent
   weights (a clustered top of the spectrum) and with a rank-16 part added (a separated top); ``J`` formed once (the
   one-layer route) and factored (the stacks' route).

    python analyses/benchmark_spectra.py               # sections 5-8 (about 8 minutes on one core)
    python analyses/benchmark_spectra.py --legacy      # sections 1-4 as well
    python analyses/benchmark_spectra.py --quick       # smaller shapes (smoke test)
    python analyses/benchmark_spectra.py --sections 5 6 --hidden 64 --old   # a subset; --old also times rnnjac
                                                       # with every QR by Householder (the route before issue 18)

One thread everywhere: torch's, and NumPy's BLAS (``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS``/``MKL_NUM_THREADS``
default to 1 here, set before NumPy loads; pass them explicitly to override).

8. The default ``reortho_every=1``: rnnjac's QRs (one CholeskyQR pass where it keeps the answer) against
   Householder QRs only, RNN/GRU/LSTM H=64.

Sections not run keep their text from the previous ``figures/benchmark_spectra.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import subprocess
import sys
import time
from unittest import mock

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # before NumPy loads its BLAS
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _bench import FIGURES, machine, table, timeit, write  # noqa: E402

import rnnjac  # noqa: E402
import rnnjac._orthonormalise as orthonormalise  # noqa: E402
from rnnjac._dynamics import as_dynamics  # noqa: E402
from rnnjac._linalg import qr_positive  # noqa: E402
from rnnjac._lyapunov_qr import initial_basis  # noqa: E402


def gru(hidden, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.GRU(16, hidden, batch_first=True)
    with torch.no_grad():  # gain ~1.5: interesting, near-critical dynamics
        m.weight_hh_l0.mul_(1.5)
    return m


def materialised_lyapunov(model, x, k, gen_seed=0, method="analytic"):
    """The usual recipe: J_t materialised each step (closed form, or autograd), then bmm + QR."""
    dyn = as_dynamics(model)
    b, steps = x.shape[:2]
    d = dyn.state_size
    q0, _ = qr_positive(torch.randn(d, k, generator=torch.Generator().manual_seed(gen_seed), dtype=torch.float64))
    q = q0.float().expand(b, d, k).contiguous()
    log_sum = torch.zeros(b, k)
    s = torch.zeros(b, d)
    with torch.no_grad():
        for t in range(steps):
            j = dyn.linearize(s, x[:, t], method).materialize()  # (B, D, D)
            s = dyn.step(s, x[:, t])
            q, r = qr_positive(torch.bmm(j, q))
            log_sum += torch.log(r)
    return torch.sort(log_sum / steps, descending=True).values


def structured(model, x, k):
    return rnnjac.lyapunov_spectrum(model, x, k=k, generator=torch.Generator().manual_seed(0)).lyapunov_exponents.values


def memory_probe(steps, hidden, batch) -> dict:
    # VmHWM (peak resident set) of the fresh process itself; ru_maxrss would include the parent's
    # peak, which Linux carries across fork + exec
    code = f"""
import json, time, torch, rnnjac
def hwm():
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("VmHWM")) / 1024
torch.set_num_threads(2)
m = torch.nn.GRU(16, {hidden}, batch_first=True)
x = torch.randn({batch}, {steps}, 16)
base = hwm()
t0 = time.perf_counter()
ds = rnnjac.lyapunov_spectrum(m, x, generator=torch.Generator().manual_seed(0))
dt = time.perf_counter() - t0
print(json.dumps({{"base_mb": base, "peak_mb": hwm(), "seconds": dt}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def legacy(args, sections: list[str]) -> None:
    """Sections 1-4 (issue 4)."""
    steps = args.steps

    # 1. top-k exponents
    rows = []
    shapes = [(1024, 8), (256, 16)] if not args.quick else [(128, 4)]
    for hidden, batch in shapes:
        m = gru(hidden)
        x = torch.randn(batch, steps, 16, generator=torch.Generator().manual_seed(1))
        a = torch.from_numpy(structured(m, x, 16))
        bref = materialised_lyapunov(m, x, 16)
        assert torch.allclose(a, bref, atol=1e-3), (a, bref)
        t_s = timeit(lambda m=m, x=x: structured(m, x, 16), repeat=3)
        t_m = timeit(lambda m=m, x=x: materialised_lyapunov(m, x, 16), repeat=3)
        t_a = timeit(lambda m=m, x=x: materialised_lyapunov(m, x, 16, method="autograd"), repeat=1, warmup=0)
        rows.append(
            [
                f"GRU H={hidden}, B={batch}, T={steps}, k=16",
                f"{t_s:.3f}",
                f"{t_m:.3f}",
                f"{t_m / t_s:.1f}x",
                f"{t_a:.2f}",
                f"{t_a / t_s:.0f}x",
            ]
        )
    t1 = table(
        rows,
        [
            "case",
            "structured J Q [s]",
            "closed-form J + bmm + QR [s]",
            "speed-up",
            "autograd J + bmm + QR [s]",
            "speed-up",
        ],
    )
    print(t1)
    sections.append("## Top-k Lyapunov exponents (target >= 5x at H=1024, B=8)\n\n" + t1 + "\n")

    # 2. full spectrum vs bare QR
    rows = []
    for hidden, batch in [(256, 16), (128, 8)] if not args.quick else [(64, 4)]:
        m = gru(hidden)
        x = torch.randn(batch, steps, 16, generator=torch.Generator().manual_seed(1))
        t_full = timeit(lambda m=m, x=x: structured(m, x, None), repeat=3)
        mats = torch.randn(batch, hidden, hidden)

        def bare(mats=mats):
            for _ in range(steps):
                torch.linalg.qr(mats)

        t_qr = timeit(bare, repeat=3)
        rows.append(
            [f"GRU H={hidden}, B={batch}, T={steps}, k=D", f"{t_full:.3f}", f"{t_qr:.3f}", f"{t_full / t_qr:.2f}x"]
        )
    t2 = table(rows, ["case", "rnnjac full spectrum [s]", "bare torch.linalg.qr x T [s]", "ratio"])
    print(t2)
    sections.append("## Full spectrum against the bare QR cost (target <= 1.3x)\n\n" + t2 + "\n")

    # 3. per-step singular values vs bare svdvals
    rows = []
    for hidden, batch in [(128, 16), (256, 8)] if not args.quick else [(64, 4)]:
        m = gru(hidden)
        x = torch.randn(batch, steps, 16, generator=torch.Generator().manual_seed(1))

        def ours(m=m, x=x):
            return rnnjac.spectra(m, x, lyapunov=False)

        jac = rnnjac.jacobians(m, x).detach().reshape(-1, hidden, hidden)  # the same matrices
        t_ours = timeit(ours, repeat=3)
        t_svd = timeit(lambda jac=jac: torch.linalg.svdvals(jac), repeat=3)
        rand = torch.randn_like(jac)
        t_rand = timeit(lambda rand=rand: torch.linalg.svdvals(rand), repeat=2)
        rows.append(
            [
                f"GRU H={hidden}, B={batch}, T={steps}",
                f"{t_ours:.3f}",
                f"{t_svd:.3f}",
                f"{t_ours / t_svd:.2f}x",
                f"{t_rand:.3f}",
            ]
        )
    t3 = table(
        rows,
        [
            "case",
            "rnnjac per-step singular values [s]",
            "bare svdvals of the same J_t [s]",
            "ratio",
            "bare svdvals, Gaussian matrices [s]",
        ],
    )
    print(t3)
    sections.append("## Per-step singular values against bare svdvals (target <= 1.2x)\n\n" + t3 + "\n")

    # 4. memory over a long run
    long_steps = 10_000 if not args.quick else 500
    t0 = time.perf_counter()
    mem = memory_probe(long_steps, 128, 8)
    mem_short = memory_probe(long_steps // 10, 128, 8)
    row = [
        [
            f"GRU H=128, B=8, T={n}, all 128 exponents",
            f"{r['base_mb']:.0f}",
            f"{r['peak_mb']:.0f}",
            f"{r['peak_mb'] - r['base_mb']:.0f}",
            f"{r['seconds']:.1f}",
        ]
        for n, r in ((long_steps // 10, mem_short), (long_steps, mem))
    ]
    t4 = table(row, ["case", "RSS after import [MB]", "peak RSS [MB]", "growth [MB]", "time [s]"])
    print(t4, f"({time.perf_counter() - t0:.0f} s)")
    sections.append("## Memory of a long run (target: peak under 1 GB)\n\n" + t4 + "\n")


# ----------------------------------------------------------------------------- issue 18
def alternate(*fns, repeat: int = 3) -> tuple[float, ...]:
    """Medians of ``repeat`` timings of each of ``fns``, run in turn. A first round warms up; it counts as one of
    the ``repeat`` when the round took over 2 s (one-time costs are then negligible)."""
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeat + 1):
        for fn, out in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        if r == 0 and sum(t[0] for t in times) <= 2.0:
            times = [[] for _ in fns]
        if len(times[0]) == repeat:
            break
    return tuple(statistics.median(t) for t in times)


def householder_only(fn):
    """``fn`` with every Lyapunov QR by Householder (``rnnjac._orthonormalise.QR_METHOD``), the route before issue 18."""

    def run():
        orthonormalise.QR_METHOD = "householder"
        try:
            return fn()
        finally:
            orthonormalise.QR_METHOD = "auto"

    return run


def _w(m, name, layer):
    return getattr(m, f"{name}_l{layer}", None)


def layer_jacobians(kind: str, m, layer: int, x, h, c):
    """One layer's next ``(h, c)`` and its closed-form partial Jacobians (``hx``, ``hh`` and for LSTM ``hc``,
    ``cx``, ``ch``, ``cc``), written from the equations (PyTorch's gate order), independent of rnnjac."""
    w_ih, w_hh, b_ih, b_hh = (_w(m, n, layer) for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
    gi, gh = x @ w_ih.T + b_ih, h @ w_hh.T + b_hh

    def rows(a, w):  # diag(a) @ w, batched
        return a.unsqueeze(-1) * w

    if kind == "rnn":
        h1 = torch.tanh(gi + gh)
        d = 1 - h1 * h1
        return h1, None, {"hx": rows(d, w_ih), "hh": rows(d, w_hh)}
    if kind == "gru":
        (ir, iz, in_), (hr, hz, hn) = gi.chunk(3, -1), gh.chunk(3, -1)
        r, z = torch.sigmoid(ir + hr), torch.sigmoid(iz + hz)
        n = torch.tanh(in_ + r * hn)
        a_z, a_n = (h - n) * z * (1 - z), (1 - z) * (1 - n * n)
        a_r = a_n * hn * r * (1 - r)
        wi, wh = w_ih.chunk(3, 0), w_hh.chunk(3, 0)
        hx = rows(a_r, wi[0]) + rows(a_z, wi[1]) + rows(a_n, wi[2])
        hh = rows(a_r, wh[0]) + rows(a_z, wh[1]) + rows(a_n * r, wh[2]) + torch.diag_embed(z)
        return (1 - z) * n + z * h, None, {"hx": hx, "hh": hh}
    i, f, g, o = (gi + gh).chunk(4, -1)
    i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
    c1 = f * c + i * g
    tc = torch.tanh(c1)
    s_i, s_f, s_g, s_o, s_m = g * i * (1 - i), c * f * (1 - f), i * (1 - g * g), tc * o * (1 - o), o * (1 - tc * tc)
    wi, wh = w_ih.chunk(4, 0), w_hh.chunk(4, 0)
    cx = rows(s_i, wi[0]) + rows(s_f, wi[1]) + rows(s_g, wi[2])
    ch = rows(s_i, wh[0]) + rows(s_f, wh[1]) + rows(s_g, wh[2])
    jac = {"cx": cx, "ch": ch, "cc": torch.diag_embed(f), "hc": torch.diag_embed(s_m * f)}
    jac["hx"], jac["hh"] = rows(s_o, wi[3]) + rows(s_m, cx), rows(s_o, wh[3]) + rows(s_m, ch)
    return o * tc, c1, jac


def published_step(kind: str, m, x, hs, cs, h_only: bool):
    """One step of the whole stack: the next states and ``J_t`` (block lower triangular over the layers; for
    LSTM the h->h blocks only when ``h_only``, else the full ``[h; c]`` per layer)."""
    blocks, new_h, new_c, below, inp = [], [], [], None, x
    for layer in range(m.num_layers):
        h1, c1, jac = layer_jacobians(kind, m, layer, inp, hs[layer], None if cs is None else cs[layer])
        full = kind == "lstm" and not h_only
        own = (
            torch.cat([torch.cat([jac["hh"], jac["hc"]], -1), torch.cat([jac["ch"], jac["cc"]], -1)], -2)
            if full
            else jac["hh"]
        )
        rows_x = torch.cat([jac["hx"], jac["cx"]], -2) if full else jac["hx"]
        left = [] if below is None else [rows_x @ below]
        blocks.append(torch.cat([*left, own], -1))
        below = blocks[-1][:, : h1.shape[-1]]  # the h rows of this layer, for the layer above
        new_h.append(h1)
        new_c.append(c1)
        inp = h1
    d = sum(b.shape[-2] for b in blocks)
    j = torch.cat([torch.nn.functional.pad(b, (0, d - b.shape[-1])) for b in blocks], -2)
    return new_h, (new_c if kind == "lstm" else None), j


def published_lyapunov(kind: str, m, x, h_only: bool = True):
    """The published algorithm: per step closed-form J, ``Q <- J Q``, Householder QR, ``log|diag R|``."""
    b, steps = x.shape[:2]
    hs = [x.new_zeros(b, m.hidden_size) for _ in range(m.num_layers)]
    cs = [x.new_zeros(b, m.hidden_size) for _ in range(m.num_layers)] if kind == "lstm" else None
    d = m.num_layers * m.hidden_size * (2 if kind == "lstm" and not h_only else 1)
    q = initial_basis(d, d, torch.Generator().manual_seed(0), x.dtype, batch=b)
    log_sum = x.new_zeros(b, d)
    with torch.no_grad():
        for t in range(steps):
            hs, cs, j = published_step(kind, m, x[:, t], hs, cs, h_only)
            q, r = torch.linalg.qr(torch.bmm(j, q))
            log_sum += torch.log(torch.diagonal(r, dim1=-2, dim2=-1).abs())
    return torch.sort(log_sum / steps, descending=True).values


def rnnjac_lyapunov(m, x, state="full", reortho_every="auto"):
    ds = rnnjac.lyapunov_spectrum(
        m, x, state=state, reortho_every=reortho_every, ci=None, generator=torch.Generator().manual_seed(0)
    )
    return torch.from_numpy(ds.lyapunov_exponents.values)


def published_section(args) -> str:
    """Section 5: rnnjac (reortho_every="auto") against the published algorithm, one row per model."""
    steps, hiddens = (500, tuple(args.hidden)) if not args.quick else (60, (16,))
    cases = [(k, n, hid, True) for k in ("rnn", "gru", "lstm") for n in (1, 2) for hid in hiddens]
    cases += [("lstm", n, hiddens[0], False) for n in (1, 2)]  # rnnjac's full [h; c] state
    rows = []
    for kind, layers, hid, h_only in cases:
        torch.manual_seed(0)
        m = getattr(torch.nn, kind.upper())(16, hid, num_layers=layers, batch_first=True)
        x = torch.randn(8, steps, 16, generator=torch.Generator().manual_seed(1))
        state = "h" if kind == "lstm" and h_only else "full"
        j_ref = published_step(
            kind, m, x[:, 0], [x.new_zeros(8, hid)] * layers, [x.new_zeros(8, hid)] * layers, h_only
        )[2]
        j_ours = rnnjac.jacobians(m, x[:, :1], state=state).detach()[:, 0]
        assert torch.allclose(j_ref, j_ours, atol=1e-5), f"{kind}: the baseline's Jacobian is not rnnjac's"
        # accuracy against the published algorithm run in float64 (a QR every step): the float32 baseline's own
        # rounding is part of the comparison, rnnjac keeps a float32 model's dense J_t Q chain in float64
        ref = published_lyapunov(kind, copy.deepcopy(m).double(), x.double(), h_only)
        err_pub = (published_lyapunov(kind, m, x, h_only).double() - ref).abs().max().item()
        err_ours = (rnnjac_lyapunov(m, x, state).double() - ref).abs().max().item()
        fns = [lambda: published_lyapunov(kind, m, x, h_only), lambda: rnnjac_lyapunov(m, x, state)]
        times = alternate(*fns, *([householder_only(fns[1])] if args.old else []))
        t_pub, t_ours = times[:2]
        conv = "" if kind != "lstm" else (" (h only)" if h_only else " (full [h; c])")
        old = [f"{times[2]:.3f}", f"{t_pub / times[2]:.2f}x"] if args.old else []
        row = [f"{kind.upper()}{conv} {layers}L H={hid}", f"{t_pub:.3f}", f"{t_ours:.3f}", f"{t_pub / t_ours:.2f}x"]
        rows.append([*row, *old, f"{err_pub:.1e}", f"{err_ours:.1e}"])
        print(rows[-1], flush=True)
    head = [f"model (B=8, T={steps}, all exponents, float32)", "published algorithm [s]", "rnnjac [s]", "speed-up"]
    head += ["rnnjac, Householder QRs only [s]", "speed-up"] if args.old else []
    return table(rows, [*head, "published: max abs error [nats/step]", "rnnjac: max abs error"])


def rate_network(n: int, gain: float = 2.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    w = gain * rng.standard_normal((n, n)) / math.sqrt(n)
    np.fill_diagonal(w, 0)
    return w, rng.standard_normal(n)


def numpy_rate(w, h0, steps: int, dt: float = 0.1, every: int = 10):
    """The NumPy loop of the issue: ``h <- (1-dt) h + dt W tanh(h)``, ``D_t Q``, QR every ``every`` steps
    (``D_t`` formed as the CustomCell below forms it: ``dt W`` scaled by columns, ``1 - dt`` added to the diagonal)."""
    n = len(h0)
    h, q, log_sum = h0.copy(), np.linalg.qr(np.random.default_rng(1).standard_normal((n, n)))[0], np.zeros(n)
    dtw, diag = dt * w, np.arange(n)
    for t in range(1, steps + 1):
        th = np.tanh(h)
        d = dtw * (1 - th * th)[None, :]
        d[diag, diag] += 1 - dt
        h = (1 - dt) * h + dtw @ th
        q = d @ q
        if t % every == 0 or t == steps:
            q, r = np.linalg.qr(q)
            log_sum += np.log(np.abs(np.diag(r)))
    return np.sort(log_sum / steps)[::-1]


def rnnjac_rate(w, h0, steps: int, dt: float = 0.1, every: int | str = 10):
    dtw = torch.from_numpy(dt * w)

    def step(s, x):
        return torch.addmm(s, torch.tanh(s), dtw.T, beta=1 - dt)  # (1 - dt) s + dt W tanh(s), batched

    def jacobian(s, x):
        th = torch.tanh(s)
        jac = dtw * (1 - th * th)[:, None, :]
        jac.diagonal(dim1=-2, dim2=-1).add_(1 - dt)
        return jac

    cell = rnnjac.CustomCell(step, jacobian, name="rate")
    xs = torch.zeros(1, steps, 1, dtype=torch.float64)
    ds = rnnjac.lyapunov_spectrum(
        cell, xs, torch.from_numpy(h0)[None], reortho_every=every, ci=None, generator=torch.Generator().manual_seed(1)
    )
    return ds.lyapunov_exponents.values[0]


def rate_section(args) -> str:
    """Section 6: the rate network, a NumPy loop against rnnjac with a closed-form CustomCell."""
    rows = []
    for n, steps in ((100, 10_000), (500, 1_000)) if not args.quick else ((50, 500),):
        w, h0 = rate_network(n)
        ref = numpy_rate(w, h0, steps)
        err = max(abs(ref[0] - rnnjac_rate(w, h0, steps, every=e)[0]) for e in (10, "auto"))
        fns = [lambda: numpy_rate(w, h0, steps), lambda: rnnjac_rate(w, h0, steps)]
        fns += [lambda: rnnjac_rate(w, h0, steps, every="auto")]
        times = alternate(*fns, *([householder_only(fns[1])] if args.old else []))
        row = [f"N={n}, {steps} steps, all exponents, float64", f"{times[0]:.3f}"]
        row += [f"{t:.3f} ({times[0] / t:.2f}x)" for t in times[1:]]
        rows.append([*row, f"{err:.1e}"])
        print(rows[-1], flush=True)
    head = ["rate network (dt=0.1)", "NumPy loop, QR every 10 steps [s]", "rnnjac CustomCell, every 10 (speed-up)"]
    head += ['rnnjac, reortho_every="auto"']
    head += ["rnnjac every 10, Householder QRs only"] if args.old else []
    return table(rows, [*head, "abs difference of lambda_1 (other initial basis)"])


def _low_rank_gru(hidden, scale, rank=16, seed=0):
    """The random GRU of :func:`gru` with a rank-``rank`` part ``scale * U V`` added to its recurrent weights (``U``,
    ``V`` standard normal): the top ``rank`` singular values of ``J`` stand apart from the rest, as in structured
    (e.g. trained) weights, against the clustered top of random ones."""
    m = gru(hidden, seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight_hh_l0.add_(torch.randn(3 * hidden, rank, generator=g) @ torch.randn(rank, hidden, generator=g) * scale)
    return m


def topk_section(args) -> str:
    """Section 7: top-16 per-step singular values by block Krylov against full per-step SVDs; the Krylov products
    with ``J`` formed once (the route for one layer) and with the factored ``J`` (the route for stacks), same
    rounds."""
    from rnnjac._linearization import FactoredLinearization  # noqa: PLC0415

    hidden, steps = (1024, 2) if not args.quick else (256, 2)
    x = torch.randn(8, steps, 16, generator=torch.Generator().manual_seed(1))
    rows = []
    models = [("random weights (gain 1.5)", gru(hidden))]
    models += [(f"the same + rank-16 part x{scale}", _low_rank_gru(hidden, scale)) for scale in (0.01, 0.04)]
    for label, m in models:

        def top(m=m):
            return rnnjac.spectra(m, x, singular_values=16, lyapunov=False)

        def full(m=m):
            return rnnjac.spectra(m, x, lyapunov=False)

        def factored(m=m):  # the stacks' route, forced for comparison
            with mock.patch.object(FactoredLinearization, "forms_cheaply", False):
                return top(m)

        want = full().singular_values.values
        err = (top().singular_values.values / want[..., :16] - 1).__abs__().max()
        gap = float(np.median(want[..., 16] / want[..., 15]))
        t_top, t_fac, t_full = alternate(top, factored, full)
        rows.append(
            [f"GRU H={hidden}, B=8, T={steps}, {label}", f"{gap:.2f}", f"{t_full:.3f}", f"{t_top:.3f}",
             f"{t_full / t_top:.1f}x", f"{t_fac:.3f} ({t_full / t_fac:.1f}x)", f"{err:.1e}"]
        )  # fmt: skip
        print(rows[-1], flush=True)
    head = ["case", "sigma_17 / sigma_16", "full per-step SVD [s]", "top-16, J formed (one layer) [s]", "speed-up"]
    return table(rows, [*head, "top-16, factored J [s] (speed-up)", "max relative difference"])


def cholesky_section(args) -> str:
    """Section 8: the default ``reortho_every=1`` (a QR every step), CholeskyQR where it keeps the answer against
    Householder QRs only (the route before issue 18), one row per model (B=8, T=500, all exponents, float32)."""
    steps, hid = (500, args.hidden[0]) if not args.quick else (60, 16)
    rows = []
    for kind, layers in (("rnn", 1), ("gru", 1), ("gru", 2), ("lstm", 1)):
        torch.manual_seed(0)
        m = getattr(torch.nn, kind.upper())(16, hid, num_layers=layers, batch_first=True)
        x = torch.randn(8, steps, 16, generator=torch.Generator().manual_seed(1))
        state = "h" if kind == "lstm" else "full"

        def ours(m=m, x=x, state=state):
            return rnnjac_lyapunov(m, x, state, reortho_every=1)

        diff = (ours() - householder_only(ours)()).abs().max().item()
        t_new, t_old = alternate(ours, householder_only(ours))
        name = f"{kind.upper()}{' (h only)' if kind == 'lstm' else ''} {layers}L H={hid}"
        rows.append([name, f"{t_old:.3f}", f"{t_new:.3f}", f"{t_old / t_new:.2f}x", f"{diff:.1e}"])
        print(rows[-1], flush=True)
    head = [f"model (B=8, T={steps}, reortho_every=1, float32)", "Householder QRs only [s]", "rnnjac now [s]"]
    return table(rows, [*head, "speed-up", "max abs difference of the exponents"])


def merged(previous: str, new: dict[str, str]) -> str:
    """``previous`` markdown with its ``## `` sections replaced by ``new`` (title -> body); new titles appended."""
    parts, order = {}, []
    for chunk in previous.split("\n## ")[1:]:
        title, _, body = chunk.partition("\n")
        body = body.split("\nReproduce: ")[0]  # the old footer
        parts[title], order = body.strip("\n") + "\n", order + [title]
    for title, body in new.items():
        order += [] if title in parts else [title]
        parts[title] = body
    return "\n".join(f"## {t}\n\n{parts[t].strip()}\n" for t in order)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100, help="T of sections 1-3")
    ap.add_argument("--quick", action="store_true", help="smaller shapes (smoke test)")
    ap.add_argument("--legacy", action="store_true", help="run sections 1-4 (issue 4) as well")
    ap.add_argument("--hidden", type=int, nargs="+", default=[64, 128], help="H of section 5")
    ap.add_argument("--sections", type=int, nargs="+", default=[5, 6, 7, 8], choices=[5, 6, 7, 8], help="which of 5-8")
    ap.add_argument("--old", action="store_true", help="also time rnnjac with Householder QRs only (sections 5-6)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    new: dict[str, str] = {}
    if args.legacy:
        old: list[str] = []
        legacy(args, old)
        for text in old:
            title, _, body = text.removeprefix("## ").partition("\n")
            new[title] = body
    path = FIGURES / "benchmark_spectra.md"
    previous = path.read_text() if path.exists() and not args.quick else ""
    head = (
        f"# Spectra benchmarks\n\nMachine: {machine()}; one thread, shared machine (noisy). Sections not rerun "
        "(sections 1-4 without --legacy) keep the text of the earlier run that measured them (2 threads).\n\n"
    )
    tail = "\nReproduce: `python analyses/benchmark_spectra.py [--legacy] [--hidden 64 128] [--sections 5 6 7 8] [--old]`\n"
    name = "benchmark_spectra.md" if not args.quick else "benchmark_spectra_quick.md"
    t0 = time.perf_counter()
    for number, title, section in (
        (5, "Against the published algorithm (issue 18, target >= 3x)", published_section),
        (6, "Rate network against a NumPy loop (issue 18, target >= 2x)", rate_section),
        (7, "Top-16 per-step singular values, H=1024 (issue 18, target >= 10x, 1e-5)", topk_section),
        (8, "The default reortho_every=1: CholeskyQR where it keeps the answer (issue 18)", cholesky_section),
    ):
        if number not in args.sections:
            continue
        new[title] = section(args)
        write(
            name, head + merged(previous.replace(tail, ""), new) + tail
        )  # after each section: a partial run keeps what it measured
    print(f"sections {args.sections}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
