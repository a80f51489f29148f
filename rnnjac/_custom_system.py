"""User-defined steps: :class:`CustomCell` and its :class:`~rnnjac._system.System`, :class:`CustomSystem`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ._linearization import DenseLinearization, Linearization, StateLayout, grad_region
from ._system import System, as_tensor

__all__ = ["CustomCell", "CustomSystem"]


class CustomCell:
    """A user-defined recurrent step, analysed like the built-in cells.

    Parameters
    ----------
    step : callable
        ``step(s, x) -> s_next`` on batched tensors ``s`` of shape ``(B, D)`` and ``x`` of shape
        ``(B, I)``. It must be written with differentiable torch operations (it is differentiated
        with ``torch.func``).
    jacobian : callable, optional
        ``jacobian(s, x) -> (B, D, D)``, the user's own closed form of ``d step / d s``. When given,
        ``method="analytic"`` (and ``"auto"``) uses it, and :func:`rnnjac.verify` checks it.
    name : str, optional
        Recorded as the ``architecture`` attribute of outputs (default ``"custom"``).
    parameters : iterable of Tensor, optional
        Tensors the step depends on: checked for NaN/Inf (named ``parameters[i]`` in errors) and
        against the inputs' dtype/device. rnnjac never converts a custom step: ``dtype=``/``device=``
        apply to built-in modules only, so convert the step's tensors, ``h0`` and the inputs yourself.

    Examples
    --------
    >>> import torch, rnnjac
    >>> W = torch.randn(3, 3) * 0.5
    >>> cell = rnnjac.CustomCell(lambda s, x: torch.tanh(s @ W.T + x))
    >>> rnnjac.jacobians(cell, torch.randn(2, 5, 3), torch.zeros(2, 3)).shape
    torch.Size([2, 5, 3, 3])
    """

    def __init__(
        self,
        step: Callable[[Tensor, Tensor], Tensor],
        jacobian: Callable[[Tensor, Tensor], Tensor] | None = None,
        *,
        name: str = "custom",
        parameters=None,
    ):
        if not callable(step):
            raise TypeError(f"CustomCell step must be callable, got {type(step).__name__}")
        if jacobian is not None and not callable(jacobian):
            raise TypeError(f"CustomCell jacobian must be callable or None, got {type(jacobian).__name__}")
        self.step = step
        self.jacobian = jacobian
        self.name = name
        self.parameters = list(parameters) if parameters is not None else []

    def __repr__(self) -> str:
        return f"CustomCell({self.name!r}, jacobian={'yes' if self.jacobian else 'no'})"


def _same_device(have: torch.device, want) -> bool:
    want = torch.device(want)
    return have.type == want.type and (want.index is None or have.index == want.index)


class CustomSystem(System):
    """A :class:`CustomCell` (or a bare callable, wrapped in one): one flat state ``[h]`` of size ``D``.

    The step is opaque: it is never converted to another dtype/device, and its Jacobian is either the
    user's closed form or ``torch.func``'s (:class:`~rnnjac._linearization.DenseLinearization`).

    Examples
    --------
    >>> system = CustomSystem(CustomCell(lambda s, x: 0.5 * s + x), state_size=2)
    >>> s0 = system.initial_state(torch.ones(3, 2), torch.zeros(3, 4, 2), unbatched=False)
    >>> system.linearize(s0, torch.zeros(3, 2), "autograd").materialize()[0].tolist()
    [[0.5, 0.0], [0.0, 0.5]]
    """

    arch = "custom"
    kind = "custom"
    input_size = -1
    supports_h_state = False
    convertible = False
    _weights_are = "the custom cell's parameters are"
    _dtype_fix = ""

    def __init__(self, custom: CustomCell, state_size: int | None = None):
        self.custom = custom
        self.hidden_size = state_size or 0
        self.layout = StateLayout([[("h", int(state_size or 0))]])

    @property
    def has_closed_form(self) -> bool:
        return self.custom.jacobian is not None

    def _default_state(self, batch: int, like: Tensor) -> Tensor:
        raise ValueError("h0 is required for a custom cell: it fixes the state size D (shape (B, D))")

    def _state_like(self, s0: Tensor, xs: Tensor) -> Tensor:
        if s0.dtype != xs.dtype:
            raise TypeError(
                f"h0 has dtype {s0.dtype} but inputs have dtype {xs.dtype} (both as passed): a custom step runs "
                "in the dtype of its inputs; pass h0 and inputs in the same dtype"
            )
        if s0.device != xs.device:
            raise ValueError(f"h0 is on {s0.device} but inputs are on {xs.device} (both as passed); move one of them")
        return s0

    def named_tensors(self) -> list[tuple[str, Tensor]]:
        """The declared ``parameters``, named ``parameters[i]``."""
        return [(f"parameters[{i}]", t) for i, t in enumerate(self.custom.parameters)]

    def to(self, dtype=None, device=None) -> CustomSystem:
        return self  # the closure is the caller's: see converted()

    def detached(self) -> CustomSystem:
        return self

    def for_autograd(self) -> CustomSystem:
        return self

    def describe(self) -> dict:
        return {
            "architecture": self.custom.name,
            "num_layers": 1,
            "hidden_size": self.hidden_size,
            "input_size": self.input_size,
            "proj_size": 0,
        }

    def converted(self, xs: Tensor, h0, dtype, device) -> tuple[System, Tensor]:
        """``dtype=``/``device=`` cannot convert a custom step (its closure is opaque): a no-op when everything
        already matches, else an error before any work."""
        if dtype is None and device is None:
            return self, xs
        named = [("inputs", xs)]
        if isinstance(h0, (Tensor, np.ndarray)):
            named.append(("h0", as_tensor("h0", h0)))
        named += self.named_tensors()
        found = [
            f"{name}: {t.dtype}, {t.device}"
            for name, t in named
            if (dtype is not None and t.dtype != dtype) or (device is not None and not _same_device(t.device, device))
        ]
        if not found:
            return self, xs
        given = ", ".join(f"{k}={v}" for k, v in (("dtype", dtype), ("device", device)) if v is not None)
        raise TypeError(
            f"{given} cannot convert a custom step (CustomCell or callable): its tensors live in its own closure. "
            "Convert the step's tensors and h0 yourself and pass inputs of that dtype/device; dtype= and device= "
            f"apply to built-in modules only (nn.RNN/GRU/LSTM and their cells). Found {'; '.join(found)}"
        )

    def validate(self, s0: Tensor, x0: Tensor) -> None:
        """The step returns a tensor of the state's shape that depends on ``s``; a closed form has shape
        ``(B, D, D)``."""
        with grad_region():
            s = s0.detach().clone().requires_grad_(True)
            out = self.custom.step(s, x0.detach().clone())
            if not isinstance(out, Tensor):
                raise TypeError(
                    f"custom step must return a Tensor of shape {tuple(s0.shape)}; got {type(out).__name__}"
                )
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
        if self.custom.jacobian is not None:
            j = self.custom.jacobian(s0, x0)
            want = (s0.shape[0], s0.shape[1], s0.shape[1])
            if not isinstance(j, Tensor) or tuple(j.shape) != want:
                found = tuple(j.shape) if isinstance(j, Tensor) else type(j).__name__
                raise ValueError(f"custom jacobian(s, x) must return shape {want}; got {found}")

    def step(self, s: Tensor, x: Tensor) -> Tensor:
        return self.custom.step(s, x)

    def _closed_form(self, s: Tensor, x: Tensor) -> Linearization:
        assert self.custom.jacobian is not None  # "analytic" for a custom cell needs its closed form
        return DenseLinearization(self.layout, s, x, self.custom.jacobian(s, x))

    def restricted_step(self, state: str, s: Tensor):
        """The full step whatever ``state`` (a custom state has no c part to hold)."""
        return s, lambda z, x, s_ref=None: self.step(z, x)
