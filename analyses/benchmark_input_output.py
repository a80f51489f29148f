"""Benchmark: the input-to-output Jacobian penalty against Python loops and ``vmap(jacrev)`` (issue 16).

LSTM (I=8, H=128) with a linear readout (O=8), B=32, T=50, float32, one thread: ``fn(x) = readout(lstm(x))``
maps ``(32, 50, 8)`` to ``(32, 50, 8)``, so each sample has 400 inputs and 400 outputs. Every method computes
the batch mean of the per-sample ``||dy_b/dx_b||_F^2`` (or its projection estimate) *and* backpropagates it to
the model's parameters, as a training step would.

- ``input_output_penalty``: projection (n_proj=1), with and without the batch-independence check, and exact;
- per-sample loop, *the same estimate*: the same random unit vectors ``v_b``, one ``autograd.grad(y_b . v_b, x,
  create_graph=True)`` per sample (B=32 backward passes through the batched graph): equal to the projection
  value to rounding (checked);
- the forum's loop over output basis vectors: one ``autograd.grad(y[:, k].sum(), x, create_graph=True)`` per
  output entry k (400 passes): the exact norm (checked against the exact methods);
- ``torch.func.vmap(torch.func.jacrev(fn_single))``: exact (``fn_single`` passes an explicit zero ``(h0, c0)``:
  nn.LSTM's own default initial state does not work under vmap).

Times: the projection methods alternate in one process, median of 3 rounds after a warm-up run each; the
exact methods take tens of seconds and gigabytes each, so each is timed once, in its own fresh process.
Memory: peak resident-set growth over the model-and-data baseline, each method once in its own subprocess
(Linux ``VmHWM`` after resetting it).

    python analyses/benchmark_input_output.py   # writes figures/benchmark_input_output.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _bench import machine, table, write
from torch import nn

from rnnjac._input_output import input_output_penalty

B, T, N_IN, H, N_OUT = 32, 50, 8, 128, 8


class LstmReadout(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(N_IN, H, batch_first=True)
        self.readout = nn.Linear(H, N_OUT)

    def forward(self, x):
        zeros = x.new_zeros(1, x.shape[0], H)  # explicit initial state: works under vmap too
        return self.readout(self.lstm(x, (zeros, zeros))[0])


def setup():
    torch.manual_seed(0)
    return LstmReadout(), torch.randn(B, T, N_IN)


def _unit(seed: int, like: torch.Tensor) -> torch.Tensor:
    """The projections input_output_penalty draws with this seed (n_proj=1): (B, *per-sample shape)."""
    v = torch.randn(1, B, like[0].numel(), generator=torch.Generator().manual_seed(seed))
    return (v / v.norm(dim=-1, keepdim=True))[0].reshape(like.shape)


def per_sample_loop(model, x, seed=0):
    x = x.detach().requires_grad_(True)
    y = model(x)
    v, o = _unit(seed, y), y[0].numel()
    est = []
    for b in range(B):
        (g,) = torch.autograd.grad((y[b] * v[b]).sum(), x, create_graph=True)
        est.append(o * g[b].pow(2).sum())
    return torch.stack(est).mean()


def basis_loop(model, x):
    x = x.detach().requires_grad_(True)
    y = model(x).reshape(B, -1)
    total = 0
    for k in range(y.shape[1]):
        (g,) = torch.autograd.grad(y[:, k].sum(), x, create_graph=True)
        total = total + g.pow(2).reshape(B, -1).sum(1)
    return total.mean()


def vmap_jacrev(model, x):
    def single(xb):
        return model(xb[None])[0]

    return torch.func.vmap(torch.func.jacrev(single))(x).pow(2).reshape(B, -1).sum(1).mean()


PROJECTION = {
    "input_output_penalty, projection (n_proj=1)": lambda m, x: input_output_penalty(
        m, x, generator=torch.Generator().manual_seed(0)
    ),
    "input_output_penalty, projection, check_independence=False": lambda m, x: input_output_penalty(
        m, x, generator=torch.Generator().manual_seed(0), check_independence=False
    ),
    "per-sample loop, same projection estimate (32 grads)": per_sample_loop,
}
EXACT = {
    "input_output_penalty, exact": lambda m, x: input_output_penalty(m, x, estimator="exact"),
    "forum loop over output basis vectors, exact (400 grads)": basis_loop,
    "vmap(jacrev), exact": vmap_jacrev,
}
METHODS = {**PROJECTION, **EXACT}
OURS, LOOP_SAME, LOOP_BASIS = list(PROJECTION)[0], list(PROJECTION)[2], list(EXACT)[1]


def run_once(name, model, x):
    """Value and backward to the parameters (grads zeroed first); returns (value, seconds)."""
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    value = METHODS[name](model, x)
    value.backward()
    return float(value.detach()), time.perf_counter() - t0


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith(field + ":"))


def child(name: str) -> None:
    """One run in a fresh process: value, seconds, peak resident-set growth over the model-and-data baseline."""
    torch.set_num_threads(1)
    model, x = setup()
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current resident set
    value, seconds = run_once(name, model, x)
    print(json.dumps({"value": value, "seconds": seconds, "peak_mib": (_status_kib("VmHWM") - base) / 1024}))


def in_subprocess(name: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", name], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def timed_rounds(rounds: int) -> tuple[dict, dict]:
    """Projection methods: a warm-up run each, then ``rounds`` rounds alternating them; medians."""
    torch.set_num_threads(1)
    model, x = setup()
    values, times = {}, {name: [] for name in PROJECTION}
    for name in PROJECTION:
        run_once(name, model, x)
    for r in range(rounds):
        for name in PROJECTION:
            values[name], seconds = run_once(name, model, x)
            times[name].append(seconds)
            print(f"round {r + 1}: {name}: {seconds:.3f} s (value {values[name]:.6g})", flush=True)
    return values, {name: statistics.median(ts) for name, ts in times.items()}


def check_values(values: dict) -> None:
    proj, same = values[OURS], values[LOOP_SAME]
    assert abs(proj - same) <= 1e-4 * abs(same), f"the per-sample loop is not the same estimate: {proj} vs {same}"
    exact = [values[name] for name in EXACT]
    assert max(exact) - min(exact) <= 1e-4 * max(exact), f"the exact methods disagree: {exact}"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", choices=list(METHODS))
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)
    values, med = timed_rounds(args.rounds)
    rows = []
    for name in METHODS:
        res = in_subprocess(name)  # memory of every method; value and the single timed run of the exact ones
        if name in EXACT:
            values[name], med[name] = res["value"], res["seconds"]
        rows.append(
            [
                name,
                f"{values[name]:.5g}",
                f"{med[name] * 1e3:.0f}",
                f"{med[name] / med[OURS]:.1f}x",
                f"{res['peak_mib']:.0f}",
            ]
        )
        print(rows[-1], flush=True)
    check_values(values)
    text = table(rows, ["method", "value", "value + backward [ms]", "vs projection", "peak RSS growth [MiB]"])
    print(text)
    write("benchmark_input_output.md", report(text, med, args.rounds))


def report(text: str, med: dict, rounds: int) -> str:
    return (
        f"# Input-to-output Jacobian penalty: LSTM (I={N_IN}, H={H}) + linear readout (O={N_OUT}), "
        f"B={B}, T={T}, float32\n\nMachine: {machine()}\n\n{text}\n\n"
        f"Speed-up of the projection penalty over the per-sample loop computing the same estimate: "
        f"**{med[LOOP_SAME] / med[OURS]:.0f}x** (target: >= 10x); over the forum's loop over output basis vectors "
        f"(the exact norm, 400 passes): **{med[LOOP_BASIS] / med[OURS]:.0f}x**.\n\n"
        f"Times: the value plus the backward pass to the parameters, one thread. The three projection rows: median of "
        f"{rounds} rounds alternating them in one process after a warm-up run each. The three exact rows: a single "
        "run each (no warm-up, no repetition: each takes tens of seconds and gigabytes), in its own fresh process. "
        "Memory: peak resident-set growth over the model-and-data baseline, every method run once in a fresh "
        "process. The projection value differs from the exact one because it is one random draw (unbiased; "
        "n_proj averages more); the per-sample loop uses the same random vectors and gives the same value "
        "(checked), as do the three exact methods among themselves. The exact methods keep one double-backward "
        "graph per output entry (400 of them) alive until the backward pass: their memory grows with O*T.\n\n"
        "Reproduce: `python analyses/benchmark_input_output.py`\n"
    )


if __name__ == "__main__":
    main()
