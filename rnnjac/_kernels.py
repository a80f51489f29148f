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
from typing import NamedTuple

import torch
from torch import Tensor

from ._checks import NonFiniteError, Problem, check_states_finite
from ._dynamics import Linearization
from ._linalg import EndToEnd, kaplan_yorke, svdvals
from ._lyapunov_qr import LyapunovQR, initial_basis
from ._uncertainty import BlockStats, convergence, lyapunov_uncertainty

__all__ = [
    "Chunk",
    "linearization_stream",
    "run_states",
    "spectra_tensors",
    "step_spectra",
    "time_chunk_for",
    "uncertainty_tensors",
]

OnSteps = Callable[[int], None]
Apply = Callable[[Tensor], Tensor]

DEFAULT_MAX_CHUNK_ELEMENTS = 2**26  # about 256 MB of float32 Jacobians per chunk


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


def linearization_stream(problem: Problem, time_chunk: int, *, chunk_size: int | None = None) -> Iterator[Chunk]:
    """Run the trajectory ``time_chunk`` steps at a time and linearise each chunk in one batched call.

    Memory is that of one chunk; states are not checked here (``Chunk.finite`` says where they are finite).
    Runs in the caller's grad mode at each ``next()`` (so a differentiable stream keeps the graph of every step
    so far); ``chunk_size`` goes to ``torch.func.jacrev`` (autograd method).
    """
    dyn, xs, b = problem.dyn, problem.xs, problem.batch
    s = problem.s0
    for t0 in range(0, problem.steps, time_chunk):
        t1 = min(problem.steps, t0 + time_chunk)
        n = t1 - t0
        chunk = dyn.run(s, xs[:, t0:t1])
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


def _raise_first_bad(ok: Tensor, t0: int, what: str) -> None:
    bad = torch.nonzero(~ok)
    if len(bad):
        raise NonFiniteError(f"{what} at step t={t0 + int(bad[0, 0]) + 1}")


# ----------------------------------------------------------------------------- spectra
def spectra_tensors(problem: Problem, options, *, generator=None, on_steps: OnSteps | None = None) -> dict:
    """Every variable that ``options`` (a :class:`rnnjac._options.SpectraOptions`) asks for, as tensors.

    Checks ``options`` against ``problem`` first (:meth:`SpectraOptions.check`); runs without gradient. Keys are
    those of :data:`rnnjac._datasets.VARIABLES` (``(B, T, ...)`` per step, ``(B, k)`` exponents); ``generator``
    seeds the initial tangent basis (``options.seed`` is not read here); ``on_steps(n)`` reports progress
    after every step of the sequential tangent loop, or every chunk when there is none.

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
        for chunk in linearization_stream(problem, run.chunk):
            run.consume(chunk)
        return run.finish()


class _SpectraPass:
    """The state of one :func:`spectra_tensors` pass: output buffers, the QR accumulator, the end-to-end product."""

    def __init__(self, problem: Problem, options, generator, on_steps: OnSteps | None):
        dyn, xs = problem.dyn, problem.xs
        self.problem, self.options, self.on_steps = problem, options, on_steps
        self.b, self.steps, self.d = problem.batch, problem.steps, dyn.size(problem.state)
        k = self.d if options.k is None else options.k
        self.per_step = options.singular_values or options.eigenvalues
        self.sequential = options.lyapunov or options.end_to_end  # a sequential per-step loop reports each step
        # J Q with the shared weights wins for narrow tangent blocks; for wide ones (k > D/16, and the
        # end-to-end product) materialising J_t and one bmm is faster (analyses/benchmark_spectra.py)
        self.structured = (not options.end_to_end) and dyn.factored(problem.method) and k * 16 <= self.d
        self.materialise = self.per_step or (self.sequential and not self.structured)
        self.chunk = self._chunk_length()
        self.out: dict[str, Tensor] = {}
        self.lyap: LyapunovQR | None = None
        self.e2e: EndToEnd | None = None
        self._allocate(k, generator, xs.dtype, xs.device)

    def _chunk_length(self) -> int:
        b, d, steps, time_chunk = self.b, self.d, self.steps, self.options.time_chunk
        n_chunk = time_chunk or (time_chunk_for(b, d, steps, 2**24) if self.materialise else min(steps, 256))
        if self.on_steps is not None and not self.sequential and time_chunk is None:
            n_chunk = min(n_chunk, max(1, math.ceil(steps / 100)))  # per-step spectra only: report every ~1%
        return n_chunk

    def _allocate(self, k: int, generator, dtype, device) -> None:
        opts, out, b, steps, d = self.options, self.out, self.b, self.steps, self.d

        def empty(*shape):
            return torch.empty(*shape, dtype=dtype, device=device)

        if opts.singular_values:
            out["singular_values"] = empty(b, steps, d)
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
                warmup=opts.warmup,
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

    def consume(self, chunk: Chunk) -> None:
        """Fill the outputs for the chunk's steps (raises :class:`NonFiniteError` at the first bad step)."""
        opts, out, state, b = self.options, self.out, self.problem.state, self.b
        t0, n, ok = chunk.t0, chunk.states.shape[1] - 1, chunk.finite
        if opts.keep_states:
            new = chunk.states[:, 1:]
            out["states"][:, t0 : t0 + n] = new if state == "full" else new.index_select(-1, self.h_idx)
        jac = None
        if self.materialise:
            jac = chunk.lin.materialize(state)
            # one reading pass: a NaN/Inf entry makes its matrix's sum non-finite
            ok &= torch.isfinite(jac.sum((-2, -1))).reshape(b, n).all(0)
            _raise_first_bad(ok, t0, "the state or Jacobian J_t is NaN/Inf")
        if self.per_step:
            assert jac is not None
            values = step_spectra(jac, singular_values=opts.singular_values, eigenvalues=opts.eigenvalues)
            for name, v in values.items():
                out[name][:, t0 : t0 + n] = v.reshape(b, n, *v.shape[1:])
        if self.sequential:
            self._tangents(chunk.lin, jac, t0, n, ok)
        _raise_first_bad(ok, t0, "the state or tangent J_t Q is NaN/Inf")
        if self.on_steps is not None and not self.sequential:
            self.on_steps(n)

    def _tangents(self, lin: Linearization, jac: Tensor | None, t0: int, n: int, ok: Tensor) -> None:
        state, lyap, e2e = self.problem.state, self.lyap, self.e2e
        step_lins = lin.unbind(n) if self.structured else None
        jac_steps = jac.reshape(self.b, n, self.d, self.d) if jac is not None else None
        for j in range(n):
            t = t0 + j + 1
            if step_lins is not None:
                apply = lambda v, lin_t=step_lins[j]: lin_t.apply(v, state)  # noqa: E731
            else:
                assert jac_steps is not None
                apply = lambda v, jt=jac_steps[:, j]: torch.bmm(jt, v)  # noqa: E731
            if lyap is not None:
                finite = lyap.step(t, apply)
                if finite is not None:
                    ok[j] &= finite
            if e2e is not None:
                e2e.update(apply(e2e.q))
                self.out["end_to_end_log_singular_values"][:, t - 1] = e2e.log_singular_values()
            if self.on_steps is not None:
                self.on_steps(1)

    def finish(self) -> dict[str, Tensor]:
        out = self.out
        if self.lyap is not None:
            result = self.lyap.result()
            out["lyapunov_exponents"] = result.exponents
            if result.local is not None:
                out["local_lyapunov"] = result.local
            out["kaplan_yorke_dimension"] = kaplan_yorke(result.exponents)
            out["ks_entropy"] = result.exponents.clamp(min=0).sum(-1)
            if result.blocks is not None:
                seed = 0 if self.options.seed is None else self.options.seed
                out.update(uncertainty_tensors(result.exponents, result.blocks, self.options.ci, seed))
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
