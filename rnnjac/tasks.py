"""Small memory tasks used by the demo checkpoint and the analyses.

``flipflop``: the N-bit flip-flop of Sussillo & Barak (2013). Each input channel carries rare
pulses of +1 or -1; the target on that channel is the sign of the most recent pulse (0 before the
first), so the network must store N bits indefinitely.
"""

from __future__ import annotations

import torch

__all__ = ["flipflop"]


def flipflop(
    batch: int,
    steps: int,
    *,
    bits: int = 3,
    p: float = 0.05,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``(batch, steps, bits)`` of the N-bit flip-flop task.

    Examples
    --------
    >>> import torch
    >>> from rnnjac.tasks import flipflop
    >>> x, y = flipflop(2, 50, generator=torch.Generator().manual_seed(0))
    >>> x.shape, bool(((y == 1) | (y == -1) | (y == 0)).all())
    (torch.Size([2, 50, 3]), True)
    """
    if batch < 1 or steps < 1 or bits < 1 or not 0 < p <= 1:
        raise ValueError(f"need batch, steps, bits >= 1 and 0 < p <= 1; got {batch}, {steps}, {bits}, {p}")
    pulse = torch.rand(batch, steps, bits, generator=generator) < p
    sign = torch.where(torch.rand(batch, steps, bits, generator=generator) < 0.5, -1.0, 1.0)
    x = (pulse * sign).to(dtype)
    y = torch.zeros_like(x)
    last = torch.zeros(batch, bits, dtype=dtype)
    for t in range(steps):
        last = torch.where(pulse[:, t], x[:, t], last)
        y[:, t] = last
    return x, y
