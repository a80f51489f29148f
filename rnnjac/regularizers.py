r"""Differentiable penalties on the step Jacobians, for regularising training.

``jacobian_penalty`` (scale stated exactly, no hidden factors of 1/2):

- ``kind="frobenius"``: ``mean_{b, t} ||J_t||_F^2``;
- ``kind="spectral"``: ``mean_{b, t} sigma_max(J_t)^2``, by ``n_iter`` power iterations on
  ``J^T J`` run without gradient, then ``||J_t v||^2`` at the converged unit vector ``v`` (its gradient
  is that of ``sigma_max^2`` when the top singular value is simple);
- ``kind="end_to_end"``: ``mean_b ||ds_T/ds_0||_F^2``.

``estimator="exact"`` uses the factored closed forms: ``||J||_F^2`` of a single-layer built-in cell
is ``sum_i a_i^T G_i a_i`` with per-row Gram matrices of the shared weights (O(B T K^2 H) instead of
materialising ``(B, T, D, D)``); a stack adds its cross-layer blocks ``(dF_l/dx) @ B_{l-1}`` as batched
``(H, H)`` products (O(B T H^3): use the projection estimator for large stacked models); ``state="h"`` of an
LSTM and projections materialise one time chunk at a time; the end-to-end product is propagated as
``P <- J_t P``. ``estimator="projection"`` is the unbiased
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

Inner derivatives (``J^T u``) are closed forms for built-in cells (the transpose of each layer's tangent: one GEMM
per weight matrix, so a power iteration is two GEMMs per layer over all ``B T`` steps at once) and
``torch.func.vjp`` for custom cells, never ``.backward()``, so no parameter's ``.grad`` changes until the caller
backpropagates the total loss. The row forms of ``||J||_F^2`` have a hand-written backward (about half the
full-size elementwise passes of autograd's), itself differentiable, so second derivatives stay exact. The
trajectory of a built-in module comes with its gates (:func:`forward_with_states` shares it with the task loss;
``outputs=`` does for one layer): CPU GRU/LSTM layers run as autograd Functions that return states and gates and
take gradients for both (:mod:`rnnjac._recurrence`), so the penalty's gradient on the gates joins the task loss's
backward recurrence and no GEMM is run twice; other layers run torch's fused kernel, one layer at a time, and
their gates (LSTM) are two GEMMs over ``(B T, ·)``. A custom cell's trajectory comes from its step. Everything after
the states is parallel over time; only the end-to-end product and the Lyapunov QR chain run step by step. Nothing
the forward computed is computed again: each layer's next state is read from the trajectory (the input of the
layer above; all of ``phi'`` for tanh/relu), and the gates are kept with the states (those of
:func:`forward_with_states` as long as that tensor is unchanged) and reused. ``compile=True`` fuses the
remaining elementwise passes with ``torch.compile`` (first-order gradients; one warning and the eager code where it
cannot compile).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from ._checks import (
    NonFiniteError,
    RnnjacWarning,
    check_bool,
    check_choice,
    check_compile,
    check_generator,
    check_lyapunov_options,
    check_positive_int,
    check_power_dtype,
    check_states_finite,
    prepare,
)
from ._input_output import input_output_penalty
from ._lyapunov_qr import LyapunovQR, initial_basis
from ._penalties import _end_to_end, _linearize, _per_step, _raise_nonfinite, _time_index, tangent_map

__all__ = ["jacobian_penalty", "lyapunov_penalty", "input_output_penalty", "JacobianPenalty", "forward_with_states"]

KINDS = ("frobenius", "spectral", "end_to_end")
ESTIMATORS = ("exact", "projection")


def _warn_no_grad(dyn, inputs, s0) -> None:
    params = dyn.tensors()
    if params and not any(t.requires_grad for t in [*params, inputs, s0]):
        warnings.warn(
            "none of the model's parameters (nor the inputs, nor h0) require grad: the penalty will have no gradient",
            RnnjacWarning,
            stacklevel=4,
        )


def _prepare(model, inputs, h0, state, batch_first, outputs, submodule, states=None):
    """The checked problem of a penalty (the recurrent core of a larger model with ``submodule``), with a warning
    when nothing in it requires grad."""
    problem = prepare(model, inputs, h0, state=state, batch_first=batch_first, submodule=submodule)
    if outputs is not None and states is not None:
        raise ValueError("pass outputs= (one layer) or states= (from forward_with_states), not both")
    if problem.attrs and (outputs is not None or states is not None):
        raise ValueError(
            "outputs=/states= come from the recurrent module's own forward; with a whole model (submodule "
            f"{problem.attrs['submodule']!r}) the core is re-run on its captured inputs: leave them None"
        )
    _warn_no_grad(problem.dyn, problem.xs, problem.s0)
    return problem


def _states_and_gates(problem, outputs=None, states=None) -> tuple[Tensor, list | None]:
    """Differentiable states ``(B, T+1, D)``, checked finite: the caller's ``states`` (:func:`forward_with_states`)
    or ``System.sequence_states`` (from the caller's own ``outputs`` of a single-layer module, else the fused
    forward of a built-in module, else the step); and, for a built-in module, the gates its forward computed
    (``BuiltinSystem.sequence_states_and_gates``), which the linearisation reuses, else None."""
    dyn, gates = problem.dyn, None
    if states is not None:
        _check_given_states(problem, states)
        gates = dyn.recall_gates(states) if hasattr(dyn, "recall_gates") else None
    elif hasattr(dyn, "sequence_states_and_gates"):
        states, gates = dyn.sequence_states_and_gates(problem.s0, problem.xs, outputs, unbatched=problem.unbatched)
    else:
        states = dyn.sequence_states(problem.s0, problem.xs, outputs, unbatched=problem.unbatched)
    check_states_finite(states.detach())
    return states, gates


def _check_given_states(problem, states) -> None:
    if not isinstance(states, Tensor):
        raise TypeError(f"states must be the tensor returned by forward_with_states; got {type(states).__name__}")
    want = (problem.batch, problem.steps + 1, problem.dyn.state_size)
    if tuple(states.shape) != want:
        raise ValueError(
            f"states must be the (B, T+1, D) = {want} states of forward_with_states(model, inputs, h0) for these "
            f"inputs; got shape {tuple(states.shape)}"
        )
    s0 = problem.s0.to(dtype=states.dtype, device=states.device)
    if not torch.allclose(states[:, 0].detach(), s0.detach(), rtol=1e-5, atol=1e-6):
        raise ValueError("states[:, 0] is not the initial state of h0: pass the h0 given to forward_with_states")


def forward_with_states(
    model, inputs, h0=None, *, batch_first: bool | None = None, double_backward: bool = False
) -> tuple[Tensor, Tensor]:
    """Run a built-in recurrent module once, returning its outputs and the states every penalty needs.

    The layers run one at a time with the module's own weights (no inter-layer dropout), so gradients reach the
    weights exactly as through ``model(inputs, h0)``: on the CPU a GRU or LSTM layer (no projection) runs as one
    autograd Function that also keeps its gates for the penalty (:mod:`rnnjac._recurrence`), anything else through
    torch's fused kernel. Use ``outputs`` for the
    task loss and pass ``states=states`` to :func:`jacobian_penalty` / :func:`lyapunov_penalty` (or
    :class:`JacobianPenalty`): the trajectory is then computed once per training step, for any number of layers.

    On CUDA the layers run on cuDNN (as ``model(inputs)`` does), with ``train=True``, so the backward pass works
    whether the module is in train or eval mode. cuDNN's RNN backward is first-order only: if the loss's gradient
    is differentiated again (``create_graph=True``: gradient penalties, Hessian-vector products, gradgradcheck),
    pass ``double_backward=True``, which runs the layers on torch's own fused CUDA kernels instead (slower,
    differentiable twice). On the CPU ``double_backward`` changes nothing.

    Parameters
    ----------
    model : nn.RNN, nn.GRU or nn.LSTM
        Unidirectional, any ``num_layers`` and ``proj_size``; ``dropout > 0`` only in eval mode.
    inputs, h0, batch_first
        As for ``model(inputs, h0)`` (``h0`` also as the flat state, README "Conventions").
    double_backward : bool
        On CUDA, avoid cuDNN so that the loss's gradient can be differentiated again (see above).

    Returns
    -------
    outputs : Tensor
        The top layer's outputs, as ``model(inputs, h0)[0]`` (same layout).
    states : Tensor
        ``(B, T+1, D)`` flat states ``s_0..s_T`` (batch first, ``B = 1`` for unbatched inputs; README
        "Conventions": "State vector"); ``states[:, -1]`` is the final state.

    Examples
    --------
    >>> import torch, rnnjac
    >>> gru = torch.nn.GRU(3, 16, num_layers=2, batch_first=True)
    >>> x = torch.randn(8, 20, 3)
    >>> out, states = rnnjac.regularizers.forward_with_states(gru, x)
    >>> pen = rnnjac.regularizers.jacobian_penalty(gru, x, states=states)
    >>> (out.pow(2).mean() + 1e-2 * pen).backward()
    """
    if not isinstance(model, nn.RNNBase):
        raise TypeError(f"forward_with_states takes an nn.RNN, nn.GRU or nn.LSTM module; got {type(model).__name__}")
    if model.training and model.dropout > 0 and model.num_layers > 1:
        raise ValueError(
            f"model has dropout={model.dropout} between its layers in train mode, which the penalties' dynamical "
            "system does not have: call model.eval(), build it with dropout=0, or compute the task outputs with "
            "model(inputs) and call the penalty without states="
        )
    check_bool("double_backward", double_backward)
    problem = prepare(model, inputs, h0, batch_first=batch_first)
    states, gates = problem.dyn.fused_states_and_gates(problem.s0, problem.xs, cudnn=not double_backward)
    problem.dyn.remember_gates(states, gates)  # the LSTM gates, for the penalty's linearisation
    out = problem.dyn.split(states[:, 1:])[-1][0]  # a split view: torch refuses in-place edits of the states
    if problem.unbatched:
        out = out.squeeze(0)
    elif not (model.batch_first if batch_first is None else batch_first):
        out = out.transpose(0, 1)
    return out, states


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
    states: Tensor | None = None,
    compile: bool = False,  # noqa: A002
    power_dtype: torch.dtype | None = None,
) -> Tensor:
    """A differentiable penalty on the step (or end-to-end) Jacobians; see the module docstring.

    Parameters
    ----------
    model, inputs, h0, state, batch_first
        As in :func:`rnnjac.jacobians`; gradients flow to the model's parameters and to ``inputs``.
    kind : {"frobenius", "spectral", "end_to_end"}
    estimator : {"exact", "projection"}
        For ``kind="frobenius"`` and ``"end_to_end"``; ``kind="spectral"`` ignores it (and ``n_proj``): its power
        iterations are its estimator. Ignored options are accepted, so that one set of options can serve every
        ``kind`` (e.g. a loop over kinds in a sweep).
    n_proj : int
        Random projections per Jacobian (projection estimator).
    n_iter : int
        Power iterations (``kind="spectral"``; the other kinds ignore it).
    time_stride : int
        Use every ``time_stride``-th step (t = 1, 1 + stride, ...) for the per-step kinds.
    generator : torch.Generator, optional
        Seeds projections and power-iteration starts. Without one they are drawn on the model's device from
        torch's global random state (fast); a generator on another device than the model's (a CPU generator for a
        CUDA model) draws there in float64 and copies: the same vectors on every device, at the cost of the copy.
    outputs : Tensor, optional
        The output sequence of the caller's own ``model(inputs, h0)`` (single-layer modules). The
        penalty then reuses that forward instead of recomputing the trajectory, which makes the
        regularised training step much cheaper; gradients flow through it exactly as the task loss's
        do (on CUDA that forward is cuDNN's, so use it in train mode there).
    submodule : str or nn.Module, optional
        The recurrent core of a larger model (see :func:`rnnjac.spectra`); its captured inputs are detached
        (module docstring). Not with ``outputs``.
    states : Tensor, optional
        The states returned by :func:`forward_with_states` (any number of layers): the penalty reuses that
        forward, shared with the task loss. Not with ``outputs`` or ``submodule``.
    compile : bool
        Run the elementwise passes of a built-in module's linearisation (its coefficients, the row forms of
        ``||J||_F^2``, the spectral penalty's power iterations and value, the projection estimate, each step's
        product of the end-to-end penalty) through ``torch.compile``, which fuses each into a few loops around
        the GEMMs, forward and backward. The first call compiles (tens of seconds on a CPU); the coefficient
        and row functions recompile once when a size first changes, the functions of whole linearisations
        (spectral, projection, per-step products) compile once per model structure and input sizes (a new batch
        size or sequence length compiles again). The compiled graphs support first-order gradients only (no
        double backward: leave it False for gradgradcheck or Hessian-vector products). Where ``torch.compile``
        is unavailable or fails, the eager code runs instead, with one :class:`~rnnjac.errors.RnnjacWarning`. No
        effect on custom cells.
    power_dtype : torch.dtype, optional
        ``kind="spectral"``: run the ``n_iter`` power iterations (no gradient: they only choose the direction
        ``v``) in this floating dtype, e.g. ``torch.bfloat16``, where its matrix products are faster (CPUs with
        AMX, GPUs with tensor cores: about 8x on this project's benchmark CPU); ``v`` is then normalised and the
        penalty ``||J v||^2`` and its gradient are computed in the states' dtype, so the value stays a Rayleigh
        quotient of the exact ``J^T J`` (a lower bound of ``sigma_max^2``), only its direction is rounded. None
        (default): the states' dtype. See README "Penalties".

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
    check_compile(compile)
    check_power_dtype(power_dtype, kind)
    check_generator(generator)
    problem = _prepare(model, inputs, h0, state, batch_first, outputs, submodule, states)
    states, gates = _states_and_gates(problem, outputs, states)
    if kind == "end_to_end":
        vals = _end_to_end(problem, states, estimator, n_proj, generator, gates, compile)
        _raise_nonfinite(vals, None, kind)
        return vals.mean()
    t_idx = _time_index(problem.steps, time_stride)
    vals = _per_step(problem, states, kind, estimator, n_proj, n_iter, t_idx, generator, gates, compile, power_dtype)
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
    states: Tensor | None = None,
    compile: bool = False,  # noqa: A002
) -> Tensor:
    """Mean over the batch and the top ``k`` exponents of ``(lambda_i - target)^2``, differentiable.

    The exponents are computed as in :func:`rnnjac.lyapunov_spectrum` (same transients and
    ``reortho_every``) with gradients flowing through every ``J_t Q`` and QR ("gradient flossing",
    Engelken 2023); they are divided by the number of counted steps. ``outputs``, ``states``, ``submodule``,
    ``compile`` (the linearisations' elementwise passes, and each step's ``J_t Q`` as one compiled function): as
    in :func:`jacobian_penalty`.

    Examples
    --------
    >>> import torch, rnnjac
    >>> rnn = torch.nn.RNN(2, 12, batch_first=True)
    >>> pen = rnnjac.regularizers.lyapunov_penalty(rnn, torch.randn(4, 30, 2), k=3, warmup=5)
    >>> pen.backward()
    """
    if not isinstance(target, (int, float)) or not math.isfinite(target):
        raise ValueError(f"target must be a finite number; got {target!r}")
    check_compile(compile)
    check_generator(generator)
    problem = _prepare(model, inputs, h0, state, batch_first, outputs, submodule, states)
    check_lyapunov_options(problem, k, warmup, tangent_warmup, reortho_every, k_required=True)
    d = problem.dyn.size(problem.state)
    states, gates = _states_and_gates(problem, outputs, states)
    steps, b, state = problem.steps, problem.batch, problem.state
    per_step = _linearize(problem, states, torch.arange(warmup, steps), gates, compile).unbind(steps - warmup)
    q0 = initial_basis(d, k, generator, states.dtype, states.device, b)
    acc = LyapunovQR(
        q0, steps, warmup=warmup, tangent_warmup=tangent_warmup, reortho_every=reortho_every, differentiable=True
    )
    finite, qr_steps = [], []  # checked after the loop: no host round-trip per step
    for j, lin_t in enumerate(per_step):
        t = warmup + j + 1
        flag = acc.step(t, tangent_map(lin_t, state, compile))
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

    def forward(self, model, inputs, h0=None, outputs=None, *, states=None) -> Tensor:
        if self.kind == "input_output":
            if h0 is not None or outputs is not None or states is not None:
                raise ValueError(
                    "kind='input_output' penalises model(inputs) end to end: pass the whole callable as model "
                    "and leave h0=None, outputs=None, states=None (put the initial state inside the callable)"
                )
            return self.weight * input_output_penalty(model, inputs, **self.options)
        shared = {"outputs": outputs, "states": states}
        if self.kind == "lyapunov":
            return self.weight * lyapunov_penalty(model, inputs, h0, **shared, **self.options)
        return self.weight * jacobian_penalty(model, inputs, h0, kind=self.kind, **shared, **self.options)

    def extra_repr(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"kind={self.kind!r}, weight={self.weight}" + (f", {opts}" if opts else "")
