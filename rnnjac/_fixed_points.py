"""Fixed points and slow points of a recurrent model under constant input, with their linearisation.

For a constant input ``x*`` the model is the map ``F(s) = step(s, x*)`` on the full state (README,
"Conventions": "State vector"). A fixed point solves ``r(s) = F(s) - s = 0``; its speed is
``q(s) = 1/2 ||F(s) - s||^2``. Points where the search stalls at ``q > tol`` (local minima of ``q``) are
*slow points* (Sussillo & Barak 2013): they are kept and labelled, not dropped.

Solvers, batched over every (initial state, input condition) pair at once:

- ``"newton"`` (default): damped Newton on ``r`` with the closed-form ``A = J - I``: each iteration tries
  the Newton step ``A d = -r`` for all points in one batched LU solve and keeps it where ``q`` decreases;
  the other points take Levenberg-Marquardt steps ``(A^T A + mu I) d = -A^T r`` (batched Cholesky), kept
  only where ``q`` decreases (``mu`` shrinks after a success and grows after a failure, per point, so it
  never diverges; large ``mu`` is a short gradient step). Points that reach
  ``q <= tol`` stop and get one final undamped Newton step (kept where it lowers ``q``), which makes them
  accurate to about ``||A^-1|| q``, far below ``tol``.
- ``"adam"``: Adam on ``q`` with autograd gradients (the algorithm of the FixedPointFinder tool), as a
  baseline and for slow points.
"""

from __future__ import annotations

import json
import math
import sys
import warnings

import numpy as np
import torch
import xarray as xr
from torch import Tensor, nn

from ._checks import (
    NonFiniteError,
    RnnjacWarning,
    check_choice,
    check_generator,
    check_positive_int,
    prepare,
    recurrent_module,
)
from ._datasets import build_dataset
from ._system import as_tensor

__all__ = ["fixed_points"]

FIXED_POINT, INITIAL, CONDITION, MODE, EIG, UNIT = (
    "fixed_point",
    "initial_state",
    "condition",
    "mode",
    "eig_index",
    "unit",
)
DIMS = (CONDITION, INITIAL, FIXED_POINT, MODE)
METHODS = ("newton", "adam")
CONVERGED, STALLED, ITER_LIMIT, OUTLIER, NONFINITE = 0, 1, 2, 3, 4  # the ``status`` variable
DEFAULT_MAX_ITER = {"newton": 200, "adam": 20000}
DEFAULT_N_FROM_TRAJECTORIES = 1024
DEFAULT_N_RANDOM = 128
UNSTABLE_MARGIN = 1e-10  # |lambda| > 1 + margin counts as outside the unit circle
#: at most this many Jacobian entries are formed at once by the Newton solver (1 GiB of float64); the points are
#: solved in chunks beyond it (an LSTM with H=512 from 4096 states would need 32 GiB at once)
MAX_JACOBIAN_ELEMENTS = 2**27


def fixed_points(
    model,
    inputs=None,
    initial_states=None,
    *,
    n_initial: int | None = None,
    noise: float = 0.0,
    method: str = "newton",
    tol: float = 1e-10,
    max_iter: int | None = None,
    unique_tol: float = 1e-3,
    outlier_distance: float | None = 10.0,
    state: str = "full",
    eigenvectors: bool | int = False,
    lr: float = 1e-2,
    dtype: torch.dtype | None = None,
    device=None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    submodule=None,
) -> xr.Dataset:
    """Fixed points and slow points of ``F(s) = step(s, x*)``, with the eigenvalues of ``J`` there.

    Parameters
    ----------
    model : nn.RNN, nn.GRU, nn.LSTM, their cells, CustomCell or callable
        The recurrent model (any ``num_layers``, ``proj_size``); bidirectional modules are refused.
    inputs : Tensor, optional
        The constant input ``x*``: ``None`` (zeros; required for a custom cell), ``(I,)``, or ``(C, I)`` for
        ``C`` input conditions, each searched from every initial state.
    initial_states : Tensor or tuple, optional
        Where the searches start: flat states ``(N, D)``; trajectories ``(B, T+1, D)`` as
        :func:`rnnjac.trajectory` returns them (any 3-D array whose last dim is ``D``), from which
        ``n_initial`` states are drawn; or the module's ``h0`` format (``(L, N, H)``, LSTM ``(h, c)``).
        ``None``: ``n_initial`` states uniform in ``[-1, 1]^D`` (built-in models only).
    n_initial : int, optional
        How many initial states to draw (without replacement, seeded by ``generator``). Default: all of an
        ``(N, D)`` or module-format array, ``min(1024, B (T+1))`` from trajectories, 128 random states.
    noise : float
        Standard deviation of Gaussian noise added to the initial states.
    method : {"newton", "adam"}
        The solver (module docstring). ``"newton"`` is the fastest for fixed points.
    tol : float
        A point is a fixed point when ``q <= tol``; the search from a state stops there.
    max_iter : int, optional
        Iteration limit (default 200 for ``"newton"``, 20000 for ``"adam"``).
    unique_tol : float
        Points closer than this (Euclidean distance, full state) are one point; fixed points take
        precedence over slow points.
    outlier_distance : float or None
        Points farther from the centroid of the initial states than ``outlier_distance`` times their mean
        distance to it are dropped (status 3); ``None`` keeps everything.
    state : {"full", "h"}
        Which coordinates ``fixed_point_states`` holds and whose Jacobian is decomposed (``"h"``: the h
        block with c held fixed). The search always runs on the full state.
    eigenvectors : bool or int
        ``True`` (8 modes) or ``k``: right and left eigenvectors of the ``k`` leading modes (by modulus);
        left eigenvectors are rows ``l`` with ``l J = lambda l`` and ``l r = 1`` (no conjugation).
    lr : float
        Adam's learning rate (``method="adam"`` only).
    dtype, device : optional
        Solve in a converted copy of a built-in model (default ``torch.float64``); a custom step runs in
        its own dtype/device.
    generator : torch.Generator, optional
        Seeds the draw of initial states and the noise.
    progress : bool
        A tqdm bar on stderr.
    submodule : str or nn.Module, optional
        The recurrent core of a larger ``nn.Module`` (by dotted name or as the module; default: its only
        ``nn.RNN``/``GRU``/``LSTM`` or cell, as in :func:`rnnjac.spectra`). Fixed points are those of the core,
        so ``inputs`` is the constant input *the core* receives (e.g. ``model.encoder(x_star)``; None: zeros),
        and ``initial_states`` are core states (e.g. ``rnnjac.trajectory(model, x, submodule=...)``); the
        model's other layers are not run. The result records the name in ``attrs["submodule"]``.

    Returns
    -------
    xarray.Dataset
        Dims ``fixed_point``, ``unit``, ``eig_index``, ``condition`` (size 1 for a single input),
        ``initial_state`` (and ``mode`` with eigenvectors). Per point: ``fixed_point_states``, ``q``,
        ``is_fixed_point``, ``condition_index``, ``fixed_point_eigenvalues_real``/``_imag`` (descending
        modulus), ``fixed_point_spectral_radius``, ``n_unstable``, ``stable``. Per initial state:
        ``converged``, ``final_q``, ``point_index``, ``status``. Attrs: the inputs, tolerances, solver,
        iterations and counts. An empty ``fixed_point`` dim (with a :class:`~rnnjac.errors.RnnjacWarning`)
        when nothing was found.

    Examples
    --------
    >>> import torch
    >>> from rnnjac._fixed_points import fixed_points
    >>> rnn = torch.nn.RNN(2, 4, batch_first=True)
    >>> with torch.no_grad():
    ...     _ = rnn.weight_hh_l0.mul_(0.1)  # a contraction: one fixed point
    >>> ds = fixed_points(rnn, torch.zeros(2), torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))
    >>> ds.sizes["fixed_point"], int(ds.stable[0]), bool(ds.q[0] <= 1e-10)
    (1, 1, True)
    """
    opts = _check_options(method, tol, max_iter, unique_tol, outlier_distance, noise, lr, generator)
    model, core = recurrent_module(model, submodule)
    with torch.inference_mode(False), torch.no_grad():
        problem, x_cond, s0, source = _setup(
            model, inputs, initial_states, n_initial, noise, state, dtype, device, generator
        )
        k_modes = _check_eigenvectors(eigenvectors, _size(problem.dyn, state))
        c, n = x_cond.shape[0], s0.shape[0]
        s_all = s0.repeat(c, 1)  # condition-major: (C*N, D)
        x_all = x_cond.repeat_interleave(n, 0)
        max_iter = opts["max_iter"] or DEFAULT_MAX_ITER[method]
        bar = _progress_bar(max_iter, progress)
        try:
            if method == "newton":
                s_fin, q_fin, status, iters = _newton(problem, s_all, x_all, tol, max_iter, bar)
            else:
                s_fin, q_fin, status, iters = _adam(problem, s_all, x_all, tol, max_iter, lr, bar)
        finally:
            bar.close()
        status = _mark_outliers(s_fin, s0, status, outlier_distance)
        points, index = _unique_points(s_fin, q_fin, status, tol, unique_tol, c, n)
        eig = _eigen(problem, points, x_cond, state, k_modes)
    counts = _counts(status, points)
    attrs = {
        "input": json.dumps(x_cond.cpu().tolist()),
        "jacobian_method": problem.method,
        "tol": tol,
        "unique_tol": unique_tol,
        "outlier_distance": "" if outlier_distance is None else outlier_distance,
        "noise": noise,
        "max_iter": max_iter,
        "iterations": iters,
        "initial_states_source": source,
        "n_initial": n,
        "n_conditions": c,
        "seed": "" if generator is None else generator.initial_seed(),
        **counts,
        **core,
    }
    if points["states"].shape[0] == 0 or counts["n_fixed_points"] == 0:
        _warn_nothing(counts, method, tol, max_iter, n, c, outlier_distance)
    config = {**opts, "method": method, "max_iter": max_iter, "state": state, "eigenvectors": k_modes, "n_initial": n}
    return _dataset(problem, points, index, status, q_fin, eig, state, config, attrs, (c, n, method))


# ----------------------------------------------------------------------------- argument checks
def _check_options(method, tol, max_iter, unique_tol, outlier_distance, noise, lr, generator) -> dict:
    check_choice("method", method, METHODS)
    check_positive_int("max_iter", max_iter, allow_none=True)
    for name, value, low in (("tol", tol, 0.0), ("lr", lr, 0.0)):
        if not _is_number(value) or not value > low:
            raise ValueError(f"{name} must be a positive number; got {value!r}")
    for name, value in (("unique_tol", unique_tol), ("noise", noise)):
        if not _is_number(value) or not value >= 0:
            raise ValueError(f"{name} must be a number >= 0; got {value!r}")
    if outlier_distance is not None and (not _is_number(outlier_distance) or not outlier_distance > 0):
        raise ValueError(f"outlier_distance must be a positive number or None; got {outlier_distance!r}")
    check_generator(generator)
    return {
        "tol": tol,
        "max_iter": max_iter,
        "unique_tol": unique_tol,
        "outlier_distance": outlier_distance,
        "noise": noise,
        "lr": lr,
    }


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) and math.isfinite(v)


def _check_eigenvectors(eigenvectors, d: int) -> int:
    if eigenvectors is False or eigenvectors is None:
        return 0
    if eigenvectors is True:
        return min(8, d)
    if isinstance(eigenvectors, (int, np.integer)) and 1 <= eigenvectors <= d:
        return int(eigenvectors)
    raise ValueError(f"eigenvectors must be True/False or an integer k with 1 <= k <= D = {d}; got {eigenvectors!r}")


def _as_tensor(name: str, value) -> Tensor:
    return as_tensor(name, value).detach()


def _builtin(model) -> bool:
    return isinstance(model, nn.Module)


def _conditions(model, inputs) -> Tensor:
    """The input conditions as ``(C, I)``."""
    if inputs is None:
        if not _builtin(model):
            raise ValueError("inputs is required for a custom cell: it fixes the input size I (shape (I,) or (C, I))")
        size = getattr(model, "input_size", None)
        if not isinstance(size, int):
            raise TypeError(f"expected a recurrent module with an input_size; got {type(model).__name__}")
        return torch.zeros(1, size)
    x = _as_tensor("inputs", inputs)
    if not x.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor; got dtype {x.dtype}")
    if x.dim() not in (1, 2) or x.numel() == 0:
        raise ValueError(
            "inputs must be one constant input (I,) or several conditions (C, I) with C >= 1; got shape "
            f"{tuple(x.shape)}"
        )
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError("inputs contain NaN/Inf")
    return x.reshape(-1, x.shape[-1])


def _setup(model, inputs, initial_states, n_initial, noise, state, dtype, device, generator):
    """``(problem, x (C, I), s0 (N, D), source)``, every check done before any work."""
    check_positive_int("n_initial", n_initial, allow_none=True)
    x = _conditions(model, inputs)
    if _builtin(model) and dtype is None:
        dtype = torch.float64
    if _builtin(model) and device is None:  # solve where the model lives (the default input is built on the CPU)
        device = next((p.device for p in model.parameters()), None)
    dummy = x[:1].unsqueeze(1)  # (1, 1, I)
    if _builtin(model):
        problem = prepare(model, dummy, None, state=state, dtype=dtype, device=device)
        s_init, source = _initial_states(problem, model, initial_states, n_initial, generator)
    else:
        if initial_states is None:
            raise ValueError("initial_states is required for a custom cell: it fixes the state size D (shape (N, D))")
        s_init, source = _flat_custom(initial_states, n_initial, generator)
        problem = prepare(model, dummy, s_init[:1], state=state, dtype=dtype, device=device)
    dyn = problem.dyn
    ref = problem.xs
    s_init = s_init.to(dtype=ref.dtype, device=ref.device)
    if noise > 0:
        s_init = s_init + noise * torch.randn(s_init.shape, generator=generator, dtype=ref.dtype).to(ref.device)
    x = x.to(dtype=ref.dtype, device=ref.device)
    if x.shape[-1] != ref.shape[-1] and _builtin(model):
        raise ValueError(f"inputs have {x.shape[-1]} features but the model expects input_size={ref.shape[-1]}")
    if not _builtin(model):
        out = dyn.step(s_init[:1], x[:1])
        if tuple(out.shape) != (1, s_init.shape[1]):
            raise ValueError(
                f"custom step(s, x) returned shape {tuple(out.shape)} for s of shape (1, {s_init.shape[1]})"
            )
    return problem, x, s_init, source


def _check_finite_states(s: Tensor) -> None:
    if not bool(torch.isfinite(s).all()):
        n_bad = int((~torch.isfinite(s)).reshape(-1, s.shape[-1]).any(-1).sum())
        raise NonFiniteError(
            f"initial_states contain NaN/Inf ({n_bad} of {s.reshape(-1, s.shape[-1]).shape[0]} states)"
        )


def _draw(s: Tensor, n_initial, default: int | None, generator) -> Tensor:
    available = s.shape[0]
    n = n_initial if n_initial is not None else (available if default is None else min(default, available))
    if n > available:
        raise ValueError(f"n_initial={n} is larger than the number of initial states available ({available})")
    if n == available and n_initial is None:
        return s
    return s[torch.randperm(available, generator=generator)[:n].to(s.device)]


def _flat_custom(initial_states, n_initial, generator) -> tuple[Tensor, str]:
    s = _as_tensor("initial_states", initial_states)
    if s.dim() not in (2, 3) or s.shape[-1] == 0 or s.numel() == 0:
        raise ValueError(
            f"initial_states must be (N, D) states or (B, T+1, D) trajectories with N, D >= 1; got {tuple(s.shape)}"
        )
    _check_finite_states(s)
    if s.dim() == 3:
        return _draw(s.reshape(-1, s.shape[-1]), n_initial, DEFAULT_N_FROM_TRAJECTORIES, generator), "trajectories"
    return _draw(s, n_initial, None, generator), "states"


def _initial_states(problem, model, initial_states, n_initial, generator) -> tuple[Tensor, str]:
    """Flat ``(N, D)`` initial states of a built-in model from any accepted format."""
    d = problem.dyn.state_size
    if initial_states is None:
        n = DEFAULT_N_RANDOM if n_initial is None else n_initial
        return 2 * torch.rand(n, d, generator=generator, dtype=torch.float64) - 1, "uniform [-1, 1]"
    if isinstance(initial_states, (tuple, list)):
        parts = [_as_tensor("initial_states", t) for t in initial_states]
        for t in parts:
            _check_finite_states(t)
        return _draw(
            _module_format(problem, model, tuple(parts), parts[0].shape[-2] if parts[0].dim() > 1 else 1),
            n_initial,
            None,
            generator,
        ), "module format"
    s = _as_tensor("initial_states", initial_states)
    if s.numel() and not s.is_floating_point():
        raise TypeError(f"initial_states must be a floating-point tensor; got dtype {s.dtype}")
    if s.numel():
        _check_finite_states(s)
    if s.dim() == 2 and s.shape[-1] == d and s.shape[0] >= 1:
        return _draw(s, n_initial, None, generator), "states"
    if s.dim() == 3 and s.shape[-1] == d and s.shape[0] * s.shape[1] >= 1:
        return _draw(s.reshape(-1, d), n_initial, DEFAULT_N_FROM_TRAJECTORIES, generator), "trajectories"
    if s.dim() == 3 and s.shape[1] >= 1:
        return _draw(_module_format(problem, model, s, s.shape[1]), n_initial, None, generator), "module format"
    raise ValueError(
        f"initial_states must be flat states (N, D) with D = {d} (the full state: layer-major, [h; c] per LSTM "
        f"layer), trajectories (B, T+1, D) as rnnjac.trajectory returns, or the module's h0 format; got shape "
        f"{tuple(s.shape)}"
    )


def _module_format(problem, model, h0, batch: int) -> Tensor:
    x = problem.xs.new_zeros(batch, 1, problem.xs.shape[-1])
    try:
        return prepare(model, x, h0, dtype=x.dtype, device=x.device).s0
    except ValueError as err:
        raise ValueError(
            f"initial_states do not fit the model (D = {problem.dyn.state_size}): expected (N, D), (B, T+1, D) "
            f"or the module's h0 format; {str(err).replace('h0', 'initial_states')}"
        ) from err


# ----------------------------------------------------------------------------- solvers
def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, file=sys.stderr, unit="iter", desc="fixed points", leave=False)


def _speed(dyn, s: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    r = dyn.step(s, x) - s
    return r, 0.5 * r.pow(2).sum(-1)


def _newton(problem, s, x, tol, max_iter, bar):
    """Levenberg-Marquardt on ``r(s) = F(s) - s``, batched; returns ``(s, q, status, iterations)``."""
    dyn, jm = problem.dyn, problem.method
    s = s.clone()
    r, q = _speed(dyn, s, x)
    status = torch.full(q.shape, ITER_LIMIT, dtype=torch.int64, device=s.device)
    status[q <= tol] = CONVERGED
    status[~torch.isfinite(q)] = NONFINITE
    mu = torch.full_like(q, float("nan"))
    flat = torch.zeros(q.shape, dtype=torch.int64, device=s.device)  # iterations without real progress
    iters = 0
    per_chunk = _points_per_chunk(s.shape[1])
    for it in range(max_iter):
        active = torch.nonzero(status == ITER_LIMIT).squeeze(1)
        if active.numel() == 0:
            break
        iters = it + 1
        for act in active.split(per_chunk):  # bounded memory: at most per_chunk (D, D) matrices at once
            a = _j_minus_identity(dyn, s[act], x[act], jm)
            q_old = q[act]
            s_a, r_a, q_a, mu_a, stuck = _damped_newton(dyn, a, s[act], x[act], r[act], q_old, mu[act])
            del a
            s[act], r[act], q[act], mu[act] = s_a, r_a, q_a, mu_a
            progress = (q_old - q_a) > 1e-9 * q_old
            flat[act] = torch.where(progress, 0, flat[act] + 1)
            done = torch.where(q_a <= tol, CONVERGED, ITER_LIMIT)
            stalled = (flat[act] >= 10) | stuck
            status[act] = torch.where(stalled & (done != CONVERGED), STALLED, done)
        bar.update(1)
        bar.set_postfix(active=int((status == ITER_LIMIT).sum()), refresh=False)
    _polish(dyn, jm, s, x, r, q, status == CONVERGED)
    return s, q, status, iters


def _j_minus_identity(dyn, s, x, jm) -> Tensor:
    """``J - I`` at ``s``, formed in place unless the Jacobian is a tensor the caller's code may hold."""
    lin = dyn.linearize(s, x, jm)
    a = lin.materialize("full")
    if a is getattr(lin, "jac", None):
        a = a.clone()
    a.diagonal(dim1=1, dim2=2).sub_(1.0)
    return a


def _damped_newton(dyn, a, s, x, r, q, mu):
    """One iteration for every point: the Newton step ``A d = -r`` (one batched LU solve) where it lowers q,
    Levenberg-Marquardt steps for the others. Returns the updated ``(s, r, q, mu)`` and which points are
    stuck (no step lowers q even with a damping of 1e14 times the scale of ``A^T A``)."""
    s, r, q, mu = s.clone(), r.clone(), q.clone(), mu.clone()
    step, info = torch.linalg.solve_ex(a, -r)
    trial = s + step
    r_t, q_t = _speed(dyn, trial, x)
    ok = (info == 0) & torch.isfinite(q_t) & (q_t < q)
    s[ok], r[ok], q[ok], mu[ok] = trial[ok], r_t[ok], q_t[ok], mu[ok] / 3
    stuck = torch.zeros_like(ok)
    rest = torch.nonzero(~ok).squeeze(1)
    if rest.numel():
        at = a[rest].transpose(1, 2)
        gram = at @ a[rest]
        grad = (at @ r[rest].unsqueeze(-1)).squeeze(-1)
        scale = gram.diagonal(dim1=1, dim2=2).amax(-1).clamp_min(1e-12)
        mu_r = torch.where(torch.isnan(mu[rest]), 1e-3 * scale, mu[rest])
        s[rest], r[rest], q[rest], mu[rest] = _lm_step(dyn, s[rest], x[rest], r[rest], q[rest], gram, grad, mu_r)
        stuck[rest] = mu[rest] > 1e14 * scale
    return s, r, q, mu, stuck


def _lm_step(dyn, s, x, r, q, gram, grad, mu, tries: int = 8):
    """Damped steps for every point: solve ``(G + mu I) d = -g``; accept where q decreases, else raise mu."""
    s, r, q, mu = s.clone(), r.clone(), q.clone(), mu.clone()
    eye = torch.eye(s.shape[1], dtype=s.dtype, device=s.device)
    pending = torch.arange(s.shape[0], device=s.device)
    for _ in range(tries):
        if pending.numel() == 0:
            break
        chol, info = torch.linalg.cholesky_ex(gram[pending] + mu[pending, None, None] * eye)
        step = torch.cholesky_solve(-grad[pending].unsqueeze(-1), chol).squeeze(-1)
        trial = s[pending] + step
        r_t, q_t = _speed(dyn, trial, x[pending])
        ok = (info == 0) & torch.isfinite(q_t) & (q_t < q[pending])
        good, bad = pending[ok], pending[~ok]
        s[good], r[good], q[good] = trial[ok], r_t[ok], q_t[ok]
        mu[good] = mu[good] / 3
        mu[bad] = mu[bad] * 4
        pending = bad
    return s, r, q, mu


def _points_per_chunk(d: int) -> int:
    """How many points' ``(D, D)`` Jacobians one Newton iteration forms at once (:data:`MAX_JACOBIAN_ELEMENTS`)."""
    return max(1, MAX_JACOBIAN_ELEMENTS // (d * d))


def _polish(dyn, jm, s, x, r, q, mask) -> None:
    """One undamped Newton step at the converged points, kept where it lowers q (in place)."""
    for idx in torch.nonzero(mask).squeeze(1).split(_points_per_chunk(s.shape[1])):
        _polish_points(dyn, jm, s, x, r, q, idx)


def _polish_points(dyn, jm, s, x, r, q, idx) -> None:
    a = _j_minus_identity(dyn, s[idx], x[idx], jm)
    step, info = torch.linalg.solve_ex(a, -r[idx])
    trial = s[idx] + step
    r_t, q_t = _speed(dyn, trial, x[idx])
    ok = (info == 0) & torch.isfinite(q_t) & (q_t < q[idx])
    good = idx[ok]
    s[good], r[good], q[good] = trial[ok], r_t[ok], q_t[ok]


def _adam(problem, s, x, tol, max_iter, lr, bar, betas=(0.9, 0.999), eps=1e-8):
    """Adam on ``q`` with autograd gradients; a point stops when ``q <= tol``."""
    dyn = problem.dyn
    s = s.clone()
    m, v = torch.zeros_like(s), torch.zeros_like(s)
    count = torch.zeros(s.shape[0], 1, dtype=s.dtype, device=s.device)
    status = torch.full((s.shape[0],), ITER_LIMIT, dtype=torch.int64, device=s.device)
    iters = 0
    for it in range(max_iter):
        act = torch.nonzero(status == ITER_LIMIT).squeeze(1)
        if act.numel() == 0:
            break
        iters = it + 1
        with torch.enable_grad():
            sa = s[act].requires_grad_(True)
            _, qa = _speed(dyn, sa, x[act])
            (g,) = torch.autograd.grad(qa.sum(), sa)
        qa = qa.detach()
        status[act] = torch.where(qa <= tol, CONVERGED, torch.where(torch.isfinite(qa), ITER_LIMIT, NONFINITE))
        move = act[status[act] == ITER_LIMIT]
        g = g[status[act] == ITER_LIMIT]
        count[move] += 1
        m[move] = betas[0] * m[move] + (1 - betas[0]) * g
        v[move] = betas[1] * v[move] + (1 - betas[1]) * g * g
        m_hat = m[move] / (1 - betas[0] ** count[move])
        v_hat = v[move] / (1 - betas[1] ** count[move])
        s[move] = s[move] - lr * m_hat / (v_hat.sqrt() + eps)
        bar.update(1)
    _, q = _speed(dyn, s, x)
    status[(status == ITER_LIMIT) & (q <= tol)] = CONVERGED
    status[~torch.isfinite(q)] = NONFINITE
    return s, q, status, iters


# ----------------------------------------------------------------------------- points
def _mark_outliers(s: Tensor, s0: Tensor, status: Tensor, outlier_distance) -> Tensor:
    if outlier_distance is None:
        return status
    centroid = s0.mean(0)
    radius = float((s0 - centroid).norm(dim=-1).mean())
    radius = radius if radius > 0 else 1.0
    far = (s - centroid).norm(dim=-1) > outlier_distance * radius
    return torch.where(far & (status != NONFINITE), OUTLIER, status)


def _unique_points(s, q, status, tol, unique_tol, c: int, n: int):
    """Greedy deduplication per condition (fixed points first, then by q); returns the points and, per
    (condition, initial state), the index of its point (-1: none)."""
    index = torch.full((c * n,), -1, dtype=torch.int64)
    keep_s, keep_q, keep_c = [], [], []
    s_cpu, q_cpu, st = s.cpu(), q.cpu(), status.cpu()
    for ci in range(c):
        rows = torch.arange(ci * n, (ci + 1) * n)
        rows = rows[(st[rows] != OUTLIER) & (st[rows] != NONFINITE)]
        fixed = (q_cpu[rows] <= tol).to(torch.int64)
        order = np.lexsort((q_cpu[rows].numpy(), -fixed.numpy()))
        rows = rows[torch.from_numpy(order)]
        left = torch.ones(len(rows), dtype=torch.bool)
        pts = s_cpu[rows]
        for j in range(len(rows)):
            if not left[j]:
                continue
            near = left & ((pts - pts[j]).norm(dim=-1) <= unique_tol)
            index[rows[near]] = len(keep_s)
            left &= ~near
            keep_s.append(pts[j])
            keep_q.append(q_cpu[rows[j]])
            keep_c.append(ci)
    d = s.shape[1]
    states = torch.stack(keep_s).to(s.device) if keep_s else s.new_zeros(0, d)
    qs = torch.stack(keep_q) if keep_q else torch.zeros(0, dtype=q.dtype)
    points = {"states": states, "q": qs, "is_fixed": qs <= tol, "condition": torch.tensor(keep_c, dtype=torch.int64)}
    return points, index.reshape(c, n)


def _eigen(problem, points, x_cond, state: str, k_modes: int) -> dict:
    """Eigenvalues (descending modulus) and, for ``k_modes``, eigenvectors of J at every point."""
    dyn = problem.dyn
    s = points["states"]
    d = _size(dyn, state)
    if s.shape[0] == 0:
        empty = torch.zeros(0, d, dtype=torch.complex128)
        return (
            {"values": empty, "right": None, "left": None}
            if not k_modes
            else {
                "values": empty,
                "right": torch.zeros(0, k_modes, d, dtype=torch.complex128),
                "left": torch.zeros(0, k_modes, d, dtype=torch.complex128),
            }
        )
    x = x_cond[points["condition"].to(x_cond.device)]
    jac = dyn.linearize(s, x, problem.method).materialize(state)
    if not k_modes:
        lam = torch.linalg.eigvals(jac)
        order = torch.argsort(lam.abs(), dim=-1, descending=True, stable=True)
        return {"values": lam.gather(-1, order).cpu(), "right": None, "left": None}
    lam, vec = torch.linalg.eig(jac)
    left = torch.linalg.inv(vec)  # rows: l J = lambda l, l r = 1
    order = torch.argsort(lam.abs(), dim=-1, descending=True, stable=True)
    lead = order[:, :k_modes]
    right = vec.gather(-1, lead.unsqueeze(1).expand(-1, vec.shape[1], -1)).transpose(1, 2)
    left = left.gather(1, lead.unsqueeze(-1).expand(-1, -1, left.shape[2]))
    return {"values": lam.gather(-1, order).cpu(), "right": right.cpu(), "left": left.cpu()}


def _counts(status: Tensor, points) -> dict:
    st = status.cpu()
    fixed = points["is_fixed"]
    return {
        "n_converged": int((st == CONVERGED).sum()),
        "n_stalled": int((st == STALLED).sum()),
        "n_iteration_limit": int((st == ITER_LIMIT).sum()),
        "n_outliers": int((st == OUTLIER).sum()),
        "n_nonfinite": int((st == NONFINITE).sum()),
        "n_fixed_points": int(fixed.sum()),
        "n_slow_points": int((~fixed).sum()),
    }


def _warn_nothing(counts, method, tol, max_iter, n, c, outlier_distance) -> None:
    what = "no fixed point or slow point" if counts["n_slow_points"] == 0 else "no fixed point (q <= tol)"
    warnings.warn(
        f"{what} found: method={method!r} from {n} initial states x {c} input condition(s), tol={tol}, "
        f"max_iter={max_iter}; {counts['n_converged']} searches converged, {counts['n_stalled']} stalled, "
        f"{counts['n_iteration_limit']} hit max_iter, {counts['n_outliers']} were outliers "
        f"(outlier_distance={outlier_distance}), {counts['n_nonfinite']} became NaN/Inf. Try more or other "
        "initial_states (e.g. from rnnjac.trajectory), noise=, a larger max_iter, or outlier_distance=None",
        RnnjacWarning,
        stacklevel=3,
    )


# ----------------------------------------------------------------------------- dataset
def _size(dyn, state: str) -> int:
    return len(dyn.unit_coords(state)["neuron"])


def _dataset(problem, points, index, status, q_fin, eig, state, config, attrs, shape) -> xr.Dataset:
    dyn = problem.dyn
    c, n, method = shape
    s = points["states"]
    if state == "h":
        s = s.index_select(-1, dyn.h_index(s.device))
    lam = eig["values"]
    radius = lam.abs().amax(-1) if lam.shape[-1] else torch.zeros(lam.shape[0])
    n_unstable = (lam.abs() > 1 + UNSTABLE_MARGIN).sum(-1)
    values = {
        "fixed_point_states": s,
        "q": points["q"],
        "is_fixed_point": points["is_fixed"].to(torch.int8),
        "condition_index": points["condition"],
        "fixed_point_eigenvalues_real": lam.real,
        "fixed_point_eigenvalues_imag": lam.imag,
        "fixed_point_spectral_radius": radius,
        "n_unstable": n_unstable,
        "stable": (n_unstable == 0).to(torch.int8),
        "converged": (status == CONVERGED).reshape(c, n).to(torch.int8),
        "final_q": q_fin.reshape(c, n),
        "point_index": index,
        "status": status.reshape(c, n).to(torch.int8),
    }
    if eig["right"] is not None:
        values.update(
            right_eigenvectors_real=eig["right"].real,
            right_eigenvectors_imag=eig["right"].imag,
            left_eigenvectors_real=eig["left"].real,
            left_eigenvectors_imag=eig["left"].imag,
        )
    return _build(values, dyn, state, problem, config, {**attrs, "method": method})


def _build(values: dict, dyn, state: str, problem, config: dict, attrs: dict) -> xr.Dataset:
    return build_dataset(
        values,
        dyn=dyn,
        state=state,
        method=attrs["method"],
        dtype=problem.xs.dtype,
        device=problem.xs.device,
        config=config,
        attrs=attrs,
    )
