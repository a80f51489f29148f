r"""The tensor core under the labelled layer: the model protocol and tensors in, tensors (or small named tuples) out.

No xarray, no files, no progress bars: progress is a callback ``on_steps(n)`` (called after every ``n`` steps
done) that the labelled layer passes in. :mod:`rnnjac._spectra`, :mod:`rnnjac._verify` and
:mod:`rnnjac.regularizers` turn these results into Datasets or losses. Internal (not a public API).

- the Lyapunov QR pass itself is :mod:`rnnjac._lyapunov_qr` (:class:`~rnnjac._lyapunov_qr.LyapunovQR`);
- :func:`run_states`, :func:`time_chunk_for`: the whole trajectory (checked finite), and how many steps of
  ``(B, D, D)`` Jacobians fit in a memory bound;
- :func:`linearization_stream` (:class:`Chunk`): the trajectory run and linearised one time chunk at a time;
- :func:`step_spectra`: per-step singular values and eigenvalues of materialised ``J_t``;
- :func:`uncertainty_tensors`: the errors, intervals and convergence of the exponents (:mod:`rnnjac._uncertainty`);
- :func:`spectra_tensors`: every spectra variable of one :class:`rnnjac._options.SpectraOptions` as tensors;
- the finite-difference check of :func:`rnnjac.verify` is the kernel :func:`rnnjac._fd.compare_jacobians`.

The rules for ``-inf`` exponents and for the end-to-end product are those of :mod:`rnnjac._linalg`
(:func:`~rnnjac._linalg.collapse_floor`, :class:`~rnnjac._linalg.EndToEnd`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._checks import NonFiniteError, Problem, check_states_finite
from ._dynamics import Linearization
from ._linalg import EndToEnd, kaplan_yorke, svdvals
from ._lyapunov_qr import LyapunovQR, initial_basis
from ._transients import auto_warmup
from ._uncertainty import BlockStats, convergence, lyapunov_uncertainty

__all__ = [
    "Chunk",
    "factored_pays",
    "linearization_stream",
    "run_states",
    "spectra_tensors",
    "step_spectra",
    "time_chunk_for",
    "top_singular_values",
    "uncertainty_tensors",
]

OnSteps = Callable[[int], None]
Apply = Callable[[Tensor], Tensor]

DEFAULT_MAX_CHUNK_ELEMENTS = 2**26  # about 256 MB of float32 Jacobians per chunk
#: the spectra's chunks of materialised ``J_t``: small enough to stay in cache between the write and the bmm
CACHE_CHUNK_BYTES = 2**20


def run_states(problem: Problem) -> Tensor:
    """Full states ``(B, T+1, D)`` of the whole trajectory, checked for NaN/Inf."""
    states = problem.dyn.run(problem.s0, problem.xs)
    check_states_finite(states)
    return states


def time_chunk_for(batch: int, size: int, steps: int, max_elements: int = DEFAULT_MAX_CHUNK_ELEMENTS) -> int:
    """How many steps of ``(B, D, D)`` Jacobians fit in ``max_elements``.

    Examples
    --------
    >>> time_chunk_for(batch=4, size=128, steps=1000, max_elements=2**20)
    16
    """
    return max(1, min(steps, max_elements // max(1, batch * size * size)))


def factored_pays(problem: Problem, k: int) -> bool:
    """Whether a tangent block of ``k`` columns is pushed through ``J_t`` by the factored linearisation (GEMMs with
    the shared weights, no ``J_t`` formed) rather than a materialised ``J_t`` and one ``bmm``: for narrow blocks
    (``16 k <= D``), and at any width when the factored product is no more GEMM work (an Elman RNN); for wide
    blocks of gated cells materialising is faster (analyses/benchmark_spectra.py)."""
    dyn = problem.dyn
    narrow = k * 16 <= dyn.size(problem.state) or dyn.factored_apply_cheap(problem.method)
    return dyn.factored(problem.method) and narrow


# ----------------------------------------------------------------------------- the stream of linearisations
class Chunk(NamedTuple):
    """One time chunk of :func:`linearization_stream`: steps ``t0 + 1 .. t0 + n``."""

    t0: int
    states: Tensor
    """``(B, n + 1, D)``: ``s_{t0} .. s_{t0 + n}`` (full state)."""
    lin: Linearization
    """``J_t`` at the chunk's ``B * n`` points, batch-major (``lin.unbind(n)`` gives the steps)."""
    finite: Tensor
    """``(n,)`` bool: every state of the step is finite."""


def linearization_stream(
    problem: Problem,
    time_chunk: int,
    *,
    chunk_size: int | None = None,
    start: int = 0,
    s_start: Tensor | None = None,
    states: Tensor | None = None,
) -> Iterator[Chunk]:
    """Run the trajectory ``time_chunk`` steps at a time and linearise each chunk in one batched call.

    Memory is that of one chunk; states are not checked here (``Chunk.finite`` says where they are finite).
    Runs in the caller's grad mode at each ``next()`` (so a differentiable stream keeps the graph of every step
    so far); ``chunk_size`` goes to ``torch.func.jacrev`` (autograd method). ``start``: the first chunk begins at
    step ``start + 1``, from ``s_start`` (the state ``s_start``; ``problem.s0`` when ``start=0``); ``states``: the
    whole trajectory ``(B, T+1, D)`` already run (then nothing is run again).
    """
    dyn, xs, b = problem.dyn, problem.xs, problem.batch
    s = problem.s0 if s_start is None else s_start
    for t0 in range(start, problem.steps, time_chunk):
        t1 = min(problem.steps, t0 + time_chunk)
        n = t1 - t0
        chunk = dyn.run(s, xs[:, t0:t1]) if states is None else states[:, t0 : t1 + 1]
        finite = torch.isfinite(chunk[:, 1:]).flatten(2).all(-1).all(0)
        s = chunk[:, -1]
        s_prev, x = chunk[:, :-1].reshape(b * n, -1), xs[:, t0:t1].reshape(b * n, -1)
        lin = dyn.linearize(s_prev, x, problem.method, chunk_size=chunk_size)
        yield Chunk(t0, chunk, lin, finite)


def step_spectra(jac: Tensor, *, singular_values: bool = True, eigenvalues: bool = False) -> dict[str, Tensor]:
    """Per-matrix spectra of ``jac (N, D, D)``: ``singular_values`` (descending), ``eigenvalues_real`` and
    ``eigenvalues_imag`` (by modulus, descending), each ``(N, D)``, and ``spectral_radius`` ``(N,)``.

    Examples
    --------
    >>> out = step_spectra(torch.diag(torch.tensor([1.0, -3.0]))[None], eigenvalues=True)
    >>> out["singular_values"].tolist(), out["eigenvalues_real"].tolist(), out["spectral_radius"].tolist()
    ([[3.0, 1.0]], [[-3.0, 1.0]], [3.0])
    """
    out = {}
    if singular_values:
        out["singular_values"] = svdvals(jac)
    if eigenvalues:
        ev = torch.linalg.eigvals(jac)
        order = torch.argsort(ev.abs(), dim=-1, descending=True)
        ev = torch.gather(ev, -1, order)
        out["eigenvalues_real"] = ev.real
        out["eigenvalues_imag"] = ev.imag
        out["spectral_radius"] = ev[..., 0].abs()
    return out


def top_singular_values(
    lin: Linearization, k: int, state: str = "full", *, tol: float | None = None, max_blocks: int | None = None
) -> Tensor:
    """The ``k`` largest singular values ``(N, k)`` (descending) of the ``N`` maps ``J`` of ``lin``: block Krylov on
    ``J^T J`` (Musco & Musco 2015, "Randomized block Krylov methods for stronger and faster approximate singular
    value decomposition", NeurIPS), with Rayleigh-Ritz. The products are ``lin.apply`` and ``lin.apply_transpose``
    (never forming ``J``) for a stack or a projection, whose ``J`` has matrix products in it; a single layer's ``J``
    is its weight blocks scaled by rows, formed once and then applied by ``bmm`` (:func:`_products`).

    The basis ``K = [V_0, V_1, ...]`` (blocks of ``w = 2k`` columns, ``V_{i+1}`` the orthonormalised
    ``J^T J V_i``, ``V_0`` a fixed random block) is orthonormal, so the singular values of ``J K = [J V_0, J V_1,
    ...]`` (known from the products already taken) are the Ritz values; they increase monotonically to the true
    ones. Their squares are the eigenvalues of the Gram matrix ``(J K)^T (J K) = K^T J^T J K``, which is banded
    (block Lanczos: ``J^T J V_i`` lies in the span of ``V_0..V_{i+1}``, with an upper triangular coupling to
    ``V_{i+1}``, so the lower bandwidth is ``w``): only its band is formed and stored (each block against itself and
    the block before), and on the CPU its top ``k`` eigenvalues come from LAPACK's banded solver
    (:func:`scipy.linalg.eig_banded`, O(m^2 w) for ``m`` columns instead of O(m^3)); the entries outside the band
    are rounding (``u ||J||^2``). The loop stops when the top ``k`` change by less than
    ``tol`` (relative to the largest; default ``100 u``, ``u`` the unit round-off) between two checks (every other
    block: the changes do not fall geometrically enough to predict further), or at ``max_blocks`` blocks (default:
    ``D / w``, the whole space). The basis lives in a preallocated buffer, the Gram in float64.

    Examples
    --------
    >>> from rnnjac._dynamics import as_dynamics
    >>> gru = as_dynamics(torch.nn.GRU(2, 64).double())
    >>> lin = gru.linearize(torch.randn(3, 64, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64))
    >>> top = top_singular_values(lin, 4)
    >>> full = torch.linalg.svdvals(lin.materialize())[:, :4]
    >>> bool(torch.allclose(top, full, rtol=1e-10, atol=0))
    True
    """
    n, d = lin.s.shape[0], lin.layout.size(state)
    dtype, device = lin.s.dtype, lin.s.device
    tol = 100 * torch.finfo(dtype).eps if tol is None else tol
    width = min(d, 2 * k)  # block width: the top k converge at the rate of the gap to sigma_{2k}
    max_blocks = max_blocks or math.ceil(d / width)  # the last block may be narrower
    cols = min(d, max_blocks * width)
    basis = torch.empty(n, d, cols, dtype=dtype, device=device)  # K, orthonormal
    # the band of (J K)^T (J K) in LAPACK's lower band storage: band[:, o, j] = G[j + o, j]
    band = torch.zeros(n, width + 1, cols, dtype=torch.float64, device=device)
    v = initial_basis(d, width, torch.Generator().manual_seed(0), dtype, device, n)
    m, blocks, prev, before = 0, 0, None, None  # before: J V of the previous block (float64)
    with torch.no_grad():
        apply, apply_transpose = _products(lin, state)
        while True:
            w_new = v.shape[-1]
            u = apply(v)
            basis[..., m : m + w_new] = v
            wide = u.double()
            _add_to_band(band, m, wide, before)
            m, blocks, before = m + w_new, blocks + 1, wide
            last = blocks == max_blocks or m == d  # (m == d: the whole space is spanned, the values are exact)
            if blocks % 2 == 0 or last:  # Ritz values every other block
                vals = _ritz_values(band[..., :m], k)
                if last or (prev is not None and bool(((vals - prev).abs() <= tol * vals[:, :1]).all())):
                    return vals.to(dtype)
                prev = vals
            v = _orthonormal_block(apply_transpose(u), basis[..., :m])


def _products(lin: Linearization, state: str) -> tuple[Apply, Apply]:
    """``V -> J V`` and ``U -> J^T U`` for the Krylov loop: with ``J`` formed once where that costs no matrix
    product (:attr:`~rnnjac._linearization.Linearization.forms_cheaply`: one ``bmm`` per block, against a GEMM per
    gate block of the factored form, 3-4x the work), else the factored products."""
    if lin.forms_cheaply:
        jac = lin.materialize(state)
        return (lambda v: jac @ v), (lambda u: jac.mT @ u)
    return (lambda v: lin.apply(v, state)), (lambda u: lin.apply_transpose(u, state))


def _add_to_band(band: Tensor, m: int, images: Tensor, before: Tensor | None) -> None:
    """Write the Gram rows of a new Krylov block (columns ``m..``, images ``J V`` ``(N, D, w)``, float64) into the
    lower band storage ``band (N, bw + 1, cols)``: the block against itself and against the block ``before`` (whose
    coupling is upper triangular, so it lies within the band; older blocks lie outside it)."""
    w_prev = 0 if before is None else before.shape[-1]
    rows = images.mT @ images  # (N, w, w_prev + w) with the coupling to the block before on its left
    if before is not None:
        rows = torch.cat([images.mT @ before, rows], -1)
    for off in range(band.shape[1]):  # the diagonal at distance off below the main one
        k = w_prev - off
        diag = torch.diagonal(rows, offset=k, dim1=-2, dim2=-1)
        start = m - w_prev + max(k, 0)
        band[:, off, start : start + diag.shape[-1]] = diag


def _ritz_values(band: Tensor, k: int) -> Tensor:
    """The square roots of the ``k`` largest eigenvalues ``(N, k)``, descending, of the symmetric banded matrices
    given in lower band storage ``band (N, bw + 1, m)``: LAPACK's banded solver on the CPU (scipy), ``eigvalsh`` of
    the dense matrices elsewhere or when the band is most of the matrix."""
    n, rows, m = band.shape
    k = min(k, m)
    if band.device.type != "cpu" or m <= 4 * (rows - 1):
        dense = band.new_zeros(n, m, m)
        for off in range(min(rows, m)):
            torch.diagonal(dense, offset=-off, dim1=-2, dim2=-1).copy_(band[:, off, : m - off])
        return torch.linalg.eigvalsh(dense, UPLO="L").flip(-1)[:, :k].clamp(min=0).sqrt()
    import scipy.linalg  # noqa: PLC0415 - only here: importing rnnjac does not load scipy.linalg

    out = np.empty((n, k))
    for i, lower in enumerate(band.numpy()):
        values = scipy.linalg.eig_banded(lower, lower=True, eigvals_only=True, select="i", select_range=(m - k, m - 1))
        out[i] = values[::-1]
    return torch.from_numpy(out).clamp(min=0).sqrt()


def _orthonormal_block(w: Tensor, basis: Tensor) -> Tensor:
    """``w`` made orthogonal to the orthonormal ``basis`` (two block Gram-Schmidt passes) and orthonormalised,
    cut to the columns the space still has room for (the basis does not fill it); then projected and
    orthonormalised once more: when ``w`` is rank deficient (a low-rank ``J``, e.g. a ReLU RNN with dead units)
    its QR's extra columns are normalised rounding, which points anywhere, the old basis included. The coupling to
    the new block stays upper triangular (a product of the two QRs' ``R``)."""
    w = w[..., : basis.shape[-2] - basis.shape[-1]]
    for _ in range(2):
        w = w - basis @ (basis.mT @ w)
    q, _ = torch.linalg.qr(w)
    q, _ = torch.linalg.qr(q - basis @ (basis.mT @ q))
    return q


def _raise_first_bad(ok: Tensor, t0: int, what: str) -> None:
    bad = torch.nonzero(~ok)
    if len(bad):
        raise NonFiniteError(f"{what} at step t={t0 + int(bad[0, 0]) + 1}")


# ----------------------------------------------------------------------------- spectra
def spectra_tensors(problem: Problem, options, *, generator=None, on_steps: OnSteps | None = None) -> dict:
    """Every variable that ``options`` (a :class:`rnnjac._options.SpectraOptions`) asks for, as tensors.

    Checks ``options`` against ``problem`` first (:meth:`SpectraOptions.check`); runs without gradient. Keys are
    those of :data:`rnnjac._datasets.VARIABLES` (``(B, T, ...)`` per step, ``(B, k)`` exponents), plus ``"attrs"``
    when the pass chose or measured something (``warmup_used`` with ``warmup="auto"``, the QR pass's
    :attr:`~rnnjac._lyapunov_qr.LyapunovResult.attrs`) for the Dataset's attributes; ``generator`` seeds the
    initial tangent basis (``options.seed`` is not read here); ``on_steps(n)`` reports progress after every step
    of the sequential tangent loop, or every chunk when there is none (the warm-up at once).

    The ``warmup`` steps run the state alone (no linearisation) unless a per-step output needs their ``J_t``.

    Examples
    --------
    >>> from rnnjac._checks import prepare
    >>> from rnnjac._options import SpectraOptions
    >>> problem = prepare(torch.nn.GRU(2, 4, batch_first=True), torch.randn(3, 20, 2))
    >>> out = spectra_tensors(problem, SpectraOptions(k=2), generator=torch.Generator().manual_seed(0))
    >>> out["singular_values"].shape, out["lyapunov_exponents"].shape
    (torch.Size([3, 20, 4]), torch.Size([3, 2]))
    """
    options.check(problem)
    with torch.no_grad():
        run = _SpectraPass(problem, options, generator, on_steps)
        for chunk in run.stream():
            run.consume(chunk)
        return run.finish()


class _SpectraPass:
    """The state of one :func:`spectra_tensors` pass: output buffers, the QR accumulator, the end-to-end product."""

    def __init__(self, problem: Problem, options, generator, on_steps: OnSteps | None):
        dyn, xs = problem.dyn, problem.xs
        self.problem, self.options, self.on_steps = problem, options, on_steps
        self.b, self.steps, self.d = problem.batch, problem.steps, dyn.size(problem.state)
        k = self.d if options.k is None else options.k
        sv = options.singular_values
        self.top_sv = None if isinstance(sv, bool) or sv >= self.d else int(sv)  # Krylov top-k per step
        self.per_step = bool(sv) or options.eigenvalues
        self.sequential = options.lyapunov or options.end_to_end  # a sequential per-step loop reports each step
        self.structured = (not options.end_to_end) and factored_pays(problem, k)
        dense_sv = bool(sv) and self.top_sv is None
        self.materialise = dense_sv or options.eigenvalues or (self.sequential and not self.structured)
        # a wide factored chain (k > D/16) runs in the dtype of a dense one (LyapunovQR.chain_dtype, "wide=True")
        self.widen_factored = k * 16 > self.d
        self.attrs: dict = {}
        self.states: Tensor | None = None  # the whole trajectory, when warmup="auto" ran it first
        self.warmup = self._resolve_warmup()
        # only the Lyapunov pass uses the warm-up: its steps are run, not linearised, unless another output needs J_t
        self.start = self.warmup if options.lyapunov and not (self.per_step or options.end_to_end) else 0
        self.chunk = self._chunk_length()
        self.out: dict[str, Tensor] = {}
        self.lyap: LyapunovQR | None = None
        self.e2e: EndToEnd | None = None
        self._allocate(k, generator, xs.dtype, xs.device)

    def _resolve_warmup(self) -> int:
        """``options.warmup``, or for ``"auto"`` the MSER warm-up of the whole trajectory (run once, kept)."""
        opts = self.options
        if opts.warmup != "auto":
            return opts.warmup
        self.states = run_states(self.problem)
        fixed = opts.tangent_warmup if isinstance(opts.tangent_warmup, int) else 0
        warmup = auto_warmup(self.states, max(0, self.steps - fixed - 1))
        self.attrs["warmup_used"] = warmup
        return warmup

    def _chunk_length(self) -> int:
        b, d, steps, time_chunk = self.b, self.d, self.steps, self.options.time_chunk
        itemsize = self.problem.xs.element_size()
        if time_chunk:
            n_chunk = time_chunk
        elif self.materialise or self.top_sv is not None:  # Jacobians (or Krylov bases) that stay in cache
            n_chunk = time_chunk_for(b, d, steps, CACHE_CHUNK_BYTES // itemsize)
            # small models: at least 64 steps a chunk while that stays within 8 cache chunks (each chunk has a
            # fixed cost; a rate network with B=1, D=100 ran 20% faster with 64 steps than with 13)
            n_chunk = max(n_chunk, min(steps, 64, time_chunk_for(b, d, steps, 8 * CACHE_CHUNK_BYTES // itemsize)))
        else:
            n_chunk = min(steps, 256)
        if self.on_steps is not None and not self.sequential and time_chunk is None:
            n_chunk = min(n_chunk, max(1, math.ceil(steps / 100)))  # per-step spectra only: report every ~1%
        return n_chunk

    def _allocate(self, k: int, generator, dtype, device) -> None:
        opts, out, b, steps, d = self.options, self.out, self.b, self.steps, self.d

        def empty(*shape):
            return torch.empty(*shape, dtype=dtype, device=device)

        if opts.singular_values:
            out["singular_values"] = empty(b, steps, self.top_sv or d)
        if opts.eigenvalues:
            out["eigenvalues_real"], out["eigenvalues_imag"] = empty(b, steps, d), empty(b, steps, d)
            out["spectral_radius"] = empty(b, steps)
        if opts.keep_states:
            out["states"] = empty(b, steps, d)
            self.h_idx = self.problem.dyn.h_index(device)
        if opts.lyapunov:
            q0 = initial_basis(d, k, generator, dtype, device, b)
            self.lyap = LyapunovQR(
                q0,
                steps,
                warmup=self.warmup,
                tangent_warmup=opts.tangent_warmup,
                reortho_every=opts.reortho_every,
                local=opts.local_lyapunov,
                blocks=opts.ci is not None,
            )
            if opts.local_lyapunov:
                out["local_lyapunov"] = self.lyap.local  # replaced by the sorted values at the end
        if opts.end_to_end:
            self.e2e = EndToEnd(b, d, dtype, device)
            out["end_to_end_log_singular_values"] = empty(b, steps, d)

    def stream(self) -> Iterator[Chunk]:
        """The chunks to consume: the steps after :attr:`start` (those before it are run here, state only)."""
        problem, start, s_start = self.problem, self.start, None
        if start:
            if self.states is not None:
                pre = self.states[:, : start + 1]
            else:
                pre = problem.dyn.run(problem.s0, problem.xs[:, :start])
                check_states_finite(pre)
            self._store_states(0, pre[:, 1:])
            s_start = pre[:, -1]
            if self.on_steps is not None:
                self.on_steps(start)
        return linearization_stream(problem, self.chunk, start=start, s_start=s_start, states=self.states)

    def _store_states(self, t0: int, new: Tensor) -> None:
        if self.options.keep_states:
            n = new.shape[1]
            self.out["states"][:, t0 : t0 + n] = new if self.problem.state == "full" else new[..., self.h_idx]

    def consume(self, chunk: Chunk) -> None:
        """Fill the outputs for the chunk's steps (raises :class:`NonFiniteError` at the first bad step)."""
        opts, out, state, b = self.options, self.out, self.problem.state, self.b
        t0, n, ok = chunk.t0, chunk.states.shape[1] - 1, chunk.finite
        self._store_states(t0, chunk.states[:, 1:])
        jac = None
        if self.materialise:
            jac = chunk.lin.materialize(state)
            # one reading pass: a NaN/Inf entry makes its matrix's sum non-finite
            ok &= torch.isfinite(jac.sum((-2, -1))).reshape(b, n).all(0)
            _raise_first_bad(ok, t0, "the state or Jacobian J_t is NaN/Inf")
        if self.per_step:
            dense_sv = bool(opts.singular_values) and self.top_sv is None
            values = {}
            if jac is not None:
                values = step_spectra(jac, singular_values=dense_sv, eigenvalues=opts.eigenvalues)
            if self.top_sv is not None:  # a non-finite state is reported before the Krylov solve meets it
                _raise_first_bad(ok, t0, "the state or Jacobian J_t is NaN/Inf")
                values["singular_values"] = v = top_singular_values(chunk.lin, self.top_sv, state)
                ok &= torch.isfinite(v).reshape(b, n, -1).all(-1).all(0)
            for name, v in values.items():
                out[name][:, t0 : t0 + n] = v.reshape(b, n, *v.shape[1:])
        if self.sequential:
            self._tangents(chunk.lin, jac, t0, n, ok)
        _raise_first_bad(ok, t0, "the state or tangent J_t Q is NaN/Inf")
        if self.on_steps is not None and not self.sequential:
            self.on_steps(n)

    def _tangents(self, lin: Linearization, jac: Tensor | None, t0: int, n: int, ok: Tensor) -> None:
        """The sequential part, one step at a time on the chunk's precomputed ``J_t`` (or factored pieces):
        ``apply`` is a bound ``bmm`` (or ``apply``) per step, made once per chunk."""
        state, lyap, e2e, on_steps = self.problem.state, self.lyap, self.e2e, self.on_steps
        wide = False
        if self.structured:
            if lyap is not None and e2e is None and self.widen_factored and lyap.chain_dtype != lin.s.dtype:
                lin, wide = lin.to(lyap.chain_dtype), True  # the chain runs in float64
            applies = [partial(lin_t.apply, state=state) for lin_t in lin.unbind(n)]
            matrices = [None] * n
        else:
            assert jac is not None
            matrices = jac.reshape(self.b, n, self.d, self.d).unbind(1)
            applies = [partial(torch.bmm, jt) for jt in matrices]
        e2e_out = self.out.get("end_to_end_log_singular_values")
        for j, (apply, matrix) in enumerate(zip(applies, matrices, strict=True)):
            t = t0 + j + 1
            if lyap is not None:
                finite = lyap.step(t, apply, matrix=matrix, wide=wide)
                if finite is not None:
                    ok[j] &= finite
            if e2e is not None:
                e2e.update(apply(e2e.q))
                e2e_out[:, t - 1] = e2e.log_singular_values()
            if on_steps is not None:
                on_steps(1)

    def finish(self) -> dict:
        out: dict = self.out
        attrs = dict(self.attrs)
        if self.lyap is not None:
            result = self.lyap.result()
            attrs.update(getattr(result, "attrs", None) or {})
            out["lyapunov_exponents"] = result.exponents
            if result.local is not None:
                out["local_lyapunov"] = result.local
            out["kaplan_yorke_dimension"] = kaplan_yorke(result.exponents)
            out["ks_entropy"] = result.exponents.clamp(min=0).sum(-1)
            if result.blocks is not None:
                seed = 0 if self.options.seed is None else self.options.seed
                out.update(uncertainty_tensors(result.exponents, result.blocks, self.options.ci, seed))
        if attrs:
            out["attrs"] = attrs
        return out


def uncertainty_tensors(exponents: Tensor, blocks: BlockStats, ci: float, seed: int) -> dict[str, Tensor]:
    """The uncertainty and convergence variables of :data:`rnnjac._datasets.VARIABLES` (float64, int64 and int8
    tensors on the CPU) from the exponents ``(B, k)`` and their streamed block sums."""
    u = lyapunov_uncertainty(exponents, blocks, ci=ci, seed=seed)
    conv = convergence(blocks, exponents.detach().cpu())
    out = {"lyapunov_block_length": u.block_length, "lyapunov_stderr_source": u.method}
    for prefix, est in (
        ("lyapunov_exponents", u.exponents),
        ("kaplan_yorke_dimension", u.kaplan_yorke),
        ("ks_entropy", u.entropy),
    ):
        out[f"{prefix}_mean"], out[f"{prefix}_stderr"] = est.mean, est.stderr
        out[f"{prefix}_bounds"] = torch.stack([est.lower, est.upper])
    out["lyapunov_converged"] = conv.converged.to(torch.int8)
    out["lyapunov_more_steps"] = conv.more_steps
    return out
