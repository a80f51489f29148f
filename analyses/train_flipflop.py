"""Train the demo checkpoint shipped in rnnjac/data: a GRU on the 3-bit flip-flop task.

Reproducible with a fixed seed on CPU (about a minute on 2 cores):

    python analyses/train_flipflop.py            # writes rnnjac/data/flipflop_gru.safetensors

The file holds the state dict of ``FlipFlopNet`` (``rnn.*`` = nn.GRU, ``readout.*`` = nn.Linear)
with metadata (task, seed, steps trained, final loss) so that ``rnnjac info`` can show them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from rnnjac.tasks import flipflop

ROOT = Path(__file__).resolve().parents[1]


class FlipFlopNet(nn.Module):
    def __init__(self, hidden: int = 32, bits: int = 3, cell: str = "gru"):
        super().__init__()
        rnn_cls = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn_cls(bits, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, bits)

    def forward(self, x):
        h, _ = self.rnn(x)
        return self.readout(h)


def accuracy(net, x, y) -> float:
    """Fraction of (time, bit) entries after the first pulse where sign(output) is right."""
    with torch.no_grad():
        out = net(x)
    mask = y != 0
    return float(((out.sign() == y) & mask).sum() / mask.sum())


def train(hidden=32, cell="gru", iters=1500, batch=64, steps=100, seed=0, lr=3e-3, log_every=250, callback=None):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    net = FlipFlopNet(hidden, cell=cell)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for it in range(1, iters + 1):
        x, y = flipflop(batch, steps, generator=gen)
        loss = nn.functional.mse_loss(net(x), y)
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if callback is not None:
            callback(it, net, float(loss))
        if log_every and it % log_every == 0:
            print(f"iter {it:5d}  loss {loss.item():.4f}", flush=True)
    return net, loss.item()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "rnnjac" / "data" / "flipflop_gru.safetensors")
    ap.add_argument("--iters", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    t0 = time.time()
    net, loss = train(iters=args.iters, seed=args.seed)
    x, y = flipflop(256, 200, generator=torch.Generator().manual_seed(12345))
    acc = accuracy(net, x, y)
    meta = {
        "task": "3-bit flip-flop (Sussillo & Barak 2013), pulse probability 0.05",
        "arch": "gru",
        "nonlinearity": "tanh",
        "seed": str(args.seed),
        "step": str(args.iters),
        "final_loss": f"{loss:.5f}",
        "test_accuracy": f"{acc:.4f}",
        "trained_by": "analyses/train_flipflop.py",
    }
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(args.out), metadata=meta)
    print(f"saved {args.out} (loss {loss:.4f}, sign accuracy {acc:.3f}, {time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
