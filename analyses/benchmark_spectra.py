"""Benchmark: spectra with the structured J Q against the materialise-then-multiply recipe (issue 4).

1. Top-k Lyapunov exponents (k=16), GRU H=1024, B=8, T=100 (and H=256, B=16): rnnjac's factored
   ``J Q`` (one shared GEMM per weight matrix) against materialising ``J_t`` (B, D, D) every step then
   ``torch.bmm`` + ``torch.linalg.qr`` (how published research code does it).
2. Full spectrum (k = D): rnnjac's total time against the bare cost of ``torch.linalg.qr`` on the
   same (B, D, D) shapes for T steps.
3. Per-step singular values: ``rnnjac.spectra(lyapunov=False)`` against bare ``torch.linalg.svdvals``
   on (B*T, D, D) matrices.
4. T = 10,000, GRU H=128, B=8, all exponents: peak resident memory (fresh process).

    python analyses/benchmark_spectra.py      # prints the tables, writes figures/benchmark_spectra.md
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from _bench import machine, table, timeit, write

import rnnjac
from rnnjac._dynamics import as_dynamics
from rnnjac._linalg import qr_positive


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


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--quick", action="store_true", help="smaller shapes (smoke test)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    steps = args.steps
    sections = [f"# Spectra benchmarks\n\nMachine: {machine()}\n"]

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
    sections.append("Reproduce: `python analyses/benchmark_spectra.py`\n")
    write("benchmark_spectra.md", "\n".join(sections))


if __name__ == "__main__":
    main()
