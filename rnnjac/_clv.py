r"""Backward (Gram-Schmidt) and covariant Lyapunov vectors, part of the tensor core: tensors in, tensors out.

Ginelli's method (Ginelli, Poggi, Turchi, Chaté, Livi & Politi, PRL 99, 130601, 2007; Ginelli, Chaté, Livi &
Politi, J. Phys. A 46, 254005, 2013), with ``t_s = warmup + tangent_warmup``:

- forward pass: ``Q_t R_t = qr(J_t Q_{t-1})`` with ``diag(R_t) > 0`` (the Benettin chain of
  :mod:`rnnjac._lyapunov_qr`), keeping ``Q_t`` at the requested times and every ``R_t`` (``k x k``) of the
  steps ``t_s < t <= T`` (in memory, or spilled to disk in chunks: :class:`RStore`). The columns of ``Q_t`` are
  the backward (Gram-Schmidt) vectors;
- backward pass: ``C_T`` a random upper-triangular matrix with unit columns, then for ``t = T .. t_s + 1``
  ``C_{t-1} = R_t^{-1} C_t`` with its columns normalised; ``V_t = Q_t C_t`` are the covariant vectors (unit
  norm). Since ``J_t V_{t-1} = Q_t R_t C_{t-1} = V_t diag(g_t)``, the normalisation gives the growth factors
  ``g_{t,i} = ||J_t v_i(t-1)|| = 1 / ||(R_t^{-1} C_t)_i||``, whose log-average over the steps
  ``t_s < t <= T - backward_transient`` is the exponent of vector i. ``diag(C) > 0`` is kept throughout, so
  ``v_i(t)`` has a positive component along ``q_i(t)`` and ``J_t v_i(t-1)`` points along ``+v_i(t)``.

Internal (not a public API).
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._checks import NonFiniteError, Problem
from ._kernels import CACHE_CHUNK_BYTES, factored_pays, linearization_stream, time_chunk_for
from ._linalg import qr
from ._lyapunov_qr import initial_basis

__all__ = [
    "DEFAULT_MAX_MEMORY",
    "RStore",
    "VectorsResult",
    "initial_coefficients",
    "lyapunov_vector_tensors",
    "participation_ratio",
    "subspace_angle",
]

#: bytes of R factors kept in memory before they spill to disk (1 GiB)
DEFAULT_MAX_MEMORY = 2**30


class VectorsResult(NamedTuple):
    """What :func:`lyapunov_vector_tensors` returns (vectors ``(B, n_times, D, k)``, columns = vectors)."""

    backward: Tensor
    """Backward (Gram-Schmidt) vectors: the columns of ``Q_t`` at the requested times."""
    exponents: Tensor
    """``(B, k)``: mean ``log R_ii`` over the steps ``t_s < t <= T`` (the QR exponents, in column order)."""
    covariant: Tensor | None = None
    """Covariant vectors ``V_t = Q_t C_t`` at the requested times (None unless asked for)."""
    covariant_exponents: Tensor | None = None
    """``(B, k)``: mean ``log ||J_t v_i(t-1)||`` over ``t_s < t <= T - backward_transient``."""
    spilled: bool = False
    """Whether the R factors went to disk."""


def initial_coefficients(k: int, generator=None, dtype=torch.float64, device=None, batch: int = 1) -> Tensor:
    """A random upper-triangular ``(k, k)`` matrix with unit columns and a positive diagonal, drawn in float64 on the
    CPU from ``generator`` and shared by every sample: ``(batch, k, k)``.

    Examples
    --------
    >>> c = initial_coefficients(3, torch.Generator().manual_seed(0))[0]
    >>> bool((c.tril(-1) == 0).all()), bool((c.diagonal() > 0).all()), c.norm(dim=0).round(decimals=12).tolist()
    (True, True, [1.0, 1.0, 1.0])
    """
    c = torch.randn(k, k, generator=generator, dtype=torch.float64).triu()
    c.diagonal().abs_().add_(0.1)  # a positive diagonal, away from 0
    c = c / c.norm(dim=0, keepdim=True)
    return c.to(dtype=dtype, device=device).expand(batch, k, k).contiguous()


def participation_ratio(v: Tensor, dim: int = -2) -> Tensor:
    """``(sum v^2)^2 / sum v^4`` along ``dim``: how many coordinates take part in a vector (1 .. D).

    Examples
    --------
    >>> participation_ratio(torch.tensor([[3.0], [3.0], [0.0], [-3.0]])).tolist()
    [3.0]
    """
    sq = v.square()
    return sq.sum(dim).square() / sq.square().sum(dim)


def subspace_angle(v: Tensor, split: Tensor) -> Tensor:
    """The smallest principal angle (radians, in ``[0, pi/2]``) between ``span(v[..., :m])`` and
    ``span(v[..., m:])`` for ``v (N, D, k)`` and ``split`` ``m (N,)``; NaN where ``m`` is 0 or ``k``.

    Both subspaces are orthonormalised (QR); the cosine is the largest singular value of ``U_1^T U_2`` and the sine
    the smallest of ``(I - U_1 U_1^T) U_2`` (Björck & Golub, Math. Comp. 27, 579, 1973), combined with ``atan2`` so
    that small angles (near-tangencies) keep their relative accuracy.

    Examples
    --------
    >>> v = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]], dtype=torch.float64)  # 45 degrees apart
    >>> round(subspace_angle(v, torch.tensor([1])).item() * 4 / torch.pi, 12)
    1.0
    """
    out = torch.full(v.shape[:1], float("nan"), dtype=v.dtype, device=v.device)
    k = v.shape[-1]
    for m in torch.unique(split).tolist():
        if not 0 < m < k:
            continue
        rows = torch.nonzero(split == m).flatten()
        u1, _ = torch.linalg.qr(v[rows, :, :m])
        u2, _ = torch.linalg.qr(v[rows, :, m:])
        cos = torch.linalg.svdvals(u1.mT @ u2)[..., 0]
        sin = torch.linalg.svdvals(u2 - u1 @ (u1.mT @ u2))[..., -1]
        out[rows] = torch.atan2(sin, cos)
    return out


class RStore:
    """The R factors of the forward pass, ``(n, B, k, k)`` for the counted steps, put in step order and read back
    in reverse, chunk by chunk.

    In memory (one tensor on the device) when they fit in ``max_memory`` bytes; otherwise in a ``.npy`` file
    (:func:`numpy.lib.format.open_memmap`) inside a temporary directory under ``spill_dir`` (the system's default
    when None), written and read in chunks of at most ``max_memory`` bytes (one step at least) and removed on
    :meth:`close`. Use it as a context manager.

    Examples
    --------
    >>> with RStore(3, 1, 2, torch.float64, "cpu", max_memory=0) as store:  # always spills
    ...     for t in range(3):
    ...         store.put(torch.full((1, 2, 2), float(t), dtype=torch.float64))
    ...     [(j, rs[:, 0, 0, 0].tolist()) for j, rs in store.reversed_chunks()], store.spilled
    ([(2, [2.0]), (1, [1.0]), (0, [0.0])], True)
    """

    def __init__(self, steps: int, batch: int, k: int, dtype, device, *, max_memory: int, spill_dir=None):
        self.steps, self.dtype, self.device = steps, dtype, device
        per_step = batch * k * k * torch.empty((), dtype=dtype).element_size()
        self.spilled = steps * per_step > max_memory
        self.chunk = max(1, min(steps, max_memory // per_step)) if self.spilled else steps
        self.buffer = torch.empty(self.chunk, batch, k, k, dtype=dtype, device=device)
        self.filled = self.written = 0
        self._dir: tempfile.TemporaryDirectory | None = None
        self.file = None
        if self.spilled:
            self._dir = tempfile.TemporaryDirectory(prefix="rnnjac-clv-", dir=spill_dir)
            path = Path(self._dir.name) / "r_factors.npy"
            np_dtype = torch.empty((), dtype=dtype).numpy().dtype
            self.file = np.lib.format.open_memmap(path, mode="w+", dtype=np_dtype, shape=(steps, batch, k, k))

    def put(self, r: Tensor) -> None:
        """Append the ``(B, k, k)`` factor of the next step."""
        self.buffer[self.filled] = r
        self.filled += 1
        if self.spilled and self.filled == self.chunk:
            self._flush()

    def _flush(self) -> None:
        assert self.file is not None
        n = self.filled
        self.file[self.written : self.written + n] = self.buffer[:n].cpu().numpy()
        self.written += n
        self.filled = 0

    def reversed_chunks(self) -> Iterator[tuple[int, Tensor]]:
        """``(j0, R[j0 : j0 + n])`` from the last steps to the first."""
        if not self.spilled:
            yield 0, self.buffer[: self.filled]
            return
        if self.filled:
            self._flush()
        assert self.file is not None
        for j1 in range(self.written, 0, -self.chunk):
            j0 = max(0, j1 - self.chunk)
            yield j0, torch.from_numpy(np.array(self.file[j0:j1])).to(self.device)

    def close(self) -> None:
        self.file = None  # drop the memory map before its directory goes
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> RStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _qr_positive_full(a: Tensor) -> tuple[Tensor, Tensor]:
    """``qr(a)`` with ``diag(R) >= 0`` (the route and sign rule of :func:`rnnjac._linalg.qr_positive`), full R."""
    q, r = qr(a)
    sign = torch.where(torch.diagonal(r, dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(r.dtype)
    return q * sign.unsqueeze(-2), r * sign.unsqueeze(-1)


class _Forward:
    """The forward QR pass: ``Q`` at the requested times, every counted ``R_t`` into the store, ``sum log R_ii``."""

    def __init__(self, problem: Problem, q0: Tensor, times: list[int], start: int, warmup: int, store: RStore | None):
        self.problem, self.q, self.store = problem, q0, store
        self.warmup, self.start, self.times = warmup, start, set(times)
        self.index = {t: i for i, t in enumerate(times)}
        b, d, k = q0.shape
        self.kept = q0.new_empty(b, len(times), d, k)
        self.log_sum = q0.new_zeros(b, k)
        self.min_diag = q0.new_full((b, k), float("inf"))
        if warmup in self.index:
            self.kept[:, self.index[warmup]] = q0

    def run(self) -> None:
        problem, state = self.problem, self.problem.state
        b, d, k = self.q.shape
        structured = factored_pays(problem, k)
        itemsize = self.q.element_size()  # materialised Jacobians: chunks that stay in cache, as the spectra
        chunk = (
            min(problem.steps, 256)
            if structured
            else time_chunk_for(b, d, problem.steps, CACHE_CHUNK_BYTES // itemsize)
        )
        for part in linearization_stream(problem, chunk):
            n = part.states.shape[1] - 1
            if not bool(part.finite.all()):
                bad = int(torch.nonzero(~part.finite)[0, 0])
                raise NonFiniteError(f"the state becomes NaN/Inf at step t={part.t0 + bad + 1}")
            if structured:
                steps = part.lin.unbind(n)
                applies = [lambda v, lin=lin: lin.apply(v, state) for lin in steps]
            else:
                jac = part.lin.materialize(state).reshape(b, n, d, d)
                applies = [lambda v, jt=jac[:, j]: torch.bmm(jt, v) for j in range(n)]
            for j, apply in enumerate(applies):
                self._step(part.t0 + j + 1, apply)

    def _step(self, t: int, apply) -> None:
        if t <= self.warmup:
            return
        self.q, r = _qr_positive_full(apply(self.q))
        if t > self.start:
            diag = torch.diagonal(r, dim1=-2, dim2=-1)
            self.log_sum += torch.log(diag)
            torch.minimum(self.min_diag, diag, out=self.min_diag)
            if self.store is not None:
                self.store.put(r)
        if t in self.times:
            self.kept[:, self.index[t]] = self.q

    def check(self, collapsed: bool) -> None:
        """Refuse NaN tangents, and with ``collapsed`` directions with ``R_ii = 0`` at some counted step (their
        covariant vectors are undefined)."""
        if bool(torch.isnan(self.min_diag).any()):
            raise NonFiniteError("the tangents J_t Q became NaN/Inf (a non-finite Jacobian, or overflow)")
        bad = ~(self.min_diag > 0)
        if collapsed and bool(bad.any()):
            i = int(torch.nonzero(bad.any(0))[0, 0])
            fix = f"; use k={i} or fewer" if i else ""
            raise NonFiniteError(
                f"the tangent dynamics collapse direction {i + 1} (R_ii = 0 or NaN at some step: an exponent of "
                f"-inf, e.g. saturated or dead units): its covariant Lyapunov vector is undefined{fix}"
            )


def _backward(store: RStore, c: Tensor, forward: _Forward, times: list[int], end: int) -> tuple[Tensor, Tensor]:
    """Ginelli's backward pass from ``C_T = c``: the covariant vectors at ``times`` and the growth exponents."""
    index = {t: i for i, t in enumerate(times)}
    vectors = torch.empty_like(forward.kept)
    log_growth = torch.zeros_like(forward.log_sum)
    start = forward.start
    for j0, rs in store.reversed_chunks():
        for j in range(rs.shape[0] - 1, -1, -1):
            t = start + j0 + j + 1
            if t in index:
                vectors[:, index[t]] = forward.kept[:, index[t]] @ c
            x = torch.linalg.solve_triangular(rs[j], c, upper=True)
            norms = torch.linalg.vector_norm(x, dim=-2)
            c = x / norms.unsqueeze(-2)
            if t <= end:
                log_growth -= torch.log(norms)
    if start in index:
        vectors[:, index[start]] = forward.kept[:, index[start]] @ c
    exponents = log_growth / (end - start)
    if not bool(torch.isfinite(exponents).all()):
        raise NonFiniteError("the backward pass overflowed (R_t nearly singular): use a smaller k or float64")
    return vectors, exponents


def lyapunov_vector_tensors(
    problem: Problem,
    k: int,
    times: list[int],
    *,
    covariant: bool = True,
    warmup: int = 0,
    tangent_warmup: int = 0,
    backward_transient: int = 0,
    generator=None,
    max_memory: int = DEFAULT_MAX_MEMORY,
    spill_dir=None,
) -> VectorsResult:
    """Backward and (``covariant=True``) covariant Lyapunov vectors at ``times`` (sorted step numbers in
    ``[warmup + tangent_warmup, T - backward_transient]``), without gradient; arguments are checked by the caller.

    ``generator`` draws the initial basis (:func:`rnnjac._lyapunov_qr.initial_basis`, as the spectra do) and then
    the initial ``C_T`` (:func:`initial_coefficients`).

    Examples
    --------
    >>> from rnnjac._checks import prepare
    >>> problem = prepare(torch.nn.RNN(1, 6, batch_first=True), torch.randn(2, 40, 1))
    >>> out = lyapunov_vector_tensors(problem, 3, [10, 20], tangent_warmup=10, backward_transient=10)
    >>> out.backward.shape, out.covariant.shape, out.covariant_exponents.shape
    (torch.Size([2, 2, 6, 3]), torch.Size([2, 2, 6, 3]), torch.Size([2, 3]))
    """
    dtype, device = problem.xs.dtype, problem.xs.device
    b, d, steps = problem.batch, problem.dyn.size(problem.state), problem.steps
    start = warmup + tangent_warmup
    q0 = initial_basis(d, k, generator, dtype, device, b)
    c0 = initial_coefficients(k, generator, dtype, device, b) if covariant else None
    with contextlib.ExitStack() as stack, torch.no_grad():
        store = None
        if covariant:
            store = RStore(steps - start, b, k, dtype, device, max_memory=max_memory, spill_dir=spill_dir)
            stack.enter_context(store)
        forward = _Forward(problem, q0, times, start, warmup, store)
        forward.run()
        exponents = forward.log_sum / (steps - start)
        forward.check(collapsed=covariant)
        if store is None or c0 is None:
            return VectorsResult(forward.kept, exponents)
        vectors, growth = _backward(store, c0, forward, times, steps - backward_transient)
        return VectorsResult(forward.kept, exponents, vectors, growth, store.spilled)
