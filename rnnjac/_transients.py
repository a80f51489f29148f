r"""Initial transients by the MSER rule (White 1997), part of the tensor core: what ``warmup="auto"`` and
``tangent_warmup="auto"`` drop.

- :func:`mser_truncation`: the transient of one series; :func:`auto_warmup`: the state warm-up of a batch of
  trajectories from it (``warmup="auto"``);
- :func:`transient_blocks`: one cut for every sample and exponent of the streamed block means of ``log R_ii``
  (:class:`rnnjac._uncertainty.BlockStats`), for :class:`rnnjac._lyapunov_qr.LyapunovQR`.

White, "An effective truncation heuristic for bias reduction in simulation output", Simulation 69 (1997) 323-334.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._uncertainty import BlockStats

__all__ = ["auto_warmup", "mser_truncation", "transient_blocks"]


def mser_truncation(series: Tensor, *, batch_size: int = 1) -> int:
    """The length of the initial transient of ``series`` by the MSER-m rule (White 1997).

    The series is cut into ``n`` consecutive batches of ``batch_size`` items (a last incomplete batch is left out)
    with means ``Z_1..Z_n``. Deleting the first ``d`` batches leaves ``Z_{d+1}..Z_n``, with mean ``Zbar_d``; the
    rule takes the ``d`` that minimises ``MSER(d) = sum_{j>d} (Z_j - Zbar_d)^2 / (n - d)^2`` (the squared
    standard error of the mean of the rest, up to a constant) over the first half, ``0 <= d < n / 2``, the
    smallest such ``d`` on ties. White, "An effective truncation heuristic for bias reduction in simulation
    output", Simulation 69 (1997) 323-334; MSER-5 (``batch_size=5``) is the common choice for noisy series.

    Parameters
    ----------
    series : Tensor
        1-D, real and finite (e.g. a per-step state statistic, or block means of local exponents).
    batch_size : int
        Items per batch, m >= 1.

    Returns
    -------
    int
        Items to delete from the start: ``d * batch_size`` (0 when fewer than two batches fit).

    Examples
    --------
    >>> import torch
    >>> t = torch.arange(200, dtype=torch.float64)
    >>> noise = 0.01 * torch.randn(200, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> mser_truncation(torch.exp(-t / 10) + noise) in range(30, 70)
    True
    >>> mser_truncation(noise) <= 5  # stationary: (almost) nothing to delete
    True
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1; got {batch_size!r}")
    if not isinstance(series, Tensor) or series.dim() != 1 or series.is_complex():
        raise ValueError(f"series must be a real 1-D tensor; got {getattr(series, 'shape', type(series).__name__)}")
    values = series.detach().to("cpu", torch.float64)
    if not torch.isfinite(values).all():
        raise ValueError("series must be finite; found NaN/Inf")
    n = values.numel() // batch_size
    if n < 2:
        return 0
    z = values[: n * batch_size].view(n, batch_size).mean(1)
    return _mser_index(z[:, None], torch.ones(1, dtype=torch.float64)) * batch_size


def _mser_index(z: Tensor, weights: Tensor) -> int:
    """The ``d < n / 2`` minimising ``sum_c weights_c MSER_c(d)`` over the columns of ``z (n, p)`` (float64)."""
    n = z.shape[0]
    z = z - z.mean(0)  # centred: the suffix sums below lose no precision to a large mean
    s1 = torch.flip(torch.cumsum(torch.flip(z, [0]), 0), [0])  # s1[d] = sum_{j >= d} z_j (0-based)
    s2 = torch.flip(torch.cumsum(torch.flip(z.square(), [0]), 0), [0])
    left = torch.arange(n, 0, -1, dtype=torch.float64)[:, None]  # n - d
    mser = ((s2 - s1.square() / left).clamp(min=0) / left.square()) @ weights
    half = (n + 1) // 2  # d < n / 2
    return int(torch.argmin(mser[:half]))


def transient_blocks(stats: BlockStats) -> int:
    """The leading blocks of :class:`BlockStats` that are transient (what ``tangent_warmup="auto"`` drops).

    MSER (:func:`mser_truncation`) with one truncation point for every sample and exponent: the sum over the
    series ``(b, i)`` of the block means of their MSER statistics, each divided by the variance of the second half
    of its series (so that every exponent weighs by its transient relative to its own noise; series without noise,
    or with a collapsed ``-inf`` exponent, weigh nothing). Only full blocks are used; at most half of them are
    dropped.

    Examples
    --------
    >>> from rnnjac._uncertainty import BlockAccumulator
    >>> acc = BlockAccumulator(1, 1)
    >>> for t in range(100):
    ...     acc.add(torch.tensor([[-1.0 + 2.0 ** -t + 0.01 * (-1) ** t]]), 1)
    >>> transient_blocks(acc.result())
    7
    """
    full = stats.qrs // stats.base
    if full < 2:
        return 0
    means = stats.sums[:, :full] / stats.steps[:full, None]  # (B, M, k)
    z = means.transpose(0, 1).reshape(full, -1)
    var = z[full // 2 :].var(0) if full - full // 2 >= 2 else torch.zeros(z.shape[1], dtype=torch.float64)
    ok = torch.isfinite(z).all(0) & (var > 0)
    if not bool(ok.any()):
        return 0
    return _mser_index(z[:, ok], 1 / var[ok])


def auto_warmup(states: Tensor, limit: int) -> int:
    """The state warm-up of a trajectory ``states (B, T+1, D)`` (``s_0..s_T``), at most ``limit`` steps: the
    shortest over the batch of the transients that the MSER rule (:func:`rnnjac._transients.mser_truncation`,
    White 1997) finds in each sample's ``||s_t|| / sqrt(D)``, t = 1..T.

    Per sample, then the smallest: MSER errs on one side, past the transient: a chaotic state's norm fluctuates
    slowly, and on one series the rule sometimes cuts at such a fluctuation long after the transient has gone
    (measured on random tanh rate networks at g = 1.5: up to 6x the transient), while it does not cut before a
    transient that stands out of the fluctuations. The samples are taken to share their transient (the same
    model and a comparable distance of ``h0`` from the attractor): give ``warmup`` an int when they do not. A
    trajectory that settles on a fixed point with no input noise has no stationary fluctuation, and MSER then
    cuts at its maximum, half the run.

    Examples
    --------
    >>> t = torch.arange(201.0)
    >>> noise = 0.01 * torch.randn(2, 201, 3, generator=torch.Generator().manual_seed(0))
    >>> states = (1 + 4 * torch.exp(-t / 10))[None, :, None] + noise
    >>> 30 <= auto_warmup(states, 150) <= 100
    True
    """
    norms = torch.linalg.vector_norm(states[:, 1:].double(), dim=-1) / math.sqrt(states.shape[-1])
    return min(min(mser_truncation(series) for series in norms), limit)
