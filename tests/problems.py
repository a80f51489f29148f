"""The declarative list of model problems every Jacobian test runs over.

Each problem is a readable id plus a builder, so a failure names the configuration
(``lstm-L2-proj-nobias-tm-f64`` ...). Builders seed torch so models are reproducible.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Problem:
    arch: str  # rnn_tanh, rnn_relu, gru, lstm
    layers: int = 1
    bias: bool = True
    batch_first: bool = True
    proj: int = 0
    dtype: torch.dtype = torch.float64
    input_size: int = 3
    hidden: int = 5

    @property
    def id(self) -> str:
        bits = [self.arch, f"L{self.layers}"]
        if self.proj:
            bits.append(f"proj{self.proj}")
        if not self.bias:
            bits.append("nobias")
        bits.append("bf" if self.batch_first else "tm")
        bits.append("f64" if self.dtype == torch.float64 else "f32")
        return "-".join(bits)

    def module(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        kw = dict(num_layers=self.layers, bias=self.bias, batch_first=self.batch_first)
        if self.arch.startswith("rnn"):
            m = nn.RNN(self.input_size, self.hidden, nonlinearity=self.arch[4:], **kw)
        elif self.arch == "gru":
            m = nn.GRU(self.input_size, self.hidden, **kw)
        else:
            m = nn.LSTM(self.input_size, self.hidden, proj_size=self.proj, **kw)
        # larger weights than the default init so that gates saturate differently across units
        with torch.no_grad():
            for p in m.parameters():
                p.mul_(2.0)
        return m.to(self.dtype)

    def inputs(self, batch: int = 2, steps: int = 4, seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, steps, self.input_size, generator=g, dtype=self.dtype)
        return x if self.batch_first else x.transpose(0, 1)


def _all():
    out = []
    archs = [("rnn_tanh", 0), ("rnn_relu", 0), ("gru", 0), ("lstm", 0), ("lstm", 2)]
    for (arch, proj), layers, bias, bf in itertools.product(archs, (1, 2, 3), (True, False), (True, False)):
        out.append(Problem(arch, layers, bias, bf, proj))
    return out


PROBLEMS = _all()
PROBLEMS_F32 = [Problem(p.arch, p.layers, p.bias, p.batch_first, p.proj, torch.float32) for p in PROBLEMS if p.bias]
SMALL = [p for p in PROBLEMS if p.bias and p.batch_first and p.layers in (1, 2)]


def ids(problems):
    return [p.id for p in problems]
