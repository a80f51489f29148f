r"""How the in-place Lyapunov pass (:mod:`rnnjac._lyapunov_qr`) orthonormalises a tangent block, part of the
tensor core (tensors in, tensors out). Internal (not a public API).

**Cholesky QR where it keeps the answer.** In place, a float64 tangent block on the CPU is orthonormalised by one
CholeskyQR pass (:func:`rnnjac._linalg.cholesky_qr_diag`: a Gram GEMM, a Cholesky and a triangular solve; 1.3-2x
faster than geqrf + householder_product at B = 8, D = 64-128 and at B = 1, D = 100-500, one thread) whenever that is
as accurate: its ``R_ii`` carry relative errors of about ``u kappa^2`` (Yamamoto et al. 2015), so the pass is kept
only when the condition estimate of its own result (the larger of ``||m_i|| / R_ii`` and ``max_j R_jj / R_ii``,
``m_i`` the i-th column before the QR: :mod:`rnnjac._lyapunov_qr`) is at most :data:`CHOLESKY_MAX_CONDITION`
(``u kappa^2 <= 1e-10`` in float64: 671), and the QR is repeated by Householder when the Cholesky factorisation breaks
down or the estimate is larger (a rank-deficient or ill-conditioned block, a NaN). The next interval's condition is
predicted from the last accepted one (its log grows linearly with the steps covered; with ``reortho_every="auto"``
from the condition measured at every QR); after a fallback, Cholesky is tried again only after 1, 2, 4 ... 64 QRs.
In practice: a QR every step or every few steps of a slowly separating spectrum (the default ``reortho_every=1``, a
rate network every 10 steps) takes the Cholesky route; ``reortho_every="auto"`` plans for a condition of 1e6-1e7 and
keeps Householder.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._linalg import cholesky_qr_diag, qr_positive

__all__ = ["CHOLESKY_MAX_CONDITION", "QR_METHOD", "QR_METHODS", "Orthonormaliser", "householder_diag"]

#: the largest condition estimate of a float64 block whose CholeskyQR is kept: ``u kappa^2 <= 1e-10`` (module docstring)
CHOLESKY_MAX_CONDITION = math.sqrt(1e-10 / torch.finfo(torch.float64).eps)
#: the default ``method`` of :class:`Orthonormaliser`: ``"auto"`` (Cholesky where it keeps the answer) or
#: ``"householder"`` (every QR by Householder, the route before; the benchmark times the two)
QR_METHOD = "auto"
QR_METHODS = ("auto", "householder")
#: the most QRs that pass before Cholesky is tried again after a fallback
CHOLESKY_MAX_WAIT = 64


def householder_diag(a: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced Householder QR of ``a (..., n, k)``: ``(Q, |diag R|)`` (the signs of ``Q``'s columns are left as
    LAPACK's: the in-place pass needs only ``|R_ii|``). On the CPU ``geqrf`` + ``householder_product``, which skips
    the copy of ``R`` that :func:`torch.linalg.qr` makes (as fast in float64, 1.4x faster in float32 at D = 128-256,
    one thread); elsewhere
    :func:`rnnjac._linalg.qr_positive`.

    Examples
    --------
    >>> a = torch.tensor([[3.0, 1.0], [4.0, 2.0]], dtype=torch.float64)
    >>> q, d = householder_diag(a)
    >>> d.round(decimals=12).tolist(), bool(torch.allclose(q.T @ q, torch.eye(2, dtype=torch.float64)))
    ([5.0, 0.4], True)
    """
    if a.device.type != "cpu" or a.dtype not in (torch.float32, torch.float64):
        return qr_positive(a)
    h, tau = torch.geqrf(a)
    return torch.linalg.householder_product(h, tau), torch.diagonal(h, dim1=-2, dim2=-1).abs()


class Orthonormaliser:
    """One call per QR: ``(Q, |diag R|, column norms before the QR or None)`` of a tangent block ``(B, n, k)`` (left
    intact), by the route of the module docstring; :attr:`counts` counts the routes taken.

    ``method``: ``"auto"`` or ``"householder"`` (None: :data:`QR_METHOD`). ``planned``: whether the caller
    predicts the block's condition itself (``reortho_every="auto"`` sets :attr:`rate` from the condition it
    measures at every QR); otherwise the prediction is the last accepted pass's, forgotten after a fallback's wait.

    Examples
    --------
    >>> ortho = Orthonormaliser("auto", planned=False)
    >>> a = torch.tensor([[[3.0, 1.0], [4.0, 2.0]]], dtype=torch.float64)
    >>> q, r, norms = ortho(a, 1)
    >>> r.round(decimals=12).tolist(), ortho.counts["cholesky"]
    ([[5.0, 0.4]], 1)
    """

    def __init__(self, method: str | None = None, *, planned: bool = False):
        method = QR_METHOD if method is None else method
        if method not in QR_METHODS:
            raise ValueError(f"qr_method= must be one of {QR_METHODS}, got {method!r}")
        self.method, self.planned = method, planned
        self.counts = {"cholesky": 0, "householder": 0, "fallback": 0}
        #: the predicted growth of the block's log-condition per step covered
        self.rate = 0.0
        self._wait, self._backoff = 0, 1  # QRs left before Cholesky is tried again; the next wait

    def _back_off(self) -> None:
        self._wait, self._backoff = self._backoff, min(2 * self._backoff, CHOLESKY_MAX_WAIT)

    def _cholesky_due(self, q: Tensor, cover: int) -> bool:
        if self.method != "auto" or q.dtype != torch.float64 or q.device.type != "cpu":
            return False
        if self._wait > 0:
            self._wait -= 1
            if self._wait == 0 and not self.planned:
                self.rate = 0.0  # try again whatever the old prediction (a planned rate is measured at every QR)
            return False
        if self.rate * cover > math.log(CHOLESKY_MAX_CONDITION):
            if not self.planned:
                self._back_off()
            return False
        return True

    def __call__(self, q: Tensor, cover: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """The QR of ``q`` covering ``cover`` steps: CholeskyQR when due and its result is well conditioned (one
        host sync; the column norms come with it), else Householder (:func:`householder_diag`)."""
        if self._cholesky_due(q, cover):
            q1, r, norms, failed = cholesky_qr_diag(q)
            log_r = torch.log(r)
            log_cond = torch.maximum(torch.log(norms), log_r.amax(-1, keepdim=True)) - log_r
            worst = math.inf if bool(failed) else float(log_cond.amax())
            if worst <= math.log(CHOLESKY_MAX_CONDITION):  # False for NaN
                self.rate, self._backoff = max(worst, 0.0) / cover, 1
                self.counts["cholesky"] += 1
                return q1, r, norms
            self.counts["fallback"] += 1
            self._back_off()
        self.counts["householder"] += 1
        return (*householder_diag(q), None)
