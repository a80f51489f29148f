"""Input checking, in one place, before any work starts.

:func:`prepare` turns the public arguments ``(model, inputs, h0, ...)`` into a :class:`Problem` with
batch-first inputs ``(B, T, I)`` and a flat initial state ``(B, D)``, or raises a ``ValueError`` /
``TypeError`` that says what was expected and what was found.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ._dynamics import System, as_dynamics, as_tensor
from .errors import NonFiniteError, RnnjacWarning  # noqa: F401  (RnnjacWarning: re-exported from here)

log = logging.getLogger("rnnjac")

STATES = ("full", "h")
_DEVICE = re.compile(r"(cpu|cuda)(:(\d+))?")
METHODS = ("auto", "analytic", "autograd")


@dataclass
class Problem:
    """Normalised arguments: ``xs`` is ``(B, T, I)``, ``s0`` is ``(B, D)`` (full state)."""

    dyn: System
    xs: Tensor
    s0: Tensor
    unbatched: bool
    method: str
    state: str
    attrs: dict = field(default_factory=dict)
    """Extra attributes for the result: ``{"submodule": name}`` when a submodule of a larger model was analysed."""

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


AUTO = "auto"


def check_int_or_auto(name: str, value, *, minimum: int = 1, auto: bool = True) -> None:
    """An integer ``>= minimum`` or (with ``auto``) the string ``"auto"``."""
    if auto and isinstance(value, str):
        if value != AUTO:
            raise ValueError(f"{name} must be an integer >= {minimum} or 'auto'; got {value!r}")
        return
    check_positive_int(name, value, minimum=minimum)


def check_bool(name: str, value) -> None:
    """``value`` must be True or False (not merely truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False; got {value!r}")


def check_compile(compile) -> None:  # noqa: A002
    check_bool("compile=", compile)


def check_generator(generator) -> None:
    """``generator`` is None or a ``torch.Generator``.

    Examples
    --------
    >>> check_generator(0)
    Traceback (most recent call last):
    ...
    TypeError: generator must be a torch.Generator or None (e.g. torch.Generator().manual_seed(0)); got int
    """
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator or None (e.g. torch.Generator().manual_seed(0)); got "
            f"{type(generator).__name__}"
        )


def check_power_dtype(power_dtype, kind: str) -> None:
    if power_dtype is None:
        return
    if not isinstance(power_dtype, torch.dtype) or not power_dtype.is_floating_point:
        raise TypeError(
            f"power_dtype must be a floating torch.dtype (e.g. torch.bfloat16) or None; got {power_dtype!r}"
        )
    if kind != "spectral":
        raise ValueError(f"power_dtype applies to kind='spectral' (its power iterations) only; got kind={kind!r}")


def check_lyapunov_options(
    problem: Problem,
    k,
    warmup,
    tangent_warmup,
    reortho_every,
    *,
    lyapunov: bool = True,
    k_required: bool = False,
    auto: bool = False,
) -> None:
    """Lyapunov options: ``k`` in 1..D (None means all unless ``k_required``), transients that leave a
    counted step, ``reortho_every >= 1``; with ``auto`` (the spectra) each of ``warmup``, ``tangent_warmup``
    and ``reortho_every`` may also be ``"auto"`` (then counted as 0 here). Shared by the spectra and the
    Lyapunov penalty."""
    d, steps = problem.dyn.size(problem.state), problem.steps
    if (k is not None or k_required) and (isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= d):
        raise ValueError(f"k must be an integer with 1 <= k <= D = {d} (state={problem.state!r}); got {k!r}")
    check_int_or_auto("warmup", warmup, minimum=0, auto=auto)
    check_int_or_auto("tangent_warmup", tangent_warmup, minimum=0, auto=auto)
    check_int_or_auto("reortho_every", reortho_every, auto=auto)
    given = f"warmup={warmup!r}, tangent_warmup={tangent_warmup!r}"
    warmup = 0 if warmup == AUTO else warmup
    tangent_warmup = 0 if tangent_warmup == AUTO else tangent_warmup
    if warmup >= steps:
        raise ValueError(f"warmup must be smaller than the number of steps T = {steps}; got warmup={warmup}")
    if lyapunov and warmup + tangent_warmup >= steps:
        raise ValueError(f"warmup + tangent_warmup must leave at least one counted step: T = {steps}, got {given}")


def first_nonfinite_step(x: Tensor, time_dim: int = 1) -> int | None:
    """Index along ``time_dim`` of the first slice with a NaN/Inf, or None.

    A NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum (one pass, the common case) clears ``x``;
    only a non-finite sum (a bad entry, or a sum that overflows) is searched entry by entry.
    """
    if x.numel() and bool(torch.isfinite(x.sum())):
        return None
    bad = ~torch.isfinite(x)
    if not bool(bad.any()):
        return None
    dims = [d for d in range(x.dim()) if d != time_dim % x.dim()]
    per_t = bad.any(dim=dims[0]) if len(dims) == 1 else bad.permute(time_dim, *dims).flatten(1).any(1)
    return int(torch.nonzero(per_t)[0, 0])


def check_finite_weights(dyn: System) -> None:
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


def recurrent_core(model, inputs, h0=None, *, submodule=None, batch_first=None):
    """What a public function analyses: ``(model, inputs, h0, batch_first, attrs)``.

    The one place where ``submodule=`` is handled (see :func:`rnnjac.spectra`): a recurrent module, cell,
    ``CustomCell`` or step function with ``submodule=None`` passes through unchanged (``attrs`` empty); any
    other ``nn.Module`` (or any model with ``submodule=``) is run whole on ``inputs`` once and its recurrent
    submodule comes back with exactly what it received (:func:`rnnjac._submodule.resolve`), batch-first, and
    ``attrs={"submodule": dotted name}``. An ``nn.Module`` that holds no recurrent submodule passes through too
    (and is refused by :func:`rnnjac._dynamics.as_dynamics` with a ``TypeError`` that says what is accepted).
    """
    from ._submodule import recurrent_submodules, resolve

    if submodule is None and isinstance(model, torch.nn.Module) and not recurrent_submodules(model):
        return model, inputs, h0, batch_first, {}
    return resolve(model, inputs, h0, submodule=submodule, batch_first=batch_first)


def recurrent_module(model, submodule=None):
    """``(module, attrs)`` for functions without an input sequence (:func:`rnnjac.fixed_points`): the recurrent
    submodule named by ``submodule`` (or the only one) of a larger ``nn.Module``, with no forward pass."""
    from ._submodule import RECURRENT, _find, _label, recurrent_submodules

    if submodule is None and (not isinstance(model, torch.nn.Module) or isinstance(model, RECURRENT)):
        return model, {}
    if submodule is None and not recurrent_submodules(model):
        return model, {}  # refused later with the TypeError that says what is accepted
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"submodule= needs the model as an nn.Module; got {type(model).__name__}")
    name, module = _find(model, submodule)
    log.info("analysing submodule %s (%r)", _label(name), module)
    return module, {"submodule": name}


def check_device(device) -> torch.device:
    """The ``torch.device`` for ``device`` (``'cpu'``, ``'cuda'`` or ``'cuda:N'``), checked before any work.

    Raises ``ValueError`` for another name, and when CUDA (or device ``N``) is not available here.

    Examples
    --------
    >>> check_device("cpu")
    device(type='cpu')
    >>> check_device("gpu")
    Traceback (most recent call last):
    ...
    ValueError: device must be cpu, cuda or cuda:N; got 'gpu'
    """
    name = str(device)
    match = _DEVICE.fullmatch(name)
    if match is None:
        raise ValueError(f"device must be cpu, cuda or cuda:N; got {device!r}")
    if match.group(1) == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device={name!r} was asked for but CUDA is not available on this machine "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})"
            )
        index = match.group(3)
        if index is not None and int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"device={name!r} but this machine has {torch.cuda.device_count()} CUDA device(s) (cuda:0 ...)"
            )
    return torch.device(name)


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
    submodule=None,
) -> Problem:
    """Validate and normalise the public arguments (see module docstring); ``submodule``: see
    :func:`recurrent_core`."""
    check_choice("state", state, STATES)
    check_choice("method", method, METHODS)
    model, inputs, h0, batch_first, attrs = recurrent_core(
        model, inputs, h0, submodule=submodule, batch_first=batch_first
    )
    xs = as_tensor("inputs", inputs)
    if not xs.is_floating_point():
        raise TypeError(f"inputs must be a floating-point tensor; got dtype {xs.dtype}")
    if isinstance(h0, Tensor) and model is not None and not isinstance(model, torch.nn.Module):
        state_size = h0.shape[-1]
    else:
        state_size = None
    dyn = as_dynamics(model, state_size=state_size)
    if not dyn.supports_h_state:
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
    dyn.check_input_size(xs, tuple(inputs.shape))
    if device is not None and torch.device(device).type == "cuda":  # not torch's bare AssertionError
        device = check_device(device)
    dyn, xs = dyn.converted(xs, h0, dtype, device)
    dyn.check_matches(xs)
    t_bad = first_nonfinite_step(xs, 1)
    if t_bad is not None:
        raise NonFiniteError(f"inputs contain NaN/Inf, first at step t={t_bad + 1}")
    check_finite_weights(dyn)
    s0 = dyn.initial_state(h0, xs, unbatched)
    if not bool(torch.isfinite(s0).all()):
        raise NonFiniteError("h0 contains NaN/Inf")
    dyn.validate(s0, xs[:, 0])
    if method == "auto":
        method = "analytic" if dyn.has_closed_form else "autograd"
    elif method == "analytic" and not dyn.has_closed_form:
        raise ValueError(
            "method='analytic' needs a closed form; this CustomCell has no jacobian=... (use "
            "method='autograd' or 'auto')"
        )
    return Problem(dyn=dyn, xs=xs, s0=s0, unbatched=unbatched, method=method, state=state, attrs=attrs)
