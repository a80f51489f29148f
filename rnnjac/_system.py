"""The model protocol: a recurrent model seen as one discrete-time system ``s_t = F(s_{t-1}, x_t)``.

:class:`System` declares what the rest of the package may ask of a model, and implements what is common:

- layout: ``state_size``, ``h_size``, ``size(state)``, ``unit_coords``, ``h_index``, ``split``/``join``/``with_h``
  (a :class:`~rnnjac._linearization.StateLayout`), ``state_note(state)``;
- the caller's ``h0`` in any accepted format -> the flat ``(B, D)`` state: ``initial_state``;
- parameters: ``named_tensors``, ``tensors``, ``dtype``, ``device``, ``to``, ``detached``, ``for_autograd``,
  ``describe``;
- checks run by :func:`rnnjac._checks.prepare`: ``check_input_size``, ``converted``, ``check_matches``,
  ``validate``;
- dynamics: ``step``, ``run``, ``sequence_states`` (differentiable states for the penalties),
  ``restricted_step`` (the step on the h coordinates, c held), ``linearize`` (a
  :class:`~rnnjac._linearization.Linearization`), ``has_closed_form``, ``factored(method)``,
  ``frobenius_closed_form(state)``, ``supports_h_state``, ``convertible``.

The implementations are :class:`~rnnjac._builtin_system.BuiltinSystem` (torch's modules and cells) and
:class:`~rnnjac._custom_system.CustomSystem` (:class:`~rnnjac.CustomCell`); :func:`rnnjac._dynamics.as_dynamics`
picks one.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
from torch import Tensor

from ._linearization import DenseLinearization, Linearization, StateLayout, grad_region, normal

__all__ = ["System", "as_tensor"]


def as_tensor(name: str, value) -> Tensor:
    """``value`` as a tensor (numpy arrays are wrapped without a copy); a ``TypeError`` naming ``name`` else."""
    if isinstance(value, Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    if isinstance(value, torch.nn.utils.rnn.PackedSequence):
        raise TypeError(
            f"{name} must be a padded torch.Tensor (B, T, I) or (T, B, I); got a PackedSequence. Pad it with "
            "torch.nn.utils.rnn.pad_packed_sequence (every step of the padded tensor is then analysed, the padding "
            "too: take a batch of equal lengths, or the steps within each sequence's length from the result)"
        )
    raise TypeError(f"{name} must be a torch.Tensor (or numpy array); got {type(value).__name__}")


class System(ABC):
    """One recurrent model seen as ``s_t = F(s_{t-1}, x_t)`` on a flat state of size ``D`` (the protocol).

    Use :func:`as_dynamics` to build one. Layout members delegate to ``self.layout`` (a
    :class:`~rnnjac._linearization.StateLayout`); the rest is what each implementation owns.

    Examples
    --------
    >>> import torch
    >>> from rnnjac._dynamics import as_dynamics
    >>> system = as_dynamics(torch.nn.LSTM(2, 3, num_layers=2, batch_first=True))
    >>> system.state_size, system.h_size, system.unit_coords()["part"][:4]
    (12, 6, ['h', 'h', 'h', 'c'])
    >>> s = system.run(torch.zeros(4, system.state_size), torch.randn(4, 7, 2))
    >>> s.shape, system.linearize(s[:, -2], torch.randn(4, 2)).materialize().shape
    (torch.Size([4, 8, 12]), torch.Size([4, 12, 12]))
    """

    layout: StateLayout
    arch: str
    """The registry name of the layers (``"gru"``, ``"rnn_tanh"``...) or ``"custom"``."""
    kind: str
    """``"module"``, ``"cell"`` or ``"custom"``: a label for messages (never branch on it)."""
    input_size: int
    hidden_size: int
    proj_size: int = 0
    batch_first: bool = True
    num_layers: int = 1
    supports_h_state: bool = True
    """Whether ``state="h"`` means something other than the full state (a custom state is one flat h)."""
    convertible: bool = True
    """Whether :meth:`to` converts the model (a custom step's closure is opaque: it is never converted)."""
    _weights_are = "the model's weights are"
    _dtype_fix = " (model.to(dtype) or inputs.to(dtype); the functions that take dtype= convert both)"

    # ------------------------------------------------------------------------------------ layout
    @property
    def parts(self) -> list[list[tuple[str, int]]]:
        return self.layout.parts

    @property
    def state_size(self) -> int:
        return self.layout.state_size

    @property
    def h_size(self) -> int:
        return self.layout.h_size

    def size(self, state: str) -> int:
        return self.layout.size(state)

    def unit_coords(self, state: str = "full") -> dict[str, list]:
        """``layer``, ``part``, ``neuron`` labels of the state coordinates."""
        return self.layout.unit_coords(state)

    def h_index(self, device=None) -> Tensor:
        """Positions of the h coordinates inside the full state."""
        return self.layout.h_index(device)

    def split(self, s: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """Full state ``(..., D)`` -> per layer ``(h, c)`` (``c`` is None without a cell state)."""
        return self.layout.split(s)

    def join(self, layers: list[tuple[Tensor, Tensor | None]]) -> Tensor:
        return self.layout.join(layers)

    def with_h(self, h: Tensor, s: Tensor) -> Tensor:
        """Full state ``s`` with its h parts replaced by ``h`` (``(..., h_size)``)."""
        return self.layout.with_h(h, s)

    def state_note(self, state: str) -> str | None:
        """A sentence for the outputs' attrs when ``state`` needs explaining, else None."""
        return None

    # ------------------------------------------------------------------------------------ initial state
    def initial_state(self, h0, xs: Tensor, unbatched: bool) -> Tensor:
        """The caller's ``h0`` (None, a flat state, or the model's own format) as the flat ``(B, D)`` state in
        the dtype/device of the batch-first inputs ``xs (B, T, I)``; ``ValueError``/``TypeError`` else."""
        batch = xs.shape[0]
        if h0 is None:
            s0 = self._default_state(batch, xs)
        elif isinstance(h0, (tuple, list)):
            s0 = self._state_from_tuple(h0, batch, unbatched)
        else:
            h0 = as_tensor("h0", h0)
            flat = (self.state_size,) if unbatched else (batch, self.state_size)
            if tuple(h0.shape) == flat:
                s0 = h0 if not unbatched else h0.unsqueeze(0)
            else:
                s0 = self._state_from_tensor(h0, batch, unbatched, flat)
        return self._state_like(s0, xs)

    @abstractmethod
    def _default_state(self, batch: int, like: Tensor) -> Tensor:
        """The state when ``h0=None``."""

    def _state_from_tuple(self, h0, batch: int, unbatched: bool) -> Tensor:
        raise ValueError(f"h0 as a tuple is the LSTM's (h0, c0) format; got a tuple of {len(h0)} for {self.arch}")

    def _state_from_tensor(self, h0: Tensor, batch: int, unbatched: bool, flat: tuple) -> Tensor:
        raise ValueError(f"h0 must have shape {flat} (flat state, D={self.state_size}); got {tuple(h0.shape)}")

    @abstractmethod
    def _state_like(self, s0: Tensor, xs: Tensor) -> Tensor:
        """``s0`` in the inputs' dtype/device (or an error where it cannot be converted)."""

    # ------------------------------------------------------------------------------------ parameters
    @abstractmethod
    def named_tensors(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` for every weight the step depends on."""

    def tensors(self) -> list[Tensor]:
        return [t for _, t in self.named_tensors()]

    @property
    def dtype(self) -> torch.dtype | None:
        ts = self.tensors()
        return ts[0].dtype if ts else None

    @property
    def device(self) -> torch.device | None:
        ts = self.tensors()
        return ts[0].device if ts else None

    @abstractmethod
    def to(self, dtype=None, device=None) -> System:
        """A copy on another dtype/device (the model itself is untouched)."""

    @abstractmethod
    def detached(self) -> System:
        """A copy whose weights are detached from the autograd graph."""

    @abstractmethod
    def for_autograd(self) -> System:
        """``self``, or a copy whose inference-mode weights are cloned into normal tensors (call it inside
        :func:`grad_region`)."""

    @abstractmethod
    def describe(self) -> dict:
        """``architecture``, ``num_layers``, ``hidden_size``, ``input_size``, ``proj_size`` for output attrs."""

    # ------------------------------------------------------------------------------------ checks (prepare)
    def check_input_size(self, xs: Tensor, shown: tuple) -> None:
        """Raise unless the batch-first inputs ``xs`` have the model's feature size (``shown``: as passed)."""
        return None  # the input size of a custom step is unknown

    @abstractmethod
    def converted(self, xs: Tensor, h0, dtype, device) -> tuple[System, Tensor]:
        """``(system, xs)`` converted for the caller's ``dtype=``/``device=`` (or an error before any work)."""

    def check_matches(self, xs: Tensor) -> None:
        """Raise unless the weights have the dtype and device of the inputs ``xs``."""
        if self.dtype is None:
            return
        if xs.dtype != self.dtype:
            whose, fix = self._weights_are, self._dtype_fix
            raise TypeError(f"inputs have dtype {xs.dtype} but {whose} {self.dtype}; convert one of them{fix}")
        if xs.device != self.device:
            raise ValueError(f"inputs are on {xs.device} but {self._weights_are} on {self.device}")

    def validate(self, s0: Tensor, x0: Tensor) -> None:
        """Last check before any work, at the first state ``s0 (B, D)`` and input ``x0 (B, I)``."""
        return None

    # ------------------------------------------------------------------------------------ stepping
    @property
    @abstractmethod
    def has_closed_form(self) -> bool:
        """Whether ``linearize(..., method="analytic")`` is available."""

    @abstractmethod
    def step(self, s: Tensor, x: Tensor) -> Tensor:
        """One step of the full state: ``(N, D), (N, I) -> (N, D)``."""

    def run(self, s0: Tensor, xs: Tensor) -> Tensor:
        """States ``s_0..s_T`` as ``(B, T+1, D)`` from ``s0 (B, D)`` and inputs ``xs (B, T, I)``."""
        states = [s0]
        s = s0
        for t in range(xs.shape[1]):
            s = self.step(s, xs[:, t])
            states.append(s)
        return torch.stack(states, 1)

    def sequence_states(self, s0: Tensor, xs: Tensor, outputs: Tensor | None = None, *, unbatched=False) -> Tensor:
        """Differentiable states ``(B, T+1, D)`` for the penalties.

        ``outputs`` is the output sequence of the caller's own forward, in the model's format (unbatched
        when the inputs were): only a single-layer module can reuse it (:class:`BuiltinSystem`).
        """
        if outputs is not None:
            raise ValueError(self._outputs_refused())
        return self.run(s0, xs)

    def _outputs_refused(self) -> str:
        return (
            "outputs= can be reused only for a single-layer nn.RNN/GRU/LSTM (the output sequence holds the "
            f"top layer alone); this model is a {self.kind} with {self.num_layers} layer(s): leave outputs=None"
        )

    def restricted_step(self, state: str, s: Tensor):
        """``(base, step)``: the coordinates of ``s (N, D)`` that ``state`` perturbs, and the map
        ``step(z, x, s_ref)`` from them to the same coordinates of the next state (``"h"``: c held at its
        recorded value ``s_ref``; ``s_ref`` is ignored for the full state, and ``base is s`` then)."""
        if state == "full":
            return s, lambda z, x, s_ref=None: self.step(z, x)
        idx = self.h_index(s.device)

        def step(z, x, s_ref):
            return self.step(self.with_h(z, s_ref), x).index_select(-1, idx)

        return s.index_select(-1, idx), step

    def linearize(self, s: Tensor, x: Tensor, method: str = "analytic", chunk_size=None) -> Linearization:
        """The step Jacobians at a batch of (state, input) pairs ``(N, D), (N, I)``."""
        if method == "autograd":
            return DenseLinearization(self.layout, s, x, autograd_jacobian(self, s, x, chunk_size))
        return self._closed_form(s, x)

    @abstractmethod
    def _closed_form(self, s: Tensor, x: Tensor) -> Linearization: ...

    def factored(self, method: str) -> bool:
        """Whether ``linearize(..., method)`` returns a :class:`FactoredLinearization`."""
        return False

    def factored_apply_cheap(self, method: str) -> bool:
        """Whether the factored ``J Q`` costs no more GEMM work than ``J_t @ Q`` with ``J_t`` formed, for any
        width of ``Q`` (one weight matrix per layer, as in an Elman RNN; a stack's zero upper blocks are skipped)."""
        return False

    def frobenius_closed_form(self, state: str, *, stacked: bool = False) -> bool:
        """Whether ``||J||_F^2`` has the row-local (Gram) form: one layer, no projection, full state
        (``stacked=True``: every layer of a stack has it, and ``frobenius_sq`` needs no full ``J``)."""
        return False


def autograd_jacobian(dyn: System, s: Tensor, x: Tensor, chunk_size=None, *, wrt: str = "state") -> Tensor:
    """``vmap(jacrev(step))`` over the leading dim of ``s (N, D)`` and ``x (N, I)``: ``ds'/ds`` ``(N, D, D)``, or
    with ``wrt="inputs"`` ``ds'/dx`` ``(N, D, I)``; works under the caller's ``no_grad``/``inference_mode`` (then
    the result carries no graph)."""
    from torch.func import jacrev, vmap

    keep_graph = torch.is_grad_enabled()
    with grad_region():
        step = dyn.for_autograd().step

        def single(si, xi):
            return step(si.unsqueeze(0), xi.unsqueeze(0)).squeeze(0)

        argnums = 1 if wrt == "inputs" else 0
        jac = vmap(jacrev(single, argnums=argnums, chunk_size=chunk_size))(normal(s), normal(x))
    return jac if keep_graph else jac.detach()
