r"""Spectra of the step Jacobians: singular values, eigenvalues, Lyapunov exponents, end-to-end.

Lyapunov exponents (Benettin et al. 1980; Shimada & Nagashima 1979), in nats per step:

    Q_0 random orthonormal (D, k);   Q_t R_t = qr(J_t Q_{t-1}),  diag(R_t) > 0
    lambda_i = (1 / n) sum_{counted t} log R_t[i, i]

with tangents propagated as ``Q <- J_t Q`` (never ``J^T Q``), ``warmup`` steps of the state alone
first, then ``tangent_warmup`` steps of tangent evolution that are not counted, then ``n`` counted
steps. With ``reortho_every = m`` the QR happens every m steps (and at the end of each phase); the
growth over the m steps is then counted at once. ``local_lyapunov`` stores ``log R_ii / m`` at each
QR step (NaN elsewhere). Only ``diag(R)`` is kept.

Singular dynamics (the same rule in float32 and float64, :func:`rnnjac._linalg.collapse_floor`): an
exponent is ``-inf`` when its growth ``R_ii`` was at or below the floor ``||J_t Q||_F (2**-22 sqrt(D))**m``
(a QR block of m steps) at *every* counted QR. Below that floor float32 cannot tell a growth from an
exact collapse (a saturated tanh or sigmoid unit's derivative is exactly 0 in float32 once ``|a| > 9``,
in float64 only once ``|a| > 19``), so the count of ``-inf`` is the same in both dtypes: ``W_hh = 0``
gives D of them, a linear system with one zero eigenvalue one. A direction that collapses only at some
steps keeps a finite exponent: a growth of exactly 0 at such a step counts as the floor, any other
growth as its own log (so regular results are unchanged). ``kaplan_yorke_dimension`` uses the finite
exponents (a ``-inf`` next exponent adds nothing) and ``ks_entropy`` sums the positive ones.

End-to-end singular values are those of ``ds_t/ds_0 = J_t ... J_1`` for every t, kept in the
overflow-free form of :class:`rnnjac._linalg.EndToEnd` and stored as natural logs only
(``end_to_end_log_singular_values``, in nats) because the values themselves leave the float64 range
after a few hundred steps of a chaotic model: ``numpy.exp`` of the variable gives the linear values,
which underflow to 0 below about 1e-308 (-709 nats) and overflow above 1e308. A direction that a step
maps exactly to zero (zero rows of ``J_t``: dead ReLU units, saturated units whose derivative is exactly
0 in the working dtype, zero weights) reads ``-inf`` from that step on; the others stay finite.

Time is processed in chunks: one batched linearisation per chunk, then the sequential tangent
updates use the factored ``J Q`` (one shared GEMM per weight matrix).
Memory is O(B T D) for per-step spectra and constant in T for exponents alone. ``progress=True``
advances a bar after every step of the sequential loop (or every chunk when there is none).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
import xarray as xr
from tqdm.auto import tqdm

from ._checks import NonFiniteError, check_lyapunov_options, prepare
from ._linalg import EndToEnd, collapse_floor, kaplan_yorke, qr_positive, qr_schedule, svdvals
from .datasets import build_dataset
from .jacobians import time_chunk_for

__all__ = ["spectra", "lyapunov_spectrum"]


def _first_bad(ok: torch.Tensor, t0: int) -> int | None:
    bad = torch.nonzero(~ok)
    return None if len(bad) == 0 else t0 + int(bad[0, 0]) + 1


def _compute(
    problem,
    *,
    singular_values: bool,
    eigenvalues: bool,
    lyapunov: bool,
    k: int | None,
    warmup: int,
    tangent_warmup: int,
    reortho_every: int,
    end_to_end: bool,
    keep_states: bool,
    local_lyapunov: bool,
    generator,
    advance: Callable[[int], None] | None,
    time_chunk: int | None,
) -> dict:
    """The spectra as tensors; ``advance(n)``, when given, is called after every n steps done (progress)."""
    dyn, state, xs = problem.dyn, problem.state, problem.xs
    b, steps, d = problem.batch, problem.steps, dyn.size(state)
    dtype, device = xs.dtype, xs.device
    k = d if k is None else k
    out: dict[str, torch.Tensor] = {}
    per_step = singular_values or eigenvalues
    # J Q with the shared weights wins for narrow tangent blocks; for wide ones (k > D/16, and the
    # end-to-end product) materialising J_t and one bmm is faster (analyses/benchmark_spectra.py)
    structured = (not end_to_end) and problem.method == "analytic" and dyn.custom is None and k * 16 <= d
    materialise = per_step or ((lyapunov or end_to_end) and not structured)
    n_chunk = time_chunk or (time_chunk_for(b, d, steps, 2**24) if materialise else min(steps, 256))
    stepwise = lyapunov or end_to_end  # a sequential per-step loop reports each step
    if advance is not None and not stepwise and time_chunk is None:
        n_chunk = min(n_chunk, max(1, math.ceil(steps / 100)))  # per-step spectra only: report every ~1%
    if singular_values:
        out["singular_values"] = torch.empty(b, steps, d, dtype=dtype, device=device)
    if eigenvalues:
        out["eigenvalues_real"] = torch.empty(b, steps, d, dtype=dtype, device=device)
        out["eigenvalues_imag"] = torch.empty(b, steps, d, dtype=dtype, device=device)
        out["spectral_radius"] = torch.empty(b, steps, dtype=dtype, device=device)
    if keep_states:
        out["states"] = torch.empty(b, steps, d, dtype=dtype, device=device)
        h_idx = dyn.h_index(device)
    if lyapunov:
        # one basis for every sample, so that a sample's result does not depend on its batch
        q0, _ = qr_positive(torch.randn(d, k, generator=generator, dtype=torch.float64))
        q = q0.to(dtype=dtype, device=device).expand(b, d, k).contiguous()
        log_sum = torch.zeros(b, k, dtype=dtype, device=device)
        collapsed = torch.ones(b, k, dtype=torch.bool, device=device)  # at the floor at every counted QR
        if local_lyapunov:
            out["local_lyapunov"] = torch.full((b, steps, k), float("nan"), dtype=dtype, device=device)
        qr_at, start_count = qr_schedule(steps, warmup, tangent_warmup, reortho_every), warmup + tangent_warmup
    if end_to_end:
        e2e = EndToEnd(b, d, dtype, device)
        out["end_to_end_log_singular_values"] = torch.empty(b, steps, d, dtype=dtype, device=device)
    s = problem.s0
    for t0 in range(0, steps, n_chunk):
        t1 = min(steps, t0 + n_chunk)
        n = t1 - t0
        chunk = dyn.run(s, xs[:, t0:t1])
        ok = torch.isfinite(chunk[:, 1:]).flatten(2).all(-1).all(0)
        s = chunk[:, -1]
        if keep_states:
            out["states"][:, t0:t1] = chunk[:, 1:] if state == "full" else chunk[:, 1:].index_select(-1, h_idx)
        lin = dyn.linearize(chunk[:, :-1].reshape(b * n, -1), xs[:, t0:t1].reshape(b * n, -1), problem.method)
        if materialise:
            jac = lin.materialize(state)
            # one reading pass: a NaN/Inf entry makes its matrix's sum non-finite
            ok &= torch.isfinite(jac.sum((-2, -1))).reshape(b, n).all(0)
            bad = _first_bad(ok, t0)
            if bad is not None:
                raise NonFiniteError(f"the state or Jacobian J_t is NaN/Inf at step t={bad}")
        if per_step:
            if singular_values:
                out["singular_values"][:, t0:t1] = svdvals(jac).reshape(b, n, d)
            if eigenvalues:
                ev = torch.linalg.eigvals(jac)
                order = torch.argsort(ev.abs(), dim=-1, descending=True)
                ev = torch.gather(ev, -1, order).reshape(b, n, d)
                out["eigenvalues_real"][:, t0:t1] = ev.real
                out["eigenvalues_imag"][:, t0:t1] = ev.imag
                out["spectral_radius"][:, t0:t1] = ev[..., 0].abs()
        if lyapunov or end_to_end:
            step_lins = lin.unbind(n) if structured else None
            jac_steps = jac.reshape(b, n, d, d) if materialise else None
            for j in range(n):
                t = t0 + j + 1
                if step_lins is not None:
                    apply = lambda v, lin_t=step_lins[j]: lin_t.apply(v, state)  # noqa: E731
                else:
                    assert jac_steps is not None
                    apply = lambda v, jt=jac_steps[:, j]: torch.bmm(jt, v)  # noqa: E731
                if lyapunov and t > warmup:
                    q = apply(q)
                    if t in qr_at:
                        counted = t > start_count
                        if counted:
                            floor = collapse_floor(torch.linalg.vector_norm(q, dim=(-2, -1)), d, qr_at[t])
                        q, r = qr_positive(q)
                        ok[j] &= torch.isfinite(r).all()  # a NaN/Inf in J_t Q reaches diag(R)
                        if counted:
                            log_r = torch.log(r)
                            collapsed &= log_r <= floor
                            log_r = torch.where(r > 0, log_r, floor)  # an exact zero at one step counts as the floor
                            log_sum += log_r
                            if local_lyapunov:
                                out["local_lyapunov"][:, t - 1] = log_r / qr_at[t]
                if end_to_end:
                    e2e.update(apply(e2e.q))
                    out["end_to_end_log_singular_values"][:, t - 1] = e2e.log_singular_values()
                if advance is not None:
                    advance(1)
        bad = _first_bad(ok, t0)
        if bad is not None:
            raise NonFiniteError(f"the state or tangent J_t Q is NaN/Inf at step t={bad}")
        if advance is not None and not stepwise:
            advance(n)
    if lyapunov:
        lam = log_sum / (steps - warmup - tangent_warmup)
        lam = torch.where(collapsed, float("-inf"), lam)
        order = torch.argsort(lam, dim=-1, descending=True)
        out["lyapunov_exponents"] = torch.gather(lam, -1, order)
        if local_lyapunov:
            out["local_lyapunov"] = torch.gather(out["local_lyapunov"], -1, order.unsqueeze(1).expand(-1, steps, -1))
        out["kaplan_yorke_dimension"] = kaplan_yorke(out["lyapunov_exponents"])
        out["ks_entropy"] = out["lyapunov_exponents"].clamp(min=0).sum(-1)
    return out


def progress_bar(total: int, enabled: bool) -> tqdm:
    """The tqdm bar on stderr behind ``progress=True``; its ``update`` is the ``advance(n)`` callback."""
    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="step", desc="spectra", leave=False)


def spectra(
    model,
    inputs,
    h0=None,
    *,
    state: str = "full",
    singular_values: bool = True,
    eigenvalues: bool = False,
    lyapunov: bool = True,
    k: int | None = None,
    warmup: int = 0,
    tangent_warmup: int = 0,
    reortho_every: int = 1,
    end_to_end: bool = False,
    keep_states: bool = False,
    local_lyapunov: bool = False,
    method: str = "auto",
    batch_first: bool | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    progress: bool = False,
    time_chunk: int | None = None,
    attrs: dict | None = None,
) -> xr.Dataset:
    """Spectra of the step Jacobians of a batch of trajectories, as a labelled Dataset.

    Parameters
    ----------
    model, inputs, h0, state, method, batch_first
        As in :func:`rnnjac.jacobians`.
    singular_values, eigenvalues : bool
        Per-step singular values of ``J_t`` (descending) / eigenvalues (by modulus, descending) and
        the spectral radius.
    lyapunov : bool
        Lyapunov exponents (top ``k``, default all D), plus Kaplan-Yorke dimension and entropy.
    k : int, optional
        Number of exponents, ``1 <= k <= D``.
    warmup, tangent_warmup, reortho_every : int
        Transients (state only; tangent not counted) and steps between QR re-orthonormalisations.
    end_to_end : bool
        Singular values of ``ds_t/ds_0`` for every t (as logs, stably; see module docstring).
    keep_states : bool
        Store the states ``s_1..s_T``.
    local_lyapunov : bool
        Store the per-step ``log R_ii``.
    generator : torch.Generator, optional
        Seeds the initial tangent basis.
    dtype, device : optional
        Run on a converted copy of the model (e.g. ``torch.float64``); the model is untouched.
    progress : bool
        A tqdm bar on stderr.
    time_chunk : int, optional
        Steps linearised at once (default: bounded by ~64 MB of Jacobians).
    attrs : dict, optional
        Extra global attributes (e.g. the checkpoint path).

    Returns
    -------
    xarray.Dataset
        The variables computed, on dims ``batch``, ``time`` (1..T), ``sv_index``, ``eig_index``,
        ``le_index``, ``unit``.

    Examples
    --------
    >>> import torch, rnnjac
    >>> gru = torch.nn.GRU(3, 8, batch_first=True)
    >>> ds = rnnjac.spectra(gru, torch.randn(4, 50, 3), k=3, eigenvalues=True,
    ...                     generator=torch.Generator().manual_seed(0))
    >>> ds.lyapunov_exponents.shape, ds.singular_values.dims
    ((4, 3), ('batch', 'time', 'sv_index'))
    """
    problem = prepare(
        model, inputs, h0, state=state, method=method, batch_first=batch_first, dtype=dtype, device=device
    )
    check_lyapunov_options(problem, k, warmup, tangent_warmup, reortho_every, lyapunov=lyapunov)
    for name, flag in (
        ("singular_values", singular_values),
        ("eigenvalues", eigenvalues),
        ("lyapunov", lyapunov),
        ("end_to_end", end_to_end),
        ("keep_states", keep_states),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False; got {flag!r}")
    if not (singular_values or eigenvalues or lyapunov or end_to_end or keep_states):
        raise ValueError("nothing to compute: every output (singular_values, eigenvalues, lyapunov, ...) is off")
    if local_lyapunov and not lyapunov:
        raise ValueError("local_lyapunov=True needs lyapunov=True")
    seed = int(generator.initial_seed()) if generator is not None else -1
    config = {
        "singular_values": singular_values,
        "eigenvalues": eigenvalues,
        "lyapunov": lyapunov,
        "k": k,
        "warmup": warmup,
        "tangent_warmup": tangent_warmup,
        "reortho_every": reortho_every,
        "end_to_end": end_to_end,
        "keep_states": keep_states,
        "local_lyapunov": local_lyapunov,
        "batch": problem.batch,
        "steps": problem.steps,
    }
    bar = progress_bar(problem.steps, progress)
    with torch.no_grad(), bar:
        values = _compute(
            problem,
            singular_values=singular_values,
            eigenvalues=eigenvalues,
            lyapunov=lyapunov,
            k=k,
            warmup=warmup,
            tangent_warmup=tangent_warmup,
            reortho_every=reortho_every,
            end_to_end=end_to_end,
            keep_states=keep_states,
            local_lyapunov=local_lyapunov,
            generator=generator,
            advance=bar.update if progress else None,
            time_chunk=time_chunk,
        )
    extra = {
        "warmup": warmup,
        "tangent_warmup": tangent_warmup,
        "reortho_every": reortho_every,
        "seed": seed,
        "k": k or problem.dyn.size(problem.state),
        "lyapunov_units": "nats/step",
    }
    extra.update(attrs or {})
    return build_dataset(
        values,
        dyn=problem.dyn,
        state=problem.state,
        method=problem.method,
        dtype=problem.xs.dtype,
        device=problem.xs.device,
        config=config,
        attrs=extra,
    )


def lyapunov_spectrum(
    model,
    inputs,
    h0=None,
    *,
    k: int | None = None,
    warmup: int = 0,
    tangent_warmup: int = 0,
    reortho_every: int = 1,
    local_lyapunov: bool = False,
    state: str = "full",
    method: str = "auto",
    batch_first: bool | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device=None,
    progress: bool = False,
    attrs: dict | None = None,
) -> xr.Dataset:
    """Lyapunov exponents alone (memory constant in T), with Kaplan-Yorke dimension and entropy.

    Same options as :func:`spectra`. ``ks_entropy`` is the sum of the positive exponents (Pesin's
    bound on the Kolmogorov-Sinai entropy), ``kaplan_yorke_dimension`` the Lyapunov dimension.

    Examples
    --------
    >>> import torch, rnnjac
    >>> rnn = torch.nn.RNN(1, 16, batch_first=True)
    >>> ds = rnnjac.lyapunov_spectrum(rnn, torch.zeros(2, 200, 1), k=4, warmup=50)
    >>> ds.lyapunov_exponents.attrs["units"]
    'nats/step'
    """
    return spectra(
        model,
        inputs,
        h0,
        state=state,
        singular_values=False,
        lyapunov=True,
        k=k,
        warmup=warmup,
        tangent_warmup=tangent_warmup,
        reortho_every=reortho_every,
        local_lyapunov=local_lyapunov,
        method=method,
        batch_first=batch_first,
        generator=generator,
        dtype=dtype,
        device=device,
        progress=progress,
        attrs=attrs,
    )
