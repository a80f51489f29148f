r"""The one Lyapunov QR pass (Benettin et al. 1980), part of the tensor core: tensors in, tensors out.

- :func:`initial_basis`: the random orthonormal tangent block every sample starts from;
- :class:`LyapunovQR`, :class:`LyapunovResult`: ``Q_t R_t = qr(J_t Q_{t-1})`` on the schedule of
  :func:`rnnjac._linalg.qr_schedule` (or chosen online: ``reortho_every="auto"``), in place and fast (the spectra,
  :mod:`rnnjac._kernels`) or differentiable (the Lyapunov penalty, :mod:`rnnjac.regularizers`).

**Fewer QRs, the same answer.** The QR of a product ``J_{t+m} ... J_{t+1} Q_t`` has exactly the diagonal of the
product of the every-step QRs' ``R`` (uniqueness of the QR with a positive diagonal), so skipping QRs changes
only the rounding. Householder QR is column-wise backward stable: the relative error of ``R_ii`` is about
``u * kappa_i`` with ``kappa_i = ||m_i|| / R_ii`` (``m_i`` the i-th column of the block before the QR; ``u`` the
unit round-off), a lower bound of the block's condition number, as is ``max_j R_jj / R_ii``. With
``reortho_every != 1`` the larger of the two is tracked per exponent at every counted QR (at no host sync): its
maximum and the geometric mean over the QRs that cover more than one step (:data:`LyapunovResult.attrs`). When
that typical value exceeds ``u^-1/2`` (the small exponents then carry relative errors of ``u^1/2`` at every QR),
a :class:`rnnjac.errors.ConditioningWarning` names the exponents at risk. (Both estimates come from the computed
``R``; once a column is lost to rounding its ``R_ii`` is noise of size ``u ||m_1||``, so they saturate near ``1/u``.)

``reortho_every="auto"`` measures the growth rate of that log-condition over each interval and sets the next one
so that it stays below :func:`condition_target`, at most doubling from one interval to the next, at most
:data:`MAX_INTERVAL` steps, and short enough that no column grows or shrinks by more than a quarter of the dtype's
exponent range. The QR at the end of the tangent transient and at the last step stay. The added error per QR is
about ``c u kappa`` with ``c`` about 10 (measured on the bundled GRU, D = 64): 1e-9 with ``kappa = 1e6`` in
float64, a thousand times below the stated tolerance (the exponents equal those of a QR at every step to 1e-6);
in float32 ``kappa = 30`` keeps it at the size of float32's own every-step rounding (top 4 exponents of the
bundled GRU: 3e-7 from float64 with "auto", 2e-7 with a QR every step; 1e-4 with ``kappa = 1e3``). Isolated
ill-conditioned steps (a spike that a QR at every step meets as well) are not predictable; they raise the
maximum condition estimate, not the typical one, and cost ``u kappa`` once.

**A float32 model's dense chain runs in float64** (in place, on the CPU, D <= :data:`WIDEN_MAX_SIZE`, or D <=
:data:`WIDEN_AUTO_MAX_SIZE` with ``reortho_every="auto"``, when the steps come with their matrix,
``step(t, apply, matrix=J_t)``): ``J_t`` is widened as it is applied and ``Q``, the QRs and
the sums are float64, so "auto" keeps the tangent block under :data:`WIDENED_TARGET` (1e7: an added error of about ``c
u kappa`` = 1e-8 per QR in float64, a thousand times below what float32's rounding of ``J_t`` itself costs, 1e-5 on
the bundled GRU, and below float64's warning limit ``u^-1/2``) instead of float32's 30. With exponents 2-3 nats per
step apart (a tanh RNN, an LSTM's h->h map) float32's bound leaves one QR per step, this one a QR every 3-7 steps; a
float64 QR is no slower on this BLAS up to D = 128 (geqrf + householder_product, B = 8, D = 64: 459 us against 591 us
in float32). The exponents are those of the float32 ``J_t`` without float32's rounding in the chain (the published
algorithm in float32 misses the float64 answer by 1e-4 on these models; rnnjac by 1e-6 to 1e-5), returned in the
model's dtype. At D = 256 a float64 QR costs 1.5x a float32 one, which a QR at every step does not repay; with
"auto" the float64 chain is 0.9-1.3x the time of the float32 one (2-layer RNN/GRU/LSTM, H = 128, B = 8, T = 500,
one thread) and its error against the float64 answer 100x smaller (GRU: 1e-7 against 4e-5, above the 1e-5 of the
published algorithm's float32 QR at every step; LSTM h: 2e-5 against 3e-3), so "auto" widens up to D = 256.

**Each QR** is one CholeskyQR pass where that keeps the answer, Householder otherwise
(:class:`rnnjac._orthonormalise.Orthonormaliser`); the differentiable pass keeps :func:`rnnjac._linalg.qr_positive`.

``tangent_warmup="auto"`` counts from the end of ``warmup`` and afterwards drops the leading blocks of ``log R_ii``
that the MSER rule (:func:`rnnjac._transients.transient_blocks`) finds to be transient.

The rule for ``-inf`` exponents is that of :func:`rnnjac._linalg.collapse_floor`. Internal (not a public API).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ._linalg import collapse_floor, qr_positive, qr_schedule
from ._orthonormalise import Orthonormaliser
from ._transients import transient_blocks
from ._uncertainty import BlockAccumulator, BlockStats
from .errors import ConditioningWarning

__all__ = ["LyapunovQR", "LyapunovResult", "condition_target", "initial_basis", "tangent_dtype"]

Apply = Callable[[Tensor], Tensor]

#: the longest interval between two QRs that ``reortho_every="auto"`` chooses
MAX_INTERVAL = 64
#: the condition number "auto" keeps a float32 model's float64 chain under (module docstring)
WIDENED_TARGET = 1e7


def condition_target(dtype: torch.dtype) -> float:
    """The condition number ``reortho_every="auto"`` keeps the tangent block under: 1e6 (float64), 30 (float32),
    3 (half precision); see the module docstring."""
    eps = torch.finfo(dtype).eps
    return 1e6 if eps < 1e-10 else 30.0 if eps < 1e-5 else 3.0


def condition_limit(dtype: torch.dtype) -> float:
    """The condition number above which the small exponents are unreliable (warned): ``u^-1/2``."""
    return 1.0 / math.sqrt(torch.finfo(dtype).eps)


#: the largest tangent dimension D whose float32 chain runs in float64 (:func:`tangent_dtype`) ...
WIDEN_MAX_SIZE = 128
#: ... and with ``reortho_every="auto"`` (module docstring)
WIDEN_AUTO_MAX_SIZE = 256


def tangent_dtype(dtype: torch.dtype, device, size: int, auto: bool = False) -> torch.dtype:
    """The dtype the in-place pass keeps a dense ``J_t Q`` chain of dimension ``size`` in: float64 for float32
    tangents on the CPU up to :data:`WIDEN_MAX_SIZE` (there float64's QR is no slower, and its condition bound lets
    ``reortho_every="auto"`` skip more QRs), and up to :data:`WIDEN_AUTO_MAX_SIZE` with ``reortho_every="auto"``
    (``auto=True``: the skipped QRs repay float64's slower ones, and the exponents are far more accurate; module
    docstring), else ``dtype`` itself.

    Examples
    --------
    >>> tangent_dtype(torch.float32, "cpu", 64), tangent_dtype(torch.float32, "cpu", 256)
    (torch.float64, torch.float32)
    >>> tangent_dtype(torch.float32, "cpu", 256, auto=True), tangent_dtype(torch.float32, "cpu", 512, auto=True)
    (torch.float64, torch.float32)
    """
    limit = WIDEN_AUTO_MAX_SIZE if auto else WIDEN_MAX_SIZE
    small = size <= limit and torch.device(device).type == "cpu"
    return torch.float64 if dtype == torch.float32 and small else dtype


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
    attrs: dict | None = None
    """What the run chose or measured, as Dataset attributes (str -> int/float/str): ``lyapunov_qr_count`` (QRs
    after ``warmup``, counted or not); in place with ``reortho_every != 1``, ``lyapunov_max_log10_condition`` and
    ``lyapunov_mean_log10_condition`` (the largest condition estimate of the tangent block before a counted QR,
    and the mean of its log over the QRs that cover several steps; module docstring); with ``reortho_every="auto"``
    ``reortho_interval_min``/``_mean``/``_max`` (steps between QRs); with ``tangent_warmup="auto"``
    ``tangent_warmup_used`` (the steps dropped)."""


class LyapunovQR:
    """The Lyapunov QR pass over a stream of linearisations: call :meth:`step` for t = 1..T, then :meth:`result`.

    Tangents ``Q`` (``q0``, ``(B, D, k)``, e.g. :func:`initial_basis`) evolve as ``Q <- J_t Q`` from step
    ``warmup + 1``; a QR follows on the schedule of :func:`rnnjac._linalg.qr_schedule` (``reortho_every`` an int)
    or when the tangent block's predicted condition number calls for one (``reortho_every="auto"``, module
    docstring), and its ``log R_ii`` add up from step ``warmup + tangent_warmup + 1`` on (``tangent_warmup="auto"``:
    from ``warmup + 1``, and the transient found afterwards is dropped; in-place mode only).

    ``differentiable=False`` (the spectra): updates in place, no graph; the collapse rule of
    :func:`rnnjac._linalg.collapse_floor` makes an exponent ``-inf`` when its growth was at or below the floor at
    every counted QR, and an exact zero growth at one QR counts as the floor. :meth:`step` returns, at each QR, a
    0-dim bool tensor "diag(R) is finite" (no host sync, except one per QR with ``reortho_every="auto"``). The
    tangent block's condition is tracked (module docstring) and, with ``reortho_every != 1``, :meth:`result`
    warns (:class:`rnnjac.errors.ConditioningWarning`) when it exceeded ``u^-1/2``. A float32 dense chain
    (steps given with ``matrix=J_t``) runs in float64 on the CPU (module docstring); the results keep the
    dtype of ``q0``.

    ``qr_method`` (in-place mode): ``"auto"`` orthonormalises a float64 block on the CPU by one CholeskyQR pass
    when that keeps the answer, else by Householder (:class:`rnnjac._orthonormalise.Orthonormaliser`;
    :attr:`qr_counts` counts the routes); ``"householder"``: always Householder. None:
    :data:`rnnjac._orthonormalise.QR_METHOD`.

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
    >>> acc = LyapunovQR(torch.eye(3, dtype=torch.float64)[None], 50, reortho_every="auto")
    >>> for t in range(1, 51):
    ...     _ = acc.step(t, lambda q: d[:, None] * q)
    >>> r = acc.result()  # intervals 1, 2, 4, 8, then 9 (kappa = 4^m stays below 1e6), 8 to the last step
    >>> r.attrs["lyapunov_qr_count"], r.attrs["reortho_interval_max"], r.exponents.exp().round(decimals=12).tolist()
    (8, 9, [[2.0, 1.0, 0.5]])
    """

    def __init__(
        self,
        q0: Tensor,
        steps: int,
        *,
        warmup: int = 0,
        tangent_warmup: int | str = 0,
        reortho_every: int | str = 1,
        local: bool = False,
        differentiable: bool = False,
        blocks: bool = False,
        qr_method: str | None = None,
    ):
        b, _, k = q0.shape
        self.auto_transient = tangent_warmup == "auto"
        if self.auto_transient and differentiable:
            raise ValueError("tangent_warmup='auto' needs the in-place pass (differentiable=False); give an int")
        fixed_warmup = 0 if self.auto_transient else int(tangent_warmup)
        self.q, self.differentiable, self._steps = q0, differentiable, steps
        self.warmup, self.start = warmup, warmup + fixed_warmup
        self.reortho_every = reortho_every
        self.schedule = None if reortho_every == "auto" else qr_schedule(steps, warmup, fixed_warmup, reortho_every)
        self.interval, self.next_qr, self.last_qr = 1, warmup + 1, warmup
        self.covers = [0, 0, steps, 0]  # QRs, steps they cover, shortest and longest cover (memory independent of T)
        self.skip, self.backoff = 0, 1  # "auto": QRs left at one step without measuring, and the next such run
        self.forced = {steps} | ({self.start} if fixed_warmup > 0 else set())
        self.log_sum = q0.new_zeros(b, k)
        self.collapsed = torch.ones(b, k, dtype=torch.bool, device=q0.device)  # at the floor at every counted QR
        self.log_cond = torch.zeros(k, dtype=q0.dtype, device=q0.device)  # per column, max over samples and QRs
        # sum over the counted QRs that cover several steps of the log condition number, per column (its mean, the
        # log of the geometric mean, is warned: isolated spikes that a QR at every step would meet too weigh little)
        self.cond_sum, self.cond_qrs = torch.zeros(k, dtype=torch.float64, device=q0.device), 0
        self.counted_qrs = 0
        self.local: Tensor | None = None
        self._local: list[tuple[int, Tensor]] | None = [] if local and differentiable else None
        if local and not differentiable:
            self.local = torch.full((b, steps, k), float("nan"), dtype=q0.dtype, device=q0.device)
        self.want_blocks = blocks and not differentiable
        streamed = self.want_blocks or self.auto_transient
        self.blocks = BlockAccumulator(b, k, q0.device) if streamed else None
        self._transient: tuple[int, BlockStats] | None = None
        self.dtype = q0.dtype  # of the results; the tangents may be widened at the first step (_first_step)
        #: the dtype a dense chain runs in (in place: :func:`tangent_dtype`); a caller that widens a factored step's
        #: operands to it passes ``wide=True`` to :meth:`step`
        auto = reortho_every == "auto"
        self.chain_dtype = q0.dtype if differentiable else tangent_dtype(q0.dtype, q0.device, q0.shape[-2], auto)
        self.widened: bool | None = None
        self._wide: Tensor | None = None  # J_t widened to the tangents' dtype
        self.ortho = Orthonormaliser(qr_method, planned=reortho_every == "auto")  # the in-place QRs

    def _first_step(self, matrix: Tensor | None, wide_apply: bool) -> None:
        """In place, a dense chain (steps given with ``matrix=J_t``, or with ``wide=True``) of float32 tangents on
        the CPU runs in float64 (:func:`tangent_dtype`): ``J_t`` is widened as it is applied, the QRs are no
        slower, and ``reortho_every="auto"`` keeps the bound :data:`WIDENED_TARGET`."""
        wide = self.chain_dtype
        self.widened = (matrix is not None or wide_apply) and wide != self.q.dtype
        if self.widened:
            self.q, self.log_sum, self.log_cond = self.q.to(wide), self.log_sum.to(wide), self.log_cond.to(wide)

    def _apply(self, apply: Apply, matrix: Tensor | None, wide_apply: bool) -> Tensor:
        """``J_t Q`` of a widened chain (a step without its matrix, not ``wide``, runs in the results' dtype)."""
        if wide_apply:
            return apply(self.q)
        if matrix is None:
            return apply(self.q.to(self.dtype)).to(self.q.dtype)
        if self._wide is None or self._wide.shape != matrix.shape:
            self._wide = torch.empty(matrix.shape, dtype=self.q.dtype, device=matrix.device)
        wide = self._wide.copy_(matrix)  # into one buffer: half the cost of a fresh .to() (B = 8, D = 128)
        # (Q^T J^T)^T: the product column-major, as LAPACK's QR and the column norms read it (1.1-9x faster)
        return torch.bmm(self.q.mT, wide.mT).mT

    def _due(self, t: int) -> int | None:
        """The steps covered by a QR after step ``t``, or None when no QR is due."""
        if self.schedule is not None:
            return self.schedule.get(t)
        if t == self.next_qr or t in self.forced:
            return t - self.last_qr
        return None

    def step(self, t: int, apply: Apply, *, matrix: Tensor | None = None, wide: bool = False) -> Tensor | None:
        """Step ``t`` (1-based): ``Q <- apply(Q)`` (``apply(Q) = J_t Q``), then the QR if one is due; ``matrix``:
        ``J_t`` itself ``(B, D, D)`` when the step is a dense matrix (``apply`` is then ``bmm`` with it), which lets
        a float32 chain run in float64 (class docstring). ``wide=True``: ``apply`` takes and returns tangents in
        :attr:`chain_dtype` (a factored step whose operands the caller widened), and the chain is widened as for
        a matrix."""
        if t <= self.warmup:
            return None
        if self.widened is None:
            self._first_step(matrix, wide)
        q = self._apply(apply, matrix, wide) if self.widened else apply(self.q)
        cover = self._due(t)
        if cover is None:
            self.q = q
            return None
        self.last_qr = t
        n, total, low, high = self.covers
        self.covers = [n + 1, total + cover, min(low, cover), max(high, cover)]
        if self.differentiable:
            return self._qr_graph(t, q, cover)
        return self._qr_in_place(t, q, cover)

    def _qr_in_place(self, t: int, q: Tensor, cover: int) -> Tensor:
        counted = t > self.start
        measure = self.reortho_every != 1 and (self.schedule is not None or self.skip == 0)
        self.q, r, norms = self.ortho(q, cover)  # norms: (B, k) column norms before the QR, or None
        if measure:
            norms = torch.linalg.vector_norm(q, dim=-2) if norms is None else norms
            floor = collapse_floor(torch.linalg.vector_norm(norms, dim=-1), q.shape[-2], cover)
        elif counted:
            floor = collapse_floor(torch.linalg.vector_norm(q, dim=(-2, -1)), q.shape[-2], cover)
        finite = torch.isfinite(r).all()  # a NaN/Inf in J_t Q reaches diag(R)
        if not (counted or measure):
            self._plan(t, cover, None)
            return finite
        log_r = torch.log(r)
        at_floor = log_r <= floor
        log_cond = resolved = None
        if measure:
            resolved = ~at_floor
            log_cond = self._log_condition(norms, log_r, resolved)
        if counted:
            self.counted_qrs += 1
            if log_cond is not None:
                self._track(log_cond, cover)
            self.collapsed &= at_floor
            log_r = torch.where(r > 0, log_r, floor)  # an exact zero at one step counts as the floor
            self.log_sum += log_r
            if self.local is not None:
                self.local[:, t - 1] = log_r / cover
            if self.blocks is not None:
                self.blocks.add(log_r, cover)
        self._plan(t, cover, None if log_cond is None or resolved is None else (log_cond, log_r, resolved))
        return finite

    @property
    def qr_counts(self) -> dict[str, int]:
        """QRs taken by each route (in place): "cholesky" kept, "householder" (of which "fallback" after a
        rejected Cholesky pass)."""
        return self.ortho.counts

    def _track(self, log_cond: Tensor, cover: int) -> None:
        """Record a counted QR's condition estimate ``(B, k)`` (no host sync)."""
        worst = log_cond.amax(0)
        self.log_cond = torch.maximum(self.log_cond, worst)
        if cover > 1:  # what a QR at every step would not have met
            self.cond_sum += worst.to(torch.float64)
            self.cond_qrs += 1

    @staticmethod
    def _log_condition(norms: Tensor, log_r: Tensor, resolved: Tensor) -> Tensor:
        """Per column ``(B, k)``: the log of ``max(||m_i|| / R_ii, max_j R_jj / R_ii)`` over the resolved columns
        (0 for collapsed ones, whose value is the floor anyway)."""
        top = torch.where(resolved, log_r, float("-inf")).amax(-1, keepdim=True)
        value = torch.maximum(torch.log(norms), top) - log_r
        return torch.where(resolved, value, 0.0).clamp_(min=0)

    def _plan(self, t: int, cover: int, measured: tuple[Tensor, Tensor, Tensor] | None) -> None:
        """``reortho_every="auto"``: the next QR step, from the growth of the log-condition over the last interval
        (one host sync). While the answer is one step, the next 1, 2, 4 ... 16 QRs follow at once, unmeasured (a QR
        every step loses nothing)."""
        if self.schedule is not None:
            return
        if measured is None:
            self.skip = max(0, self.skip - 1)
            self.next_qr = t + 1
            return
        log_cond, log_r, resolved = measured
        growth = torch.where(resolved, log_r.abs(), 0.0)
        cond, size = torch.stack([log_cond.amax(), growth.amax()]).tolist()
        self.ortho.rate = cond / cover  # the Cholesky route's prediction
        dtype = log_r.dtype
        target = WIDENED_TARGET if self.widened else condition_target(dtype)
        by_cond = math.log(target) * cover / cond if cond > 0 else math.inf
        by_size = 0.25 * -math.log(torch.finfo(dtype).tiny) * cover / size if size > 0 else math.inf
        plan = min(2 * self.interval, MAX_INTERVAL, by_cond, by_size)
        self.interval = max(1, int(plan) if math.isfinite(plan) else 1)
        self.next_qr = t + self.interval
        if self.interval == 1:
            self.skip, self.backoff = self.backoff, min(2 * self.backoff, 16)
        else:
            self.backoff = 1

    def _qr_graph(self, t: int, q: Tensor, cover: int) -> Tensor | None:
        self.q, r = qr_positive(q)
        if self.schedule is None:
            with torch.no_grad():
                norms, log_r = torch.linalg.vector_norm(q.detach(), dim=-2), torch.log(r.detach())
                resolved = torch.isfinite(log_r)
                self._plan(t, cover, (self._log_condition(norms, log_r, resolved), log_r, resolved))
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

    def _drop_transient(self) -> tuple[int, BlockStats | None]:
        """``tangent_warmup="auto"``: drop the leading blocks that MSER finds transient; returns the steps
        dropped and the block sums of the rest."""
        assert self.blocks is not None
        stats = self.blocks.result()
        cut = transient_blocks(stats)
        if cut == 0:
            return 0, stats
        dropped = int(stats.steps[:cut].sum())
        self.log_sum -= stats.sums[:, :cut].sum(1).to(self.log_sum)
        if self.local is not None:
            self.local[:, self.warmup : self.warmup + dropped] = float("nan")
        self.counted_qrs -= cut * stats.base
        return dropped, stats.slice(cut)

    def _attrs(self, dropped: int | None) -> dict:
        n, total, low, high = self.covers
        out: dict = {"lyapunov_qr_count": n}
        if not self.differentiable and self.reortho_every != 1:
            log10 = float(self.log_cond.max()) / math.log(10) if self.counted_qrs else 0.0
            out["lyapunov_max_log10_condition"] = log10
            mean = float((self.cond_sum / self.cond_qrs).max()) if self.cond_qrs else 0.0
            out["lyapunov_mean_log10_condition"] = mean / math.log(10)
        if self.schedule is None:
            out.update(reortho_interval_min=min(low, high), reortho_interval_max=high)
            out["reortho_interval_mean"] = total / max(n, 1)
        if dropped is not None:
            out["tangent_warmup_used"] = dropped
        return out

    def _warn_condition(self, order: Tensor) -> None:
        """The :class:`ConditioningWarning` of the class docstring (``order``: the first sample's sort)."""
        limit = condition_limit(self.log_cond.dtype)
        if self.differentiable or not self.cond_qrs:
            return
        mean = (self.cond_sum / self.cond_qrs).cpu()
        risky = mean > math.log(limit)
        if not bool(risky.any()):
            return
        rank = torch.argsort(order.cpu())  # column -> position in the sorted exponents
        names = ", ".join(f"lambda_{i + 1}" for i in sorted(rank[risky].tolist())[:8])
        typical = float(mean.max()) / math.log(10)
        warnings.warn(
            f"the tangent block's condition number before a QR was typically about 1e{typical:.0f} (geometric "
            f"mean, above {limit:.1e}, 1/sqrt(eps) of {str(self.log_cond.dtype).replace('torch.', '')}) with "
            f"reortho_every={self.reortho_every!r}: the smaller exponents ({names}) may be lost to rounding; use "
            "a smaller reortho_every= or reortho_every='auto'",
            ConditioningWarning,
            stacklevel=2,
        )

    def result(self) -> LyapunovResult:
        """The exponents (sorted, descending) and the local exponents in the same order."""
        dropped, stats = None, None
        if self.auto_transient:
            if self._transient is None:
                self._transient = self._drop_transient()
            dropped, stats = self._transient
        elif self.blocks is not None:
            stats = self.blocks.result()
        counted = self._steps - self.start - (dropped or 0)
        lam = (self.log_sum / counted).to(self.dtype)
        if not self.differentiable:
            lam = torch.where(self.collapsed, float("-inf"), lam)
        order = torch.argsort(lam, dim=-1, descending=True)
        local = self._local_values()
        if local is not None:
            local = torch.gather(local, -1, order.unsqueeze(1).expand(-1, local.shape[1], -1))
        self._warn_condition(order[0])
        blocks = stats.sorted(order.cpu()) if stats is not None and self.want_blocks else None
        exps = torch.gather(lam, -1, order)
        return LyapunovResult(exps, local, counted, self.counted_qrs, blocks, self._attrs(dropped))
