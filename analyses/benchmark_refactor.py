"""Benchmark: the same public operations before and after the refactor of issue 12, side by side.

Three long-lived worker processes, each importing ``rnnjac`` from its own tree: "old" (the
pre-refactor package, commit ``0d2db62``, extracted to ``--before``), "new" (``--after``, default this
repository's working tree) and "old-again" (the old tree a second time, so the table shows what
run-to-run noise looks like on this shared machine next to the new/old ratio). Every worker pins one
thread (``OMP_NUM_THREADS=1``, ``torch.set_num_threads(1)``) and checks that every ``rnnjac`` module it
loaded lives under its tree. Per operation: one warm-up call in each worker, then 7-21 rounds of one
timed call per worker in rotating order (so load from other processes hits all three alike); medians.

Only public names that exist in both trees are used (``rnnjac.jacobians``, ``rnnjac.spectra``,
``rnnjac.lyapunov_spectrum``, ``rnnjac.verify``, ``rnnjac.regularizers.*``, ``rnnjac.CustomCell``).
Each call also returns checksums of its result, so the table says whether old and new agree.

    git archive 0d2db62 | tar -x -C /tmp/rnnjac_before        # once, from the repository root
    python analyses/benchmark_refactor.py                      # writes figures/benchmark_refactor.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import ROOT, table, write

OLD_COMMIT = "0d2db62"

# The worker runs inside ``python -c``: it announces itself ("READY {...}"), then answers one JSON request per
# stdin line ({"op": "run", "case": name} or {"op": "modules"}) with one "RESULT {...}" line.
WORKER = r'''
import json, math, sys, time
import torch
torch.set_num_threads(1)
import rnnjac
from rnnjac.regularizers import jacobian_penalty, lyapunov_penalty


def gru(h, gain=1.5, seed=0):
    torch.manual_seed(seed)
    m = torch.nn.GRU(16, h, batch_first=True)
    with torch.no_grad():
        m.weight_hh_l0.mul_(gain)
    return m


def lstm(h, seed=0):
    torch.manual_seed(seed)
    return torch.nn.LSTM(16, h, batch_first=True)


def inputs(b, t, i=16, seed=1):
    return torch.randn(b, t, i, generator=torch.Generator().manual_seed(seed))


def gen():
    return torch.Generator().manual_seed(0)


def ds_sums(ds):
    """Sum of the finite values and count of the non-finite ones, per float variable."""
    out = {}
    for k, v in ds.data_vars.items():
        if v.dtype.kind in "fc":
            a = torch.as_tensor(v.values).to(torch.complex128 if v.dtype.kind == "c" else torch.float64)
            fin = torch.isfinite(a)
            out[k] = float(a[fin].abs().sum())
            out[k + " non-finite"] = float((~fin).sum())
    return out


def case_jacobians():
    m, x = lstm(128), inputs(32, 50)
    return lambda: {"J": float(rnnjac.jacobians(m, x, method="analytic").double().sum())}


def case_lyap_full():
    m, x = gru(128), inputs(8, 200)
    return lambda: ds_sums(rnnjac.lyapunov_spectrum(m, x, generator=gen()))


def case_lyap_top16():
    m, x = gru(256), inputs(8, 100)
    return lambda: ds_sums(rnnjac.lyapunov_spectrum(m, x, k=16, generator=gen()))


def case_svd():
    m, x = gru(64), inputs(8, 100)
    return lambda: ds_sums(rnnjac.spectra(m, x, singular_values=True, lyapunov=False))


def case_end_to_end():
    torch.manual_seed(0)
    m = torch.nn.RNN(8, 32, batch_first=True)
    with torch.no_grad():
        m.weight_hh_l0.mul_(0.5)  # contracting
    x = inputs(4, 100, 8)
    return lambda: ds_sums(rnnjac.spectra(m, x, singular_values=False, lyapunov=False, end_to_end=True))


def case_verify():
    m, x = gru(32), inputs(2, 20)
    return lambda: ds_sums(rnnjac.verify(m, x, generator=gen()))


def penalty_case(model):
    x = inputs(64, 100)

    def run():
        model.zero_grad(set_to_none=True)
        p = jacobian_penalty(model, x, kind="frobenius", estimator="exact")
        p.backward()
        return {"value": float(p), "grad": float(sum(g.grad.double().abs().sum() for g in model.parameters()))}

    return run


def case_lyap_penalty():
    m, x = gru(64), inputs(16, 50)

    def run():
        m.zero_grad(set_to_none=True)
        p = lyapunov_penalty(m, x, k=8, generator=gen())
        p.backward()
        return {"value": float(p), "grad": float(sum(g.grad.double().abs().sum() for g in m.parameters()))}

    return run


def case_custom():
    n, a = 100, 0.1
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, n, generator=g) * (1.5 / math.sqrt(n))
    u = torch.randn(n, 1, generator=g)

    def step(s, x):
        return (1 - a) * s + a * (torch.tanh(s) @ w.T + x @ u.T)

    def jac(s, x):
        eye = torch.eye(n, dtype=s.dtype, device=s.device)
        return (1 - a) * eye + a * w * (1 - torch.tanh(s) ** 2)[:, None, :]

    cell = rnnjac.CustomCell(step, jac, name="rate", parameters=[w, u])
    x = inputs(4, 1000, 1)
    h0 = torch.zeros(4, n)
    return lambda: ds_sums(rnnjac.lyapunov_spectrum(cell, x, h0, generator=gen()))


CASES = {
    "jacobians": case_jacobians,
    "lyap_full": case_lyap_full,
    "lyap_top16": case_lyap_top16,
    "svd": case_svd,
    "end_to_end": case_end_to_end,
    "verify": case_verify,
    "pen_gru": lambda: penalty_case(gru(128, gain=1.0)),
    "pen_lstm": lambda: penalty_case(lstm(128)),
    "lyap_pen": case_lyap_penalty,
    "custom": case_custom,
}

cache = {}
print("READY " + json.dumps({"file": rnnjac.__file__, "torch": torch.__version__}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "modules":
        files = sorted({getattr(m, "__file__", None) or "" for k, m in sys.modules.items()
                        if k == "rnnjac" or k.startswith("rnnjac.")})
        print("RESULT " + json.dumps({"modules": files}), flush=True)
        continue
    name, res = cmd["case"], {}
    try:  # the tree may be mid-edit: report the error and go on
        if name not in cache:
            cache[name] = CASES[name]()
        t0 = time.perf_counter()
        res["check"] = cache[name]()
        res["time"] = time.perf_counter() - t0
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {e}"[:300]
    print("RESULT " + json.dumps(res), flush=True)
'''

# (key, label) in table order
LABELS = {
    "jacobians": "jacobians, LSTM H=128, B=32, T=50 (analytic)",
    "lyap_full": "lyapunov_spectrum, GRU H=128, B=8, T=200, all 128",
    "lyap_top16": "lyapunov_spectrum, GRU H=256, B=8, T=100, k=16 (factored)",
    "svd": "spectra, singular values only, GRU H=64, B=8, T=100",
    "end_to_end": "spectra, end_to_end only, RNN H=32 (contracting), B=4, T=100",
    "verify": "verify, GRU H=32, B=2, T=20",
    "pen_gru": "jacobian_penalty frobenius exact, value+backward, GRU H=128, B=64, T=100",
    "pen_lstm": "jacobian_penalty frobenius exact, value+backward, LSTM H=128, B=64, T=100",
    "lyap_pen": "lyapunov_penalty k=8, value+backward, GRU H=64, B=16, T=50",
    "custom": "lyapunov_spectrum, CustomCell (closed form) rate net N=100, B=4, T=1000",
}


class Worker:
    """A long-lived worker process on one tree; runs one operation per request."""

    def __init__(self, tree: Path, log: Path):
        env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.tree, self.log = tree, log
        self.log_file = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log_file,
            text=True,
            bufsize=1,
        )
        self.error = None
        self.info = self._read("READY ")

    def _read(self, prefix: str) -> dict | None:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return json.loads(line[len(prefix) :])
        code = self.proc.wait()
        self.log_file.flush()
        last = (self.log.read_text().strip().splitlines() or ["no stderr"])[-1][:300]
        self.error = f"worker on {self.tree} exited with code {code}: {last} (log: {self.log})"
        return None

    def ask(self, **cmd) -> dict:
        if self.error:
            return {"error": self.error}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read("RESULT ") or {"error": self.error}

    def check_modules(self) -> None:
        files = self.ask(op="modules").get("modules", [])
        outside = [f for f in files if not Path(f).resolve().is_relative_to(self.tree.resolve())]
        if outside:
            raise RuntimeError(f"worker for {self.tree} imported rnnjac modules from elsewhere: {outside}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        self.log_file.close()


def measure(workers: dict[str, Worker], case: str, budget_s: float) -> dict[str, dict]:
    """Warm-up call on each worker, then timed calls alternating between the workers in rotating order."""
    out = {v: {"times": [], "check": None, "error": None} for v in workers}
    first = []
    for v, w in workers.items():
        r = w.ask(op="run", case=case)
        out[v]["check"], out[v]["error"] = r.get("check"), r.get("error")
        first += [r["time"]] if "time" in r else []
    reps = max(7, min(21, round(budget_s / max(first, default=1.0))))
    order = list(workers)
    for i in range(reps):
        for v in order[i % len(order) :] + order[: i % len(order)]:
            if out[v]["error"]:
                continue
            r = workers[v].ask(op="run", case=case)
            if "time" in r:
                out[v]["times"].append(r["time"])
            else:
                out[v]["error"] = r["error"]
    return out


def max_rel_diff(a: dict, b: dict) -> tuple[float, str] | None:
    """Largest relative difference over the checksums both results have, and its key."""
    worst = None
    for k in sorted(set(a) & set(b)):
        x, y = a[k], b[k]
        d = 0.0 if x == y else abs(x - y) / max(abs(x), abs(y), 1e-300)
        if worst is None or d > worst[0]:
            worst = (d, k)
    return worst


def fmt_ratio(num: float | None, den: float | None) -> str:
    return "error" if num is None or den is None else f"{num / den:.3f}"


def ratio_ci(new: list[float], old: list[float], n_boot: int = 2000) -> tuple[float, float]:
    """95% bootstrap interval of median(new) / median(old), resampling each list."""
    rng = random.Random(0)
    ratios = sorted(
        statistics.median(rng.choices(new, k=len(new))) / statistics.median(rng.choices(old, k=len(old)))
        for _ in range(n_boot)
    )
    return ratios[int(0.025 * n_boot)], ratios[int(0.975 * n_boot) - 1]


def verdict(new_old: float, again_old: float, ci: tuple[float, float]) -> str:
    """Slower/faster only when the ratio is beyond 5% and twice the old-again distance, and its 95% CI excludes 1."""
    noise = max(0.05, 2 * abs(again_old - 1))
    if new_old > 1 + noise and ci[0] > 1:
        return f"slower (+{(new_old - 1) * 100:.0f}%)"
    if new_old < 1 - noise and ci[1] < 1:
        return f"faster ({(new_old - 1) * 100:.0f}%)"
    return "within noise"


def summarise(results: dict[str, dict[str, dict]]) -> tuple[list[list], list[str]]:
    rows, notes = [], []
    for c, res in results.items():
        med = {v: statistics.median(r["times"]) if r["times"] and not r["error"] else None for v, r in res.items()}
        ok = None not in (med["old"], med["new"], med["old-again"])
        ci = ratio_ci(res["new"]["times"], res["old"]["times"]) if ok else None
        checks = {v: r["check"] for v, r in res.items()}
        diff = max_rel_diff(checks["old"], checks["new"]) if checks["old"] and checks["new"] else None
        if diff and diff[0] > 1e-6:
            notes.append(
                f"- {LABELS[c]}: results differ, largest in `{diff[1]}` (old {checks['old'][diff[1]]:.6g}, "
                f"new {checks['new'][diff[1]]:.6g})"
            )
        only = sorted(set(checks["old"] or {}) ^ set(checks["new"] or {}))
        if checks["old"] and checks["new"] and only:
            notes.append(f"- {LABELS[c]}: outputs present in one tree only: {', '.join(only)}")
        rows.append(
            [
                LABELS[c],
                "error" if med["old"] is None else f"{med['old'] * 1e3:.1f}",
                "error" if med["new"] is None else f"{med['new'] * 1e3:.1f}",
                fmt_ratio(med["new"], med["old"]),
                fmt_ratio(med["old-again"], med["old"]),
                "-" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}",
                "-" if diff is None else f"{diff[0]:.1e}",
                verdict(med["new"] / med["old"], med["old-again"] / med["old"], ci) if ok else "error",
            ]
        )
        notes += [f"- {LABELS[c]}, {v}: {r['error']}" for v, r in res.items() if r["error"]]
    return rows, notes


def header(after: Path, old_label: str) -> str:
    cpu = platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    git = ["git", "-C", str(after)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "rnnjac"], capture_output=True, text=True).stdout
    import torch  # only for its version string; the parent runs no torch work

    return (
        f"Machine: {cpu}, {os.cpu_count()} cores (shared); 1 thread per worker (OMP_NUM_THREADS=1, "
        f"torch.set_num_threads(1)); torch {torch.__version__}; Python {platform.python_version()}; "
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n\n"
        f"old = commit {old_label} (before the refactor); new = working tree at {head or '?'}"
        f"{' with uncommitted changes in rnnjac/' if dirty.strip() else ''}. "
        "One long-lived process per variant (old, new, old-again); per operation one warm-up call in each, then "
        "7-21 rounds of one timed call per variant in rotating order; times are medians of the timed calls."
    )


def run_all(trees: dict[str, Path], cases: list[str], budget_s: float, log_dir: Path) -> dict:
    results = {}
    workers = {v: Worker(t, log_dir / f"benchmark_refactor_{v}.log") for v, t in trees.items()}
    try:
        for v, w in workers.items():
            print(f"{v}: rnnjac from {w.info['file'] if w.info else w.error}", flush=True)
        for c in cases:
            t0 = time.perf_counter()
            results[c] = measure(workers, c, budget_s)
            med = {
                v: f"{statistics.median(r['times']) * 1e3:.1f}" if r["times"] else r["error"]
                for v, r in results[c].items()
            }
            print(f"{c} ({time.perf_counter() - t0:.0f} s): {med}", flush=True)
        for w in workers.values():
            if not w.error:
                w.check_modules()
    finally:
        for w in workers.values():
            w.close()
    return results


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--before", type=Path, default=Path("/tmp/rnnjac_before"), help=f"tree of commit {OLD_COMMIT}")
    ap.add_argument("--old-label", default=OLD_COMMIT, help="what the old tree is, for the header")
    ap.add_argument("--after", type=Path, default=ROOT, help="tree of the refactored package")
    ap.add_argument("--budget", type=float, default=5.0, help="target seconds of timed calls per operation, variant")
    ap.add_argument("--cases", nargs="*", default=list(LABELS), choices=list(LABELS))
    ap.add_argument("--output", default="benchmark_refactor.md", help="file name under figures/")
    args = ap.parse_args(argv)
    if not (args.before / "rnnjac" / "__init__.py").is_file():
        sys.exit(f"no package at {args.before}: run `git archive {OLD_COMMIT} | tar -x -C {args.before}` first")
    trees = {"old": args.before, "new": args.after, "old-again": args.before}
    t_start = time.perf_counter()
    results = run_all(trees, args.cases, args.budget, Path(tempfile.gettempdir()))
    rows, notes = summarise(results)
    headers = [
        "operation",
        "old [ms]",
        "new [ms]",
        "new/old",
        "old-again/old",
        "new/old 95% CI",
        "result rel. diff",
        "reading",
    ]
    text = table(rows, headers)
    print(text)
    body = (
        f"# Refactor benchmark: the same public operations before ({args.old_label}) and after\n\n"
        f"{header(args.after, args.old_label)}\n\n{text}\n\n"
        '"old-again/old" is the old tree measured a second time in its own process: its distance from 1 is the '
        'run-to-run noise; "new/old 95% CI" is a bootstrap interval of the ratio of medians. "reading" calls an '
        "operation slower (faster) only when new/old is beyond max(5%, 2 |old-again/old - 1|) and its interval "
        'excludes 1. "result rel. diff": largest relative difference between '
        "old and new of the per-output sums of finite |values| and counts of non-finite values (0 = identical).\n\n"
        f"Total wall time {time.perf_counter() - t_start:.0f} s.\n"
    )
    if notes:
        body += "\nNotes (errors, result differences):\n\n" + "\n".join(notes) + "\n"
    body += (
        f"\nReproduce: `git archive {OLD_COMMIT} | tar -x -C /tmp/rnnjac_before && "
        "python analyses/benchmark_refactor.py`\n"
    )
    write(args.output, body)


if __name__ == "__main__":
    main()
