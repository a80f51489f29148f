"""The recurrent core of a larger model, fed exactly what the model feeds it.

Most trained RNNs live inside a bigger module (an input encoder, the recurrent core, a readout). Analysing
the core on the model's raw inputs is wrong as soon as anything sits in front of it, so :func:`capture`
runs the *whole* model once on the caller's inputs and records, with a forward pre-hook, what the
recurrent submodule actually receives: its input sequence and initial state, in the submodule's own
layout. The public functions then analyse the submodule on exactly that (:func:`resolve`).

Decisions:

- The whole forward runs (in ``eval()`` mode, under ``torch.no_grad()``; every submodule's own mode is
  restored afterwards). It is not stopped once the submodule has been reached: a submodule called several
  times (a cell inside a Python loop, a module run over chunks of a long sequence) is only recognised by
  seeing every call, and stopping early would make a partial capture look complete. The readout's cost is
  one forward pass without gradients.
- Several calls are joined into one sequence only when they form one recurrence: each call's initial state
  equals (exactly) the state the previous call returned. A cell called once per step then becomes the
  sequence ``(B, T, I)`` (batch-first) with the first call's state as ``h0``; a module run over chunks becomes
  the concatenation of the chunks in its own layout. Any other pattern (the model edits the state between
  calls, restarts it, or runs the core over unrelated sequences) is refused with an error that says so.
- The captured tensors are detached copies: they do not carry gradients back to the layers in front.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

__all__ = ["Captured", "capture", "resolve", "recurrent_submodules", "ignored_weights", "describe_ignored"]

log = logging.getLogger("rnnjac")

RECURRENT = (nn.RNNBase, nn.RNNCellBase)
# parameter names of nn.RNN/GRU/LSTM and their cells (weight_hr: LSTM projections)
_RECURRENT_KEY = re.compile(r"(weight_ih|weight_hh|bias_ih|bias_hh|weight_hr)(_l\d+)?(_reverse)?")


class Captured(NamedTuple):
    """What the recurrent submodule received during ``model(inputs)``.

    ``inputs`` is in the submodule's own layout (``(T, B, I)`` for a module with ``batch_first=False``);
    :attr:`inputs_batch_first` is the ``(B, T, I)`` view that rnnjac's functions take with ``batch_first=True``.
    ``h0`` is the initial state in the submodule's own format (``(L, B, H)``, ``(h0, c0)``, a cell's ``(B, H)``),
    or None when the model passed none (zeros). ``calls`` is the number of calls joined into the sequence.
    """

    module: nn.Module
    name: str
    inputs: Tensor
    h0: Any
    batch_first: bool
    calls: int = 1

    @property
    def inputs_batch_first(self) -> Tensor:
        """``inputs`` as ``(B, T, I)`` (unbatched ``(T, I)`` unchanged)."""
        if self.inputs.dim() == 3 and not self.batch_first:
            return self.inputs.transpose(0, 1)
        return self.inputs


def recurrent_submodules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(dotted name, module)`` of every ``nn.RNN``/``GRU``/``LSTM`` and cell in ``model`` (itself: name ``""``)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, RECURRENT)]


def _label(name: str) -> str:
    return repr(name) if name else "<the model itself>"


def _find(model: nn.Module, submodule) -> tuple[str, nn.Module]:
    """The recurrent submodule named (or given) by ``submodule``, or the only one when it is None."""
    found = recurrent_submodules(model)
    listing = ", ".join(f"{_label(n)} ({type(m).__name__})" for n, m in found) or "none"
    if submodule is None:
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError(
                f"{type(model).__name__} holds no nn.RNN, nn.GRU, nn.LSTM or cell to analyse; pass the recurrent "
                "module itself (or a CustomCell)"
            )
        raise ValueError(
            f"{type(model).__name__} holds {len(found)} recurrent submodules: {listing}; pass submodule= one of "
            "these names (e.g. submodule=" + repr(found[0][0]) + ")"
        )
    if isinstance(submodule, nn.Module):
        for name, m in model.named_modules():
            if m is submodule:
                return _checked(name, m, listing)
        raise ValueError(
            f"submodule={type(submodule).__name__}(...) is not a submodule of {type(model).__name__}; "
            f"its recurrent submodules: {listing}"
        )
    if not isinstance(submodule, str):
        raise TypeError(f"submodule must be a dotted name (str) or an nn.Module; got {type(submodule).__name__}")
    try:
        m = model.get_submodule(submodule)
    except AttributeError:
        raise ValueError(
            f"submodule={submodule!r} is not in {type(model).__name__}; its recurrent submodules: {listing}"
        ) from None
    return _checked(submodule, m, listing)


def _checked(name: str, m: nn.Module, listing: str) -> tuple[str, nn.Module]:
    if not isinstance(m, RECURRENT):
        raise ValueError(
            f"submodule={name!r} is a {type(m).__name__}, not an nn.RNN, nn.GRU, nn.LSTM or cell; "
            f"the model's recurrent submodules: {listing}"
        )
    return name, m


def _clone(v):
    if isinstance(v, Tensor):
        return v.detach().clone()
    if isinstance(v, (tuple, list)) and not isinstance(v, PackedSequence):
        return tuple(_clone(u) for u in v)
    return v


def _same(a, b) -> bool:
    """Whether two states (tensors or ``(h, c)`` tuples) are exactly equal."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)) and len(a) == len(b):
        return all(_same(u, v) for u, v in zip(a, b, strict=True))
    return False


def _record(module: nn.Module):
    """Hooks that append ``[input, hx, returned_state]`` per call; returns ``(calls, handles)``."""
    calls: list[list] = []

    def pre(mod, args, kwargs):
        x = args[0] if args else kwargs.get("input")
        hx = args[1] if len(args) > 1 else kwargs.get("hx")
        calls.append([_clone(x), _clone(hx), None])

    def post(mod, args, output):
        # modules return (output, h_n); cells return h (or (h, c) for an LSTMCell)
        state = output[1] if isinstance(mod, nn.RNNBase) else output
        calls[-1][2] = _clone(state)

    handles = [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
    return calls, handles


def _join(name: str, module: nn.Module, calls: list[list]) -> tuple[Tensor, Any, bool]:
    """One sequence ``(inputs, h0, batch_first)`` from the recorded calls (see the module docstring)."""
    what = f"{type(module).__name__} {_label(name)}"
    if not calls:
        raise ValueError(f"the {what} was never called during model(inputs): nothing reaches it from these inputs")
    xs = [c[0] for c in calls]
    if isinstance(xs[0], PackedSequence):
        raise ValueError(
            f"the {what} received a PackedSequence; rnnjac analyses padded sequences of equal length: call "
            "rnnjac on the submodule with a padded (B, T, I) tensor of one length"
        )
    if not isinstance(xs[0], Tensor):
        raise TypeError(f"the {what} received {type(xs[0]).__name__} as input; expected a tensor")
    for i in range(1, len(calls)):
        if calls[i][1] is None or not _same(calls[i][1], calls[i - 1][2]):
            raise ValueError(
                f"the {what} was called {len(calls)} times during model(inputs), and call {i + 1} did not start "
                f"from the state call {i} returned (the model restarts or edits the state between calls, or runs "
                "it over separate sequences): these calls are not one recurrence of the module. Analyse the "
                "module directly on inputs you build yourself"
            )
    if isinstance(module, nn.RNNCellBase):
        # one call per step: stack along a new time axis, batch-first (unbatched: (T, I))
        return torch.stack(xs, dim=1 if xs[0].dim() == 2 else 0), calls[0][1], True
    batch_first = bool(module.batch_first)
    time_dim = 1 if (xs[0].dim() == 3 and batch_first) else 0
    return (xs[0] if len(xs) == 1 else torch.cat(xs, dim=time_dim)), calls[0][1], batch_first


def capture(model: nn.Module, inputs, submodule=None, *, h0=None) -> Captured:
    """Run ``model(inputs)`` once and capture what its recurrent submodule receives.

    Parameters
    ----------
    model : nn.Module
        The whole model, called as ``model(inputs)`` (in ``eval()`` mode, under ``torch.no_grad()``; each
        submodule's train/eval mode is restored afterwards).
    inputs : Tensor or array
        The model's own inputs, in whatever layout the model takes.
    submodule : str or nn.Module, optional
        The recurrent submodule, by dotted name (``"core.rnn"``) or as the module object. Default: the only
        ``nn.RNN``/``GRU``/``LSTM`` or cell in ``model`` (an error lists them when there are several).
    h0 : optional
        An initial state for the submodule, in its own format; replaces the one the model passed.

    Returns
    -------
    Captured
        ``module``, ``name``, ``inputs`` (its own layout), ``h0``, ``batch_first``, ``calls``.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> class Net(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.encoder, self.gru, self.readout = nn.Linear(5, 3), nn.GRU(3, 8), nn.Linear(8, 2)
    ...     def forward(self, x):
    ...         return self.readout(self.gru(self.encoder(x))[0])
    >>> net = Net()
    >>> c = capture(net, torch.randn(40, 4, 5))  # (T, B, I): this GRU is sequence-first
    >>> c.name, tuple(c.inputs.shape), tuple(c.inputs_batch_first.shape)
    ('gru', (40, 4, 3), (4, 40, 3))
    >>> c.calls, c.h0 is None
    (1, True)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"submodule= needs the model as an nn.Module; got {type(model).__name__}")
    name, module = _find(model, submodule)
    log.info("analysing submodule %s (%r)", _label(name), module)
    x = inputs if isinstance(inputs, (Tensor, PackedSequence)) else torch.as_tensor(inputs)
    modes = {m: m.training for m in model.modules()}
    calls, handles = _record(module)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    seq, hx, batch_first = _join(name, module, calls)
    return Captured(module, name, seq, hx if h0 is None else h0, batch_first, len(calls))


def resolve(model, inputs, h0=None, *, submodule=None, batch_first=None):
    """What a public function analyses: ``(model, inputs, h0, batch_first, attrs)``.

    A recurrent module, cell, :class:`~rnnjac.CustomCell` or step function with ``submodule=None`` comes
    back unchanged (``attrs`` empty). Any other ``nn.Module``, or any model with ``submodule=``, is run whole
    by :func:`capture`: the result is the submodule, its captured inputs batch-first, its initial state
    (``h0`` when given, else the model's), ``batch_first=True`` and ``attrs={"submodule": name}``.

    Examples
    --------
    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.RNN(3, 6, batch_first=True))
    >>> module, x, h0, bf, attrs = resolve(net, torch.randn(2, 10, 4))
    >>> type(module).__name__, tuple(x.shape), h0, bf, attrs
    ('RNN', (2, 10, 3), None, True, {'submodule': '1'})
    """
    if submodule is None and (not isinstance(model, nn.Module) or isinstance(model, RECURRENT)):
        return model, inputs, h0, batch_first, {}
    if batch_first is not None:
        raise ValueError(
            "batch_first= describes inputs fed to a recurrent module directly; with a whole model (or "
            "submodule=) the inputs go through the model, and the layout of what reaches the recurrent "
            f"submodule is its own: leave batch_first=None (got batch_first={batch_first!r})"
        )
    c = capture(model, inputs, submodule, h0=h0)
    return c.module, c.inputs_batch_first, c.h0, True, {"submodule": c.name}


def ignored_weights(keys: Iterable[str], prefix: str) -> list[str]:
    """The keys of a state dict that are not the recurrent module's at ``prefix`` (e.g. ``"rnn."`` or ``""``).

    Examples
    --------
    >>> ignored_weights(["encoder.weight", "gru.weight_ih_l0", "gru.weight_hh_l0", "readout.bias"], "gru.")
    ['encoder.weight', 'readout.bias']
    """
    return [k for k in keys if not (k.startswith(prefix) and _RECURRENT_KEY.fullmatch(k[len(prefix) :]))]


def describe_ignored(
    keys: Iterable[str], prefix: str, *, limit: int = 6, inputs_flag: str = "--inputs", model_flag: str = "--model"
) -> str | None:
    """The warning for a checkpoint analysed without its model, or None when it holds only recurrent weights.

    Examples
    --------
    >>> print(describe_ignored(["encoder.weight", "encoder.bias", "gru.weight_hh_l0", "readout.bias"], "gru."))
    the checkpoint holds weights besides the recurrent module's (encoder.weight, encoder.bias, readout.bias): the \
recurrent module is being fed --inputs directly; pass --model to run the whole model
    """
    extra = ignored_weights(keys, prefix)
    if not extra:
        return None
    shown = ", ".join(extra[:limit]) + (f", ... ({len(extra) - limit} more)" if len(extra) > limit else "")
    return (
        f"the checkpoint holds weights besides the recurrent module's ({shown}): the recurrent module is being "
        f"fed {inputs_flag} directly; pass {model_flag} to run the whole model"
    )
