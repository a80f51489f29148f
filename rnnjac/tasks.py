"""Small memory tasks used by the demo checkpoint and the analyses.

``flipflop``: the N-bit flip-flop of Sussillo & Barak (2013). Each input channel carries rare
pulses of +1 or -1; the target on that channel is the sign of the most recent pulse (0 before the
first), so the network must store N bits indefinitely.

``delayed_recall``: a delay line. Each input channel carries random pulses of +1 or -1; the target
on that channel is the input ``delay`` steps earlier, so the network must keep the last ``delay``
steps and forget what came before (the lag of an input's influence on the output is known exactly).
"""

from __future__ import annotations

import torch

__all__ = ["delayed_recall", "flipflop"]


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


def delayed_recall(
    batch: int,
    steps: int,
    *,
    delay: int = 5,
    channels: int = 2,
    p: float = 0.3,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets ``(batch, steps, channels)`` of the delayed-recall (delay-line) task.

    Each entry of the inputs is a pulse of +1 or -1 with probability ``p`` (each sign equally likely)
    and 0 otherwise. The target is the input ``delay`` steps earlier, ``y[:, t] = x[:, t - delay]``,
    and 0 for the first ``delay`` steps: a network that solves it remembers each input for exactly
    ``delay`` steps, so the sensitivity of its outputs to past inputs peaks at lag ``delay``.

    Parameters
    ----------
    batch, steps : int
        Trials and time steps, ``steps > delay``.
    delay : int
        Steps between an input and its recall, ``>= 0`` (0: copy the current input).
    channels : int
        Independent input (and output) channels.
    p : float
        Pulse probability per step and channel, ``0 < p <= 1``.
    generator : torch.Generator, optional
        Seeds the pulses.
    dtype : torch.dtype
        Of both tensors.

    Returns
    -------
    (Tensor, Tensor)
        Inputs and targets, both ``(batch, steps, channels)`` with entries in {-1, 0, +1}.

    Examples
    --------
    >>> import torch
    >>> from rnnjac.tasks import delayed_recall
    >>> x, y = delayed_recall(2, 20, delay=3, generator=torch.Generator().manual_seed(0))
    >>> x.shape, bool((y[:, 3:] == x[:, :-3]).all()), bool((y[:, :3] == 0).all())
    (torch.Size([2, 20, 2]), True, True)
    """
    for name, value, low in (("batch", batch, 1), ("steps", steps, 1), ("channels", channels, 1), ("delay", delay, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name}= must be an integer >= {low}; got {value!r}")
    if steps <= delay:
        raise ValueError(
            f"steps= must be larger than delay= (the target needs one recalled step); got {steps}, {delay}"
        )
    if not 0 < p <= 1:
        raise ValueError(f"p= must satisfy 0 < p <= 1; got {p!r}")
    pulse = torch.rand(batch, steps, channels, generator=generator) < p
    sign = torch.where(torch.rand(batch, steps, channels, generator=generator) < 0.5, -1.0, 1.0)
    x = (pulse * sign).to(dtype)
    y = torch.zeros_like(x)
    y[:, delay:] = x[:, : steps - delay]
    return x, y
