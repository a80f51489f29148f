"""Input checking, in one place, before any work starts.

:func:`prepare` turns the public arguments ``(model, inputs, h0, ...)`` into a :class:`Problem` with
batch-first inputs ``(B, T, I)`` and a flat initial state ``(B, D)``, or raises a ``ValueError`` /
``TypeError`` that says what was expected and what was found.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .dynamics import Dynamics, as_dynamics, grad_region
from .errors import NonFiniteError, RnnjacWarning  # noqa: F401  (RnnjacWarning: re-exported from here)

STATES = ("full", "h")
METHODS = ("auto", "analytic", "autograd")


@dataclass
class Problem:
    """Normalised arguments: ``xs`` is ``(B, T, I)``, ``s0`` is ``(B, D)`` (full state)."""

    dyn: Dynamics
    xs: Tensor
    s0: Tensor
    unbatched: bool
    method: str
    state: str

    @property
    def batch(self) -> int:
        return self.xs.shape[0]

    @property
    def steps(self) -> int:
        return self.xs.shape[1]


def check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def check_positive_int(name: str, value, *, minimum: int = 1, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def check_lyapunov_options(
    problem: Problem, k, warmup, tangent_warmup, reortho_every, *, lyapunov: bool = True, k_required: bool = False
) -> None:
    """Lyapunov options: ``k`` in 1..D (None means all unless ``k_required``), transients that leave a
    counted step, ``reortho_every >= 1``. Shared by the spectra and the Lyapunov penalty."""
    d, steps = problem.dyn.size(problem.state), problem.steps
    if (k is not None or k_required) and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d):
        raise ValueError(f"k must be an integer with 1 <= k <= D = {d} (state={problem.state!r}); got {k!r}")
    check_positive_int("warmup", warmup, minimum=0)
    check_positive_int("tangent_warmup", tangent_warmup, minimum=0)
    check_positive_int("reortho_every", reortho_every)
    if warmup >= steps:
        raise ValueError(f"warmup must be smaller than the number of steps T = {steps}; got warmup={warmup}")
    if lyapunov and warmup + tangent_warmup >= steps:
        raise ValueError(
            f"warmup + tangent_warmup must leave at least one counted step: T = {steps}, "
            f"warmup = {warmup}, tangent_warmup = {tangent_warmup}"
        )


def first_nonfinite_step(x: Tensor, time_dim: int = 1) -> int | None:
    """Index along ``time_dim`` of the first slice with a NaN/Inf, or None."""
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return None
    dims = [d for d in range(x.dim()) if d != time_dim % x.dim()]
    per_t = bad.any(dim=dims[0]) if len(dims) == 1 else bad.permute(time_dim, *dims).flatten(1).any(1)
    return int(torch.nonzero(per_t)[0, 0])


def check_finite_weights(dyn: Dynamics) -> None:
    """Raise :class:`NonFiniteError` naming every parameter (``weight_hh_l0`` ...) that holds NaN/Inf."""
    bad = []
    for name, t in dyn.named_tensors():
        n_bad = int((~torch.isfinite(t.detach())).sum())
        if n_bad:
            bad.append(f"{name} ({n_bad} of {t.numel()} entries, shape {tuple(t.shape)})")
    if bad:
        raise NonFiniteError(f"the model's weights contain NaN or Inf: {', '.join(bad)}")


def check_states_finite(states: Tensor, offset: int = 0) -> None:
    """``states`` is ``(B, T+1, D)`` with ``states[:, 0] = s_0``; reports the first bad step t."""
    t = first_nonfinite_step(states, 1)
    if t is not None:
        raise NonFiniteError(
            f"the hidden state becomes NaN/Inf at step t={t + offset} (s_t, t counted from 1; s_0 is the "
            "initial state): the dynamics diverged or an input/weight is non-finite"
        )


def _as_tensor(name: str, value) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(f"{name} must be a torch.Tensor (or numpy array); got {type(value).__name__}")


def _flat_h0(dyn: Dynamics, h0, batch: int, unbatched: bool, like: Tensor) -> Tensor:
    d = dyn.state_size
    if h0 is None:
        if dyn.custom is not None:
            raise ValueError("h0 is required for a custom cell: it fixes the state size D (shape (B, D))")
        return like.new_zeros(batch, d)
    if isinstance(h0, (tuple, list)):
        if dyn.arch != "lstm" or len(h0) != 2:
            raise ValueError(f"h0 as a tuple is the LSTM's (h0, c0) format; got a tuple of {len(h0)} for {dyn.arch}")
        h, c = (_as_tensor("h0", t) for t in h0)
        want_h: tuple[int, ...] = (dyn.num_layers, dyn.proj_size or dyn.hidden_size)
        want_c: tuple[int, ...] = (dyn.num_layers, dyn.hidden_size)
        if dyn.kind == "cell":
            want_h, want_c = want_h[1:], want_c[1:]
        if not unbatched:
            ins = 0 if dyn.kind == "cell" else 1
            want_h = want_h[:ins] + (batch,) + want_h[ins:]
            want_c = want_c[:ins] + (batch,) + want_c[ins:]
        if tuple(h.shape) != want_h or tuple(c.shape) != want_c:
            raise ValueError(
                f"h0 = (h0, c0) must have shapes {want_h} and {want_c}; got {tuple(h.shape)} and {tuple(c.shape)}"
            )
        if dyn.kind == "cell":
            h, c = h.unsqueeze(0), c.unsqueeze(0)
        if unbatched:
            h, c = h.unsqueeze(1), c.unsqueeze(1)
        return dyn.join([(h[li], c[li]) for li in range(dyn.num_layers)])
    h0 = _as_tensor("h0", h0)
    flat = (d,) if unbatched else (batch, d)
    if tuple(h0.shape) == flat:
        return h0 if not unbatched else h0.unsqueeze(0)
    if dyn.kind == "module" and dyn.arch != "lstm":
        mod = (dyn.num_layers, dyn.hidden_size) if unbatched else (dyn.num_layers, batch, dyn.hidden_size)
        if tuple(h0.shape) == mod:
            h0 = h0.unsqueeze(1) if unbatched else h0
            return dyn.join([(h0[li], None) for li in range(dyn.num_layers)])
        raise ValueError(
            f"h0 must have shape {mod} (the module's format) or {flat} (flat state); got {tuple(h0.shape)}"
        )
    if dyn.arch == "lstm" and dyn.custom is None:
        raise ValueError(
            f"h0 for an LSTM must be the (h0, c0) tuple or a flat state of shape {flat}; got {tuple(h0.shape)}"
        )
    raise ValueError(f"h0 must have shape {flat} (flat state, D={d}); got {tuple(h0.shape)}")


def _same_device(have: torch.device, want) -> bool:
    want = torch.device(want)
    return have.type == want.type and (want.index is None or have.index == want.index)


def _check_custom_conversion(dyn: Dynamics, xs: Tensor, h0, dtype, device) -> None:
    """``dtype=``/``device=`` cannot convert a custom step (its closure is opaque): a no-op when everything
    already matches, else an error before any work."""
    if dtype is None and device is None:
        return
    named = [("inputs", xs)]
    if isinstance(h0, (Tensor, np.ndarray)):
        named.append(("h0", _as_tensor("h0", h0)))
    named += dyn.named_tensors()
    found = [
        f"{name}: {t.dtype}, {t.device}"
        for name, t in named
        if (dtype is not None and t.dtype != dtype) or (device is not None and not _same_device(t.device, device))
    ]
    if not found:
        return
    given = ", ".join(f"{k}={v}" for k, v in (("dtype", dtype), ("device", device)) if v is not None)
    raise TypeError(
        f"{given} cannot convert a custom step (CustomCell or callable): its tensors live in its own closure. "
        "Convert the step's tensors and h0 yourself and pass inputs of that dtype/device; dtype= and device= "
        f"apply to built-in modules only (nn.RNN/GRU/LSTM and their cells). Found {'; '.join(found)}"
    )


def _check_weights_match(dyn: Dynamics, xs: Tensor) -> None:
    if dyn.dtype is None:
        return
    whose = "the custom cell's parameters are" if dyn.custom is not None else "the model's weights are"
    if xs.dtype != dyn.dtype:
        fix = "" if dyn.custom is not None else " (or pass dtype=...)"
        raise TypeError(f"inputs have dtype {xs.dtype} but {whose} {dyn.dtype}; convert one of them{fix}")
    if xs.device != dyn.device:
        raise ValueError(f"inputs are on {xs.device} but {whose} on {dyn.device}")


def _check_custom_step(dyn: Dynamics, s0: Tensor, x0: Tensor) -> None:
    cell = dyn.custom
    assert cell is not None
    with grad_region():
        s = s0.detach().clone().requires_grad_(True)
        out = cell.step(s, x0.detach().clone())
        if not isinstance(out, Tensor):
            raise TypeError(f"custom step must return a Tensor of shape {tuple(s0.shape)}; got {type(out).__name__}")
        if tuple(out.shape) != tuple(s0.shape):
            raise ValueError(
                f"custom step(s, x) must return the next state with the shape of s {tuple(s0.shape)}; "
                f"got {tuple(out.shape)}"
            )
        grad = torch.autograd.grad(out.sum(), s, allow_unused=True)[0] if out.requires_grad else None
    if grad is None:
        raise ValueError(
            "the custom step's output does not depend on its state argument s (input 0 of step(s, x) is "
            "disconnected from the graph): J = ds'/ds would be identically zero; check that the step "
            "uses s through differentiable torch operations (no .detach(), .item(), numpy)"
        )
    if cell.jacobian is not None:
        j = cell.jacobian(s0, x0)
        want = (s0.shape[0], s0.shape[1], s0.shape[1])
        if not isinstance(j, Tensor) or tuple(j.shape) != want:
            found = tuple(j.shape) if isinstance(j, Tensor) else type(j).__name__
            raise ValueError(f"custom jacobian(s, x) must return shape {want}; got {found}")


def prepare(
    model,
    inputs,
    h0=None,
    *,
    state: str = "full",
    method: str = "auto",
    batch_first: bool | None = None,
    dtype: torch.dtype | None = None,
    device=None,
) -> Problem:
    """Validate and normalise the public arguments (see module docstring)."""
    check_choice("state", state, STATES)
    check_choice("method", method, METHODS)
    xs = _as_tensor("inputs", inputs)
    if not xs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor; got dtype {xs.dtype}")
    if isinstance(h0, Tensor) and model is not None and not isinstance(model, torch.nn.Module):
        state_size = h0.shape[-1]
    else:
        state_size = None
    dyn = as_dynamics(model, state_size=state_size)
    if dyn.custom is not None and state == "h":
        state = "full"  # a custom state has only h parts
    if xs.dim() not in (2, 3):
        raise ValueError(
            f"inputs must be (B, T, I) (or (T, B, I) with batch_first=False, or unbatched (T, I)); "
            f"got {xs.dim()} dims {tuple(xs.shape)}"
        )
    unbatched = xs.dim() == 2
    bf = dyn.batch_first if batch_first is None else bool(batch_first)
    if unbatched:
        xs = xs.unsqueeze(0)
    elif not bf:
        xs = xs.transpose(0, 1)
    if xs.shape[1] < 1:
        raise ValueError(f"inputs must have at least one time step; got T=0 in shape {tuple(xs.shape)}")
    if xs.shape[0] < 1:
        layout = "(B, T, I)" if bf else "(T, B, I) (batch_first=False)"
        raise ValueError(
            f"inputs must have at least one sample; got B=0 in shape {tuple(inputs.shape)}, read as {layout}"
        )
    if dyn.custom is None and xs.shape[-1] != dyn.input_size:
        raise ValueError(
            f"inputs have {xs.shape[-1]} features but the model expects input_size={dyn.input_size} "
            f"(inputs shape {tuple(inputs.shape)})"
        )
    if dyn.custom is not None:
        _check_custom_conversion(dyn, xs, h0, dtype, device)
    elif dtype is not None or device is not None:
        dyn = dyn.to(dtype=dtype, device=device)
        xs = xs.to(dtype=dtype or xs.dtype, device=device or xs.device)
    _check_weights_match(dyn, xs)
    t_bad = first_nonfinite_step(xs, 1)
    if t_bad is not None:
        raise NonFiniteError(f"inputs contain NaN/Inf, first at step t={t_bad + 1}")
    check_finite_weights(dyn)
    s0 = _flat_h0(dyn, h0, xs.shape[0], unbatched, xs)
    if dyn.custom is None:
        s0 = s0.to(dtype=xs.dtype, device=xs.device)
    elif s0.dtype != xs.dtype:
        raise TypeError(
            f"h0 has dtype {s0.dtype} but inputs have dtype {xs.dtype} (both as passed): a custom step runs "
            "in the dtype of its inputs; pass h0 and inputs in the same dtype"
        )
    elif s0.device != xs.device:
        raise ValueError(f"h0 is on {s0.device} but inputs are on {xs.device} (both as passed); move one of them")
    if not bool(torch.isfinite(s0).all()):
        raise NonFiniteError("h0 contains NaN/Inf")
    if dyn.custom is not None:
        _check_custom_step(dyn, s0, xs[:, 0])
    if method == "auto":
        method = "analytic" if dyn.has_closed_form else "autograd"
    elif method == "analytic" and not dyn.has_closed_form:
        raise ValueError(
            "method='analytic' needs a closed form; this CustomCell has no jacobian=... (use "
            "method='autograd' or 'auto')"
        )
    return Problem(dyn=dyn, xs=xs, s0=s0, unbatched=unbatched, method=method, state=state)
