"""warmup="auto" against a hand-tuned warm-up (issue 17: "lands within a factor of 2").

Random tanh rate networks ``h <- (1 - dt) h + dt (W tanh(h) + x)`` (N = 100, dt = 0.1, W ~ N(0, g^2/N) with a zero
diagonal), 16 trajectories of 1000 steps from a large initial state (RMS 20) with weak input noise (sd 0.3): a
decaying transient, then the stationary state at gains g = 0.5 (stable), 1.5 (near the transition) and 3 (chaotic),
six networks each. The hand-tuned warm-up is the step at which the 10-step moving average of the batch-mean RMS
state first comes within 3 standard deviations of its mean over the second half of the run; the automatic one is
what ``warmup="auto"`` takes (:func:`rnnjac._transients.auto_warmup`, MSER). Writes figures/auto_warmup.md:

    python analyses/auto_warmup.py
"""

from __future__ import annotations

import math

import torch
from _bench import table, write

import rnnjac
from rnnjac._dynamics import as_dynamics
from rnnjac._transients import auto_warmup

N, STEPS, BATCH, DT = 100, 1000, 16, 0.1


def rate_states(gain: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = gain * torch.randn(N, N, generator=g, dtype=torch.float64) / math.sqrt(N)
    w.fill_diagonal_(0)
    cell = rnnjac.CustomCell(lambda s, x: (1 - DT) * s + DT * (torch.tanh(s) @ w.T + x), name="rate")
    xs = 0.3 * torch.randn(BATCH, STEPS, N, generator=g, dtype=torch.float64)
    return as_dynamics(cell, state_size=N).run(20 * torch.randn(BATCH, N, generator=g, dtype=torch.float64), xs)


def hand_tuned(states: torch.Tensor, window: int = 10, tol: float = 3.0) -> int:
    rms = (torch.linalg.vector_norm(states[:, 1:], dim=-1) / math.sqrt(N)).mean(0)
    smooth = rms.unfold(0, window, 1).mean(-1)
    tail = smooth[len(smooth) // 2 :]
    return int(torch.nonzero((smooth - tail.mean()).abs() <= tol * tail.std()).flatten()[0]) + window


def main() -> None:
    rows, ratios = [], []
    for gain in (0.5, 1.5, 3.0):
        for seed in range(6):
            states = rate_states(gain, seed)
            hand, auto = hand_tuned(states), auto_warmup(states, STEPS - 1)
            ratios.append(auto / hand)
            inside = "yes" if hand / 2 <= auto <= 2 * hand else "**no**"
            rows.append([f"{gain:g}", str(seed), str(hand), str(auto), f"{auto / hand:.2f}", inside])
    within = sum(0.5 <= r <= 2 for r in ratios)
    text = (
        '# warmup="auto" against a hand-tuned warm-up (target: within a factor of 2)\n\n'
        + __doc__.split("\n\n")[1].replace("\n", " ").split(" Writes ")[0]
        + "\n\n"
        + table(rows, ["gain g", "network seed", "hand-tuned [steps]", "auto [steps]", "auto / hand", "within 2x"])
        + f"\n\nWithin a factor of 2: {within} of {len(ratios)}; auto / hand from {min(ratios):.2f} to "
        f"{max(ratios):.2f}.\n\nReproduce: `python analyses/auto_warmup.py`\n"
    )
    print(text)
    write("auto_warmup.md", text)


if __name__ == "__main__":
    main()
