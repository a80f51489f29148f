r"""The one Lyapunov QR pass (Benettin et al. 1980), part of the tensor core: tensors in, tensors out.

- :func:`initial_basis`: the random orthonormal tangent block every sample starts from;
- :class:`LyapunovQR`, :class:`LyapunovResult`: ``Q_t R_t = qr(J_t Q_{t-1})`` on the schedule of
  :func:`rnnjac._linalg.qr_schedule`, in place and fast (the spectra, :mod:`rnnjac._kernels`) or differentiable
  (the Lyapunov penalty, :mod:`rnnjac.regularizers`).

The rule for ``-inf`` exponents is that of :func:`rnnjac._linalg.collapse_floor`. Internal (not a public API).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ._linalg import collapse_floor, qr_positive, qr_schedule
from ._uncertainty import BlockAccumulator, BlockStats

__all__ = ["LyapunovQR", "LyapunovResult", "initial_basis"]

Apply = Callable[[Tensor], Tensor]


def initial_basis(d: int, k: int, generator=None, dtype=torch.float64, device=None, batch: int = 1) -> Tensor:
    """A random orthonormal ``(d, k)`` basis, drawn in float64 on the CPU from ``generator`` (torch's global random
    state when None) and shared by every sample (a sample's result does not depend on its batch): ``(batch, d, k)``.

    Examples
    --------
    >>> q = initial_basis(5, 2, torch.Generator().manual_seed(0), batch=3)
    >>> q.shape, bool(torch.allclose(q[0].T @ q[0], torch.eye(2, dtype=torch.float64)))
    (torch.Size([3, 5, 2]), True)
    """
    q0, _ = qr_positive(torch.randn(d, k, generator=generator, dtype=torch.float64))
    return q0.to(dtype=dtype, device=device).expand(batch, d, k).contiguous()


class LyapunovResult(NamedTuple):
    """What :meth:`LyapunovQR.result` returns."""

    exponents: Tensor
    """``(B, k)``, descending, in nats per step (``-inf``: a collapsed direction, in-place mode only)."""
    local: Tensor | None
    """``(B, T, k)`` local exponents ``log R_ii / m`` at each counted QR step, NaN elsewhere, in the order of
    ``exponents``; None unless asked for."""
    counted_steps: int
    """``T - warmup - tangent_warmup``, the divisor of the exponents."""
    counted_qrs: int
    """How many QRs were counted."""
    blocks: BlockStats | None = None
    """The streamed block sums of ``log R_ii`` (:class:`rnnjac._uncertainty.BlockStats`, in the order of
    ``exponents``); None unless asked for (``blocks=True``, in-place mode)."""


class LyapunovQR:
    """The Lyapunov QR pass over a stream of linearisations: call :meth:`step` for t = 1..T, then :meth:`result`.

    Tangents ``Q`` (``q0``, ``(B, D, k)``, e.g. :func:`initial_basis`) evolve as ``Q <- J_t Q`` from step
    ``warmup + 1``; a QR follows on the schedule of :func:`rnnjac._linalg.qr_schedule`, and its ``log R_ii`` add
    up from step ``warmup + tangent_warmup + 1`` on.

    ``differentiable=False`` (the spectra): updates in place, no graph; the collapse rule of
    :func:`rnnjac._linalg.collapse_floor` makes an exponent ``-inf`` when its growth was at or below the floor at
    every counted QR, and an exact zero growth at one QR counts as the floor. :meth:`step` returns, at each QR, a
    0-dim bool tensor "diag(R) is finite" (no host sync).

    ``blocks=True`` (in-place mode) also streams ``log R_ii`` into block sums for the errors of
    :mod:`rnnjac._uncertainty` (memory independent of T: :data:`rnnjac._uncertainty.MAX_BLOCKS` float64 numbers
    per sample and exponent).

    ``differentiable=True`` (the Lyapunov penalty): out-of-place, so gradients flow through every ``J_t Q`` and QR;
    plain logs (a zero growth is ``-inf`` and has no gradient). :meth:`step` returns, at each counted QR, a 0-dim
    bool tensor "log diag(R) is finite".

    Examples
    --------
    >>> d = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    >>> acc = LyapunovQR(torch.eye(3, dtype=torch.float64)[None], 50)  # a diagonal J keeps Q = I: exact
    >>> for t in range(1, 51):
    ...     _ = acc.step(t, lambda q: d[:, None] * q)
    >>> acc.result().exponents.exp().round(decimals=12).tolist()
    [[2.0, 1.0, 0.5]]
    """

    def __init__(
        self,
        q0: Tensor,
        steps: int,
        *,
        warmup: int = 0,
        tangent_warmup: int = 0,
        reortho_every: int = 1,
        local: bool = False,
        differentiable: bool = False,
        blocks: bool = False,
    ):
        b, _, k = q0.shape
        self.q, self.differentiable, self._steps = q0, differentiable, steps
        self.warmup, self.start = warmup, warmup + tangent_warmup
        self.schedule = qr_schedule(steps, warmup, tangent_warmup, reortho_every)
        self.log_sum = q0.new_zeros(b, k)
        self.collapsed = torch.ones(b, k, dtype=torch.bool, device=q0.device)  # at the floor at every counted QR
        self.counted_qrs = 0
        self.local: Tensor | None = None
        self._local: list[tuple[int, Tensor]] | None = [] if local and differentiable else None
        if local and not differentiable:
            self.local = torch.full((b, steps, k), float("nan"), dtype=q0.dtype, device=q0.device)
        self.blocks = BlockAccumulator(b, k, q0.device) if blocks and not differentiable else None

    def step(self, t: int, apply: Apply) -> Tensor | None:
        """Step ``t`` (1-based): ``Q <- apply(Q)`` (``apply(Q) = J_t Q``), then the QR if one is due."""
        if t <= self.warmup:
            return None
        q = apply(self.q)
        cover = self.schedule.get(t)
        if cover is None:
            self.q = q
            return None
        if self.differentiable:
            return self._qr_graph(t, q, cover)
        return self._qr_in_place(t, q, cover)

    def _qr_in_place(self, t: int, q: Tensor, cover: int) -> Tensor:
        counted = t > self.start
        if counted:
            floor = collapse_floor(torch.linalg.vector_norm(q, dim=(-2, -1)), q.shape[-2], cover)
        self.q, r = qr_positive(q)
        finite = torch.isfinite(r).all()  # a NaN/Inf in J_t Q reaches diag(R)
        if counted:
            self.counted_qrs += 1
            log_r = torch.log(r)
            self.collapsed &= log_r <= floor
            log_r = torch.where(r > 0, log_r, floor)  # an exact zero at one step counts as the floor
            self.log_sum += log_r
            if self.local is not None:
                self.local[:, t - 1] = log_r / cover
            if self.blocks is not None:
                self.blocks.add(log_r, cover)
        return finite

    def _qr_graph(self, t: int, q: Tensor, cover: int) -> Tensor | None:
        self.q, r = qr_positive(q)
        if t <= self.start:
            return None
        self.counted_qrs += 1
        log_r = torch.log(r)
        self.log_sum = self.log_sum + log_r
        if self._local is not None:
            self._local.append((t, log_r / cover))
        return torch.isfinite(log_r.detach()).all()

    def _local_values(self) -> Tensor | None:
        if self._local is None:
            return self.local
        b, k = self.log_sum.shape
        local = self.log_sum.new_full((b, self._steps, k), float("nan"))
        if not self._local:
            return local
        index = torch.tensor([t - 1 for t, _ in self._local], device=local.device)
        return local.index_copy(1, index, torch.stack([v for _, v in self._local], 1))

    def result(self) -> LyapunovResult:
        """The exponents (sorted, descending) and the local exponents in the same order."""
        counted = self._steps - self.start
        lam = self.log_sum / counted
        if not self.differentiable:
            lam = torch.where(self.collapsed, float("-inf"), lam)
        order = torch.argsort(lam, dim=-1, descending=True)
        local = self._local_values()
        if local is not None:
            local = torch.gather(local, -1, order.unsqueeze(1).expand(-1, local.shape[1], -1))
        blocks = None if self.blocks is None else self.blocks.result().sorted(order.cpu())
        return LyapunovResult(torch.gather(lam, -1, order), local, counted, self.counted_qrs, blocks)
