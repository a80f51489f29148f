r"""Differentiable penalties on the step Jacobians, for regularising training.

``jacobian_penalty`` (scale stated exactly, no hidden factors of 1/2):

- ``kind="frobenius"``: ``mean_{b, t} ||J_t||_F^2``;
- ``kind="spectral"``: ``mean_{b, t} sigma_max(J_t)^2``, by ``n_iter`` power iterations on
  ``J^T J`` run without gradient, then ``||J_t v||^2`` at the converged unit vector ``v`` (its gradient
  is that of ``sigma_max^2`` when the top singular value is simple);
- ``kind="end_to_end"``: ``mean_b ||ds_T/ds_0||_F^2``.

``estimator="exact"`` uses the factored closed forms: ``||J||_F^2`` of a single-layer built-in cell
is ``sum_i a_i^T G_i a_i`` with per-row Gram matrices of the shared weights (O(B T K^2 H) instead of
materialising ``(B, T, D, D)``), multi-layer models materialise one time chunk at a time, the
end-to-end product is propagated as ``P <- J_t P``. ``estimator="projection"`` is the unbiased
random-projection estimate ``D ||u^T J||^2`` with ``u`` uniform on the unit sphere, averaged over
``n_proj`` draws (Hoffman, Roberts & Yaida 2019, "Robust learning with Jacobian regularization"):
``E[u u^T] = I / D`` gives ``E[D ||u^T J||^2] = ||J||_F^2``.

``input_output_penalty`` (:mod:`rnnjac._input_output`): the end-to-end ``mean_b ||dy_b/dx_b||_F^2`` of any
differentiable callable ``inputs -> outputs`` (an RNN with its readout, a CNN...), exact or by random projections.

``lyapunov_penalty``: ``mean_{b, i<=k} (lambda_i - target)^2`` with the exponents computed by QR
re-orthonormalisation *through which gradients flow* ("gradient flossing", Engelken 2023), divided by
the counted steps.

The recurrent core of a larger model (``submodule=``, as in :func:`rnnjac.spectra`): the whole model runs once
on ``inputs`` without gradients and the core is penalised on what it received. Those captured inputs are
detached, so the penalty regularises the recurrent core on the encoder's *current* outputs, and its gradient
reaches the core's parameters only, never the layers in front of it (penalise the core directly on
``encoder(x)`` to let gradients flow into the encoder as well).

Inner derivatives (``J^T u``) use ``torch.func.vjp``/``torch.autograd.grad``, never ``.backward()``,
so no parameter's ``.grad`` changes until the caller backpropagates the total loss. The trajectory is
recomputed by the transparent step (on CPU a single-layer module's own forward is reused for speed);
nothing differentiates through a fused cuDNN kernel.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from ._checks import (
    NonFiniteError,
    RnnjacWarning,
    check_choice,
    check_lyapunov_options,
    check_positive_int,
    check_states_finite,
    prepare,
)
from ._input_output import input_output_penalty
from ._kernels import LyapunovQR, initial_basis

__all__ = ["jacobian_penalty", "lyapunov_penalty", "input_output_penalty", "JacobianPenalty"]

KINDS = ("frobenius", "spectral", "end_to_end")
ESTIMATORS = ("exact", "projection")
_CHUNK_ELEMENTS = 2**24


def _warn_no_grad(dyn, inputs) -> None:
    params = dyn.tensors()
    if params and not any(p.requires_grad for p in params) and not getattr(inputs, "requires_grad", False):
        warnings.warn(
            "none of the model's parameters (nor the inputs) require grad: the penalty will have no gradient",
            RnnjacWarning,
            stacklevel=4,
        )


def _prepare(model, inputs, h0, state, batch_first, outputs, submodule):
    """The checked problem of a penalty (the recurrent core of a larger model with ``submodule``), with a warning
    when nothing in it requires grad."""
    problem = prepare(model, inputs, h0, state=state, batch_first=batch_first, submodule=submodule)
    if problem.attrs and outputs is not None:
        raise ValueError(
            "outputs= is the output sequence of the recurrent module's own forward; with a whole model (submodule "
            f"{problem.attrs['submodule']!r}) the core is re-run on its captured inputs: leave outputs=None"
        )
    _warn_no_grad(problem.dyn, problem.xs)
    return problem


def _states(problem, outputs=None) -> Tensor:
    """Differentiable states ``(B, T+1, D)``, checked finite (``System.sequence_states``: from the caller's own
    ``outputs`` of a single-layer module, or that module's own forward on the CPU, else the step)."""
    states = problem.dyn.sequence_states(problem.s0, problem.xs, outputs, unbatched=problem.unbatched)
    check_states_finite(states.detach())
    return states


def _time_index(steps: int, stride: int) -> Tensor:
    return torch.arange(0, steps, stride)


def _linearize(problem, states: Tensor, t_idx: Tensor):
    b = problem.batch
    s_prev = states[:, :-1][:, t_idx].reshape(b * len(t_idx), -1)
    x = problem.xs[:, t_idx].reshape(b * len(t_idx), -1)
    return problem.dyn.linearize(s_prev, x, problem.method)


def _sphere(shape, generator, like: Tensor) -> Tensor:
    u = torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype=like.dtype, device=like.device)
    return u / u.norm(dim=-2, keepdim=True)


def _per_step(problem, states, kind, estimator, n_proj, n_iter, t_idx, generator) -> Tensor:
    """Per-step values ``(B, len(t_idx))`` of ``||J||_F^2`` or ``sigma_max^2``."""
    b, d, state = problem.batch, problem.dyn.size(problem.state), problem.state
    closed = problem.method == "analytic" and problem.dyn.frobenius_closed_form(state)
    if kind == "frobenius" and estimator == "exact":
        width = 4 if closed else d  # row form: O(H K) per step; otherwise J is materialised
    else:
        width = 4 * max(n_proj, 4) if problem.method == "analytic" else d  # J Q with narrow Q
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, b * d * width))
    out = []
    for c0 in range(0, len(t_idx), per_chunk):
        idx = t_idx[c0 : c0 + per_chunk]
        lin = _linearize(problem, states, idx)
        n = lin.s.shape[0]
        if kind == "frobenius" and estimator == "exact":
            val = lin.frobenius_sq(state)
        elif kind == "frobenius":
            u = _sphere((n, d, n_proj), generator, states)
            val = d * lin.apply_transpose(u, state).pow(2).sum(-2).mean(-1)
        else:  # spectral
            v = _sphere((n, d, 1), generator, states)
            plain = lin.detached()
            with torch.no_grad():
                for _ in range(n_iter):
                    with torch.enable_grad():
                        w = plain.apply_transpose(plain.apply(v, state), state)
                    v = w / w.norm(dim=-2, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)
            val = lin.apply(v.detach(), state).pow(2).sum((-2, -1))
        out.append(val.reshape(b, len(idx)))
    return torch.cat(out, 1)


def _end_to_end(problem, states, estimator, n_proj, generator) -> Tensor:
    b, steps, d, state = problem.batch, problem.steps, problem.dyn.size(problem.state), problem.state
    per_step = _linearize(problem, states, torch.arange(steps)).unbind(steps)
    if estimator == "exact":
        p = torch.eye(d, dtype=states.dtype, device=states.device).expand(b, d, d)
        for lin_t in per_step:
            p = lin_t.apply(p, state)
        return p.pow(2).sum((-2, -1))
    w = _sphere((b, d, n_proj), generator, states)
    for lin_t in reversed(per_step):
        w = lin_t.apply_transpose(w, state)  # u^T J_T ... J_1, one step back at a time
    return d * w.pow(2).sum(-2).mean(-1)


def _raise_nonfinite(values: Tensor, t_idx: Tensor | None, what: str) -> None:
    v = values.detach()
    if bool(torch.isfinite(v).all()):
        return
    if t_idx is None or v.dim() < 2:
        raise NonFiniteError(f"the {what} penalty is NaN/Inf")
    bad = int(torch.nonzero(~torch.isfinite(v).all(0))[0, 0])
    raise NonFiniteError(f"the {what} penalty is NaN/Inf at step t={int(t_idx[bad]) + 1}")


def jacobian_penalty(
    model,
    inputs,
    h0=None,
    *,
    kind: str = "frobenius",
    estimator: str = "exact",
    n_proj: int = 1,
    n_iter: int = 5,
    time_stride: int = 1,
    state: str = "full",
    generator: torch.Generator | None = None,
    batch_first: bool | None = None,
    outputs: Tensor | None = None,
    submodule=None,
) -> Tensor:
    """A differentiable penalty on the step (or end-to-end) Jacobians; see the module docstring.

    Parameters
    ----------
    model, inputs, h0, state, batch_first
        As in :func:`rnnjac.jacobians`; gradients flow to the model's parameters and to ``inputs``.
    kind : {"frobenius", "spectral", "end_to_end"}
    estimator : {"exact", "projection"}
    n_proj : int
        Random projections per Jacobian (projection estimator).
    n_iter : int
        Power iterations (``kind="spectral"``).
    time_stride : int
        Use every ``time_stride``-th step (t = 1, 1 + stride, ...) for the per-step kinds.
    generator : torch.Generator, optional
        Seeds projections and power-iteration starts.
    outputs : Tensor, optional
        The output sequence of the caller's own ``model(inputs, h0)`` (single-layer modules). The
        penalty then reuses that forward instead of recomputing the trajectory, which makes the
        regularised training step much cheaper; gradients flow through it exactly as the task loss's
        do (on CUDA that forward is cuDNN's, so use it in train mode there).
    submodule : str or nn.Module, optional
        The recurrent core of a larger model (see :func:`rnnjac.spectra`); its captured inputs are detached
        (module docstring). Not with ``outputs``.

    Returns
    -------
    Tensor
        A scalar.

    Examples
    --------
    >>> import torch, rnnjac
    >>> gru = torch.nn.GRU(3, 16, batch_first=True)
    >>> x = torch.randn(8, 20, 3)
    >>> out, _ = gru(x)
    >>> loss = out.pow(2).mean() + 1e-2 * rnnjac.regularizers.jacobian_penalty(gru, x, outputs=out)
    >>> loss.backward()
    """
    check_choice("kind", kind, KINDS)
    check_choice("estimator", estimator, ESTIMATORS)
    check_positive_int("n_proj", n_proj)
    check_positive_int("n_iter", n_iter)
    check_positive_int("time_stride", time_stride)
    problem = _prepare(model, inputs, h0, state, batch_first, outputs, submodule)
    states = _states(problem, outputs)
    if kind == "end_to_end":
        vals = _end_to_end(problem, states, estimator, n_proj, generator)
        _raise_nonfinite(vals, None, kind)
        return vals.mean()
    t_idx = _time_index(problem.steps, time_stride)
    vals = _per_step(problem, states, kind, estimator, n_proj, n_iter, t_idx, generator)
    _raise_nonfinite(vals, t_idx, kind)
    return vals.mean()


def lyapunov_penalty(
    model,
    inputs,
    h0=None,
    *,
    k: int,
    target: float = 0.0,
    warmup: int = 0,
    tangent_warmup: int = 0,
    reortho_every: int = 1,
    state: str = "full",
    generator: torch.Generator | None = None,
    batch_first: bool | None = None,
    outputs: Tensor | None = None,
    submodule=None,
) -> Tensor:
    """Mean over the batch and the top ``k`` exponents of ``(lambda_i - target)^2``, differentiable.

    The exponents are computed as in :func:`rnnjac.lyapunov_spectrum` (same transients and
    ``reortho_every``) with gradients flowing through every ``J_t Q`` and QR ("gradient flossing",
    Engelken 2023); they are divided by the number of counted steps. ``submodule``: as in
    :func:`jacobian_penalty`.

    Examples
    --------
    >>> import torch, rnnjac
    >>> rnn = torch.nn.RNN(2, 12, batch_first=True)
    >>> pen = rnnjac.regularizers.lyapunov_penalty(rnn, torch.randn(4, 30, 2), k=3, warmup=5)
    >>> pen.backward()
    """
    if not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"target must be a finite number; got {target!r}")
    problem = _prepare(model, inputs, h0, state, batch_first, outputs, submodule)
    check_lyapunov_options(problem, k, warmup, tangent_warmup, reortho_every, k_required=True)
    d = problem.dyn.size(problem.state)
    states = _states(problem, outputs)
    steps, b, state = problem.steps, problem.batch, problem.state
    per_step = _linearize(problem, states, torch.arange(warmup, steps)).unbind(steps - warmup)
    q0 = initial_basis(d, k, generator, states.dtype, states.device, b)
    acc = LyapunovQR(
        q0, steps, warmup=warmup, tangent_warmup=tangent_warmup, reortho_every=reortho_every, differentiable=True
    )
    finite, qr_steps = [], []  # checked after the loop: no host round-trip per step
    for j, lin_t in enumerate(per_step):
        t = warmup + j + 1
        flag = acc.step(t, lambda v, lin_t=lin_t: lin_t.apply(v, state))
        if flag is not None:
            finite.append(flag)
            qr_steps.append(t)
    if finite:
        ok = torch.stack(finite)
        if not bool(ok.all()):
            raise NonFiniteError(f"the Lyapunov penalty is NaN/Inf at step t={qr_steps[int((~ok).nonzero()[0, 0])]}")
    return (acc.result().exponents - target).pow(2).mean()


class JacobianPenalty(nn.Module):
    """A penalty term for training loops: ``weight * penalty(model, inputs, h0)``.

    ``kind`` is one of ``"frobenius"``, ``"spectral"``, ``"end_to_end"`` (see
    :func:`jacobian_penalty`), ``"lyapunov"`` (see :func:`lyapunov_penalty`) or ``"input_output"`` (see
    :func:`input_output_penalty`: ``model`` is then any differentiable callable ``inputs -> outputs``, e.g. the
    whole network with its readout, and ``h0``/``outputs`` are not taken); the remaining keyword arguments are
    passed on (``submodule="gru"`` penalises the recurrent core of the model passed to :meth:`forward`, with
    the captured inputs detached; see the module docstring).

    Examples
    --------
    >>> import torch, rnnjac
    >>> lstm = torch.nn.LSTM(3, 8, batch_first=True)
    >>> penalty = rnnjac.regularizers.JacobianPenalty("spectral", weight=0.1, n_iter=3)
    >>> x = torch.randn(4, 10, 3)
    >>> loss = lstm(x)[0].pow(2).mean() + penalty(lstm, x)

    The end-to-end input-to-output Jacobian of a network with its readout:

    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> io = rnnjac.regularizers.JacobianPenalty("input_output", weight=1e-2, n_proj=2)
    >>> loss = net(x).pow(2).mean() + io(net, x)  # 1e-2 * mean_b ||d net(x)_b / d x_b||_F^2, estimated
    >>> loss.backward()
    """

    def __init__(self, kind: str = "frobenius", weight: float = 1.0, **options):
        super().__init__()
        check_choice("kind", kind, (*KINDS, "lyapunov", "input_output"))
        self.kind, self.weight, self.options = kind, float(weight), options

    def forward(self, model, inputs, h0=None, outputs=None) -> Tensor:
        if self.kind == "input_output":
            if h0 is not None or outputs is not None:
                raise ValueError(
                    "kind='input_output' penalises model(inputs) end to end: pass the whole callable as model "
                    "and leave h0=None, outputs=None (put the initial state inside the callable)"
                )
            return self.weight * input_output_penalty(model, inputs, **self.options)
        if self.kind == "lyapunov":
            return self.weight * lyapunov_penalty(model, inputs, h0, outputs=outputs, **self.options)
        return self.weight * jacobian_penalty(model, inputs, h0, kind=self.kind, outputs=outputs, **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"kind={self.kind!r}, weight={self.weight}" + (f", {opts}" if opts else "")
