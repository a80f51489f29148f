"""Every supported model as one discrete-time system ``s_t = F(s_{t-1}, x_t)``: :func:`as_dynamics`.

:class:`~rnnjac._system.System` is the single interface the rest of the package talks to (its module docstring
lists the protocol). It knows the layout of the flat state vector (layer-major, ``[h; c]`` inside an LSTM
layer, ``[h]`` otherwise; README, "Conventions": "State vector"), turns the caller's ``h0`` into that state,
holds references to the model's own weight tensors (so gradients flow to them), steps, runs and linearises the
model (:mod:`rnnjac._linearization`). Two implementations own everything that differs between model kinds:

- :class:`~rnnjac._builtin_system.BuiltinSystem`: ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (any ``num_layers``,
  ``bias``, ``batch_first``, ``proj_size``) and ``nn.RNNCell``/``GRUCell``/``LSTMCell``, built from a
  :class:`~rnnjac._cells.CellArch` and the layers' weights; factored closed-form linearisation. Dropout
  between layers is ignored (eval semantics); bidirectional modules are refused.
- :class:`~rnnjac._custom_system.CustomSystem`: a :class:`CustomCell` or a bare callable ``step(s, x)``; dense
  linearisation from ``torch.func`` or the user's closed form, no h/c structure, never converted to another
  dtype/device.

``Dynamics`` is kept as an alias of :class:`~rnnjac._system.System`.
"""

from __future__ import annotations

from torch import nn

from ._builtin_system import BuiltinSystem, builtin_system
from ._custom_system import CustomCell, CustomSystem
from ._linearization import Linearization, grad_region, normal
from ._system import System, as_tensor

__all__ = [
    "BuiltinSystem",
    "CustomCell",
    "CustomSystem",
    "Dynamics",
    "Linearization",
    "System",
    "as_dynamics",
    "as_tensor",
    "grad_region",
    "normal",
]

Dynamics = System
"""The former name of :class:`~rnnjac._system.System`."""


def as_dynamics(model, *, state_size: int | None = None) -> System:
    """Adapt a module, cell, :class:`CustomCell` or bare callable to a :class:`~rnnjac._system.System`.

    ``state_size`` fixes ``D`` for a custom step. Raises ``ValueError`` for bidirectional modules and
    ``TypeError`` for anything unsupported.

    Examples
    --------
    >>> import torch
    >>> type(as_dynamics(torch.nn.GRUCell(2, 3))).__name__, type(as_dynamics(lambda s, x: s, state_size=2)).__name__
    ('BuiltinSystem', 'CustomSystem')
    """
    if isinstance(model, System):
        return model
    if isinstance(model, CustomCell) or (callable(model) and not isinstance(model, nn.Module)):
        return CustomSystem(model if isinstance(model, CustomCell) else CustomCell(model), state_size)
    system = builtin_system(model)
    if system is not None:
        return system
    if isinstance(model, nn.Module):
        raise TypeError(
            f"expected nn.RNN, nn.GRU, nn.LSTM, one of their cells, a CustomCell or a callable step(s, x), "
            f"got {type(model).__name__}; for a larger model pass its recurrent submodule, or wrap your "
            "step in rnnjac.CustomCell"
        )
    raise TypeError(f"expected a recurrent module or a callable step(s, x), got {type(model).__name__}")
