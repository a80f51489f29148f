"""torch's recurrent modules and cells as a :class:`~rnnjac._system.System`: a stack of built-in layers."""

from __future__ import annotations

import contextlib
import re
import warnings

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ._cells import ARCHITECTURES, LayerParams
from ._linearization import FactoredLinearization, Linearization, StateLayout, frobenius_row_local, normal
from ._recurrence import LayerRecord, gru_layer, lstm_layer
from ._system import System, as_tensor

_COMPACTION = "RNN module weights are not part of single contiguous"


def _silence_compaction_warning() -> None:
    """One layer of a stack is never its module's whole flat weight buffer, so cuDNN copies the layer's weights into
    one per call (one layer's weights) and warns with advice (``flatten_parameters``) that cannot apply: ignore that
    warning where this module calls the op (torch attributes it to the calling Python line, in ``_fused_layer``).
    Added when missing rather than once at import, since leaving a ``warnings.catch_warnings()`` block drops filters
    added inside it (rnnjac's modules are imported on first use)."""
    module = re.escape(__name__)
    for action, message, _, mod, _ in warnings.filters:
        if action == "ignore" and message and mod and (message.pattern, mod.pattern) == (_COMPACTION, module):
            return
    warnings.filterwarnings("ignore", message=_COMPACTION, module=module)


__all__ = ["BuiltinSystem", "builtin_system"]

_GATES = WeakIdKeyDictionary()
"""``states -> (version, per-layer gates)`` for the states tensors of ``forward_with_states``: what the forward
computed that the linearisation needs again (the LSTM gates), kept as long as that tensor lives."""

_PARAM_NAMES = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh", "w_hr": "weight_hr"}
_MODULE_ARCH: dict[type[nn.RNNBase], str] = {nn.RNN: "rnn", nn.GRU: "gru", nn.LSTM: "lstm"}
_CELL_ARCH: dict[type[nn.RNNCellBase], str] = {nn.RNNCell: "rnn", nn.GRUCell: "gru", nn.LSTMCell: "lstm"}


def _steps(t: Tensor, steps: slice) -> Tensor:
    """``t[:, steps]`` of a batch-first ``(B, T, ...)`` tensor, or ``t`` itself when ``steps`` covers every step (no
    slice node: its backward would zero-fill a full-size gradient)."""
    return t if steps.indices(t.shape[1]) == (0, t.shape[1], 1) else t[:, steps]


class BuiltinSystem(System):
    """``nn.RNN``/``GRU``/``LSTM`` or one of their cells: a stack of :class:`~rnnjac._cells.CellArch` layers.

    Parameters
    ----------
    arch : str
        A key of :data:`rnnjac._cells.ARCHITECTURES`.
    layers : list of LayerParams
        References to the model's weights, bottom layer first.
    input_size, hidden_size, proj_size, batch_first
        As the module's.
    layered : bool
        True for modules (weights named ``weight_hh_l0``, ``h0`` with a leading layer dimension), False for
        cells (``weight_hh``, ``h0`` without one).
    module : nn.Module, optional
        The module itself (for reference; :meth:`fused_states` calls torch's fused op with the layers' weights).

    Examples
    --------
    >>> lstm = torch.nn.LSTM(2, 3, batch_first=True)
    >>> system = builtin_system(lstm)
    >>> h0, c0 = torch.zeros(1, 4, 3), torch.ones(1, 4, 3)
    >>> s0 = system.initial_state((h0, c0), torch.zeros(4, 5, 2), unbatched=False)
    >>> s0.shape, s0[0].tolist(), [name for name, _ in system.named_tensors()][:2]
    (torch.Size([4, 6]), [0.0, 0.0, 0.0, 1.0, 1.0, 1.0], ['weight_ih_l0', 'weight_hh_l0'])
    """

    def __init__(
        self,
        arch: str,
        layers: list[LayerParams],
        *,
        input_size: int,
        hidden_size: int,
        proj_size: int = 0,
        batch_first: bool = True,
        layered: bool = True,
        module: nn.Module | None = None,
    ):
        self.arch, self.cell = arch, ARCHITECTURES[arch]
        self.layers, self.layered, self.module = layers, layered, module
        self.input_size, self.hidden_size, self.proj_size = input_size, hidden_size, proj_size
        self.batch_first = batch_first
        self.num_layers = len(layers)
        per = [("h", proj_size or hidden_size)] + ([("c", hidden_size)] if self.cell.has_c else [])
        self.layout = StateLayout([list(per) for _ in layers])

    @property
    def kind(self) -> str:
        return "module" if self.layered else "cell"

    def state_note(self, state: str) -> str | None:
        if state == "h" and self.cell.has_c:
            return "h parts only: c is held fixed at its recorded value (partial derivative)"
        return None

    # ------------------------------------------------------------------------------------ initial state
    def _default_state(self, batch: int, like: Tensor) -> Tensor:
        return like.new_zeros(batch, self.state_size)

    def _state_from_tuple(self, h0, batch: int, unbatched: bool) -> Tensor:
        if not self.cell.has_c or len(h0) != 2:
            return super()._state_from_tuple(h0, batch, unbatched)
        h, c = (as_tensor("h0", t) for t in h0)
        lead = (self.num_layers,) if self.layered else ()
        want_h, want_c = lead + (self.proj_size or self.hidden_size,), lead + (self.hidden_size,)
        if not unbatched:
            ins = len(lead)
            want_h = want_h[:ins] + (batch,) + want_h[ins:]
            want_c = want_c[:ins] + (batch,) + want_c[ins:]
        if tuple(h.shape) != want_h or tuple(c.shape) != want_c:
            raise ValueError(
                f"h0 = (h0, c0) must have shapes {want_h} and {want_c}; got {tuple(h.shape)} and {tuple(c.shape)}"
            )
        if not self.layered:
            h, c = h.unsqueeze(0), c.unsqueeze(0)
        if unbatched:
            h, c = h.unsqueeze(1), c.unsqueeze(1)
        return self.join([(h[li], c[li]) for li in range(self.num_layers)])

    def _state_from_tensor(self, h0: Tensor, batch: int, unbatched: bool, flat: tuple) -> Tensor:
        if self.cell.has_c:
            raise ValueError(
                f"h0 for an LSTM must be the (h0, c0) tuple or a flat state of shape {flat}; got {tuple(h0.shape)}"
            )
        if not self.layered:
            return super()._state_from_tensor(h0, batch, unbatched, flat)
        L, H = self.num_layers, self.hidden_size  # noqa: N806
        mod = (L, H) if unbatched else (L, batch, H)
        if tuple(h0.shape) != mod:
            raise ValueError(
                f"h0 must have shape {mod} (the module's format) or {flat} (flat state); got {tuple(h0.shape)}"
            )
        h0 = h0.unsqueeze(1) if unbatched else h0
        return self.join([(h0[li], None) for li in range(L)])

    def _state_like(self, s0: Tensor, xs: Tensor) -> Tensor:
        return s0.to(dtype=xs.dtype, device=xs.device)

    # ------------------------------------------------------------------------------------ parameters
    def named_tensors(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` for every weight, named as in the module's ``state_dict`` (``weight_hh_l0``,
        ``bias_ih``, ...)."""
        out = []
        for li, p in enumerate(self.layers):
            suffix = f"_l{li}" if self.layered else ""
            for field, base in _PARAM_NAMES.items():
                t = getattr(p, field)
                if t is not None:
                    out.append((base + suffix, t))
        return out

    def _with_layers(self, layers: list[LayerParams]) -> BuiltinSystem:
        return BuiltinSystem(
            self.arch,
            layers,
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            proj_size=self.proj_size,
            batch_first=self.batch_first,
            layered=self.layered,
        )

    def to(self, dtype=None, device=None) -> BuiltinSystem:
        kw = {k: v for k, v in (("dtype", dtype), ("device", device)) if v is not None}
        return self._with_layers([p.to(**kw) for p in self.layers])

    def detached(self) -> BuiltinSystem:
        return self._with_layers([p.map(Tensor.detach) for p in self.layers])

    def for_autograd(self) -> BuiltinSystem:
        if not any(t.is_inference() for t in self.tensors()):
            return self
        return self._with_layers([p.map(normal) for p in self.layers])

    def describe(self) -> dict:
        return {
            "architecture": self.arch,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "input_size": self.input_size,
            "proj_size": self.proj_size,
        }

    # ------------------------------------------------------------------------------------ checks
    def check_input_size(self, xs: Tensor, shown: tuple) -> None:
        if xs.shape[-1] != self.input_size:
            raise ValueError(
                f"inputs have {xs.shape[-1]} features but the model expects input_size={self.input_size} "
                f"(inputs shape {shown})"
            )

    def converted(self, xs: Tensor, h0, dtype, device) -> tuple[System, Tensor]:
        if dtype is None and device is None:
            return self, xs
        return self.to(dtype=dtype, device=device), xs.to(dtype=dtype or xs.dtype, device=device or xs.device)

    # ------------------------------------------------------------------------------------ stepping
    @property
    def has_closed_form(self) -> bool:
        return True

    def step(self, s: Tensor, x: Tensor) -> Tensor:
        out, inp = [], x
        for p, (h, c) in zip(self.layers, self.split(s), strict=False):
            h, c = self.cell.step(p, inp, h, c)
            out.append((h, c))
            inp = h
        return self.join(out)

    def _closed_form(self, s: Tensor, x: Tensor) -> Linearization:
        coefs, inp = [], x
        for p, (h, c) in zip(self.layers, self.split(s), strict=False):
            h, c, coef = self.cell.linearize(p, inp, h, c)
            coefs.append(coef)
            inp = h
        return FactoredLinearization(self.cell, self.layers, self.layout, s, x, coefs)

    def factored(self, method: str) -> bool:
        return method == "analytic"

    def factored_apply_cheap(self, method: str) -> bool:
        return self.factored(method) and self.cell.n_gates == 1

    def frobenius_closed_form(self, state: str, *, stacked: bool = False) -> bool:
        if stacked:  # every layer's own block in row form, the cross-layer blocks as (H, H) products
            return state == "full" and all(frobenius_row_local(self.cell, [p], state) for p in self.layers)
        return frobenius_row_local(self.cell, self.layers, state)

    def sequence_states(self, s0: Tensor, xs: Tensor, outputs: Tensor | None = None, *, unbatched=False) -> Tensor:
        """Differentiable states ``(B, T+1, D)``: for one layer from the caller's ``outputs`` when given (the
        forward is shared with the task loss), else :meth:`fused_states` (any layer count, CPU or GPU)."""
        return self.sequence_states_and_gates(s0, xs, outputs, unbatched=unbatched)[0]

    def sequence_states_and_gates(self, s0: Tensor, xs: Tensor, outputs=None, *, unbatched=False):
        """:meth:`sequence_states` and, per layer, the activated gates the forward computed on the way (LSTM:
        ``(i, f, g, o)``, each ``(B, T, H)``; None for the other cells), for :meth:`linearize_states`."""
        if outputs is None:
            return self.fused_states_and_gates(s0, xs)
        out = self._outputs(outputs, xs, unbatched)  # checks first: one layer only
        ((h0, c0),) = self.split(s0)
        states, gates = self._layer_states(self.layers[0], xs, h0, c0, out)
        return states, [gates]

    def fused_states(self, s0: Tensor, xs: Tensor, *, cudnn: bool = False) -> Tensor:
        """States ``(B, T+1, D)`` of the whole stack, one layer at a time.

        On the CPU a GRU or LSTM layer without projection runs :mod:`rnnjac._recurrence` (states and gates from one
        autograd Function). Any other layer runs the op its module's forward uses (``torch._VF.gru``...) with that
        layer's own weights, no dropout and ``train=True`` (so its backward works in eval mode too); on CUDA on
        cuDNN with ``cudnn=True`` (fast, but its backward cannot be differentiated again), else on torch's own
        fused kernels (differentiable twice). Either way gradients reach the weights exactly as through the
        module's forward. The LSTM cell states, which the fused op does not return, are rebuilt by
        :meth:`LSTMArch.cell_sequence`.
        """
        return self.fused_states_and_gates(s0, xs, cudnn=cudnn)[0]

    def fused_states_and_gates(self, s0: Tensor, xs: Tensor, *, cudnn: bool = False) -> tuple[Tensor, list]:
        """:meth:`fused_states` and the per-layer gates of :meth:`sequence_states_and_gates`."""
        parts, all_gates, inp = [], [], xs
        for p, (h0, c0) in zip(self.layers, self.split(s0), strict=True):
            if self._gated_loop(p, inp):
                part, gates = self._gated_layer(p, inp, h0, c0)
            else:
                out = self._fused_layer(p, inp, h0, c0, cudnn=cudnn)
                states, gates = self._layer_states(p, inp, h0, c0, out)
                part = (states, None) if c0 is None else states.split([h0.shape[-1], c0.shape[-1]], -1)
            parts.append(part)
            all_gates.append(gates)
            inp = parts[-1][0][:, 1:]
        return self.join(parts), all_gates

    def _gated_loop(self, p: LayerParams, xs: Tensor) -> bool:
        """Whether a layer runs through :mod:`rnnjac._recurrence` (CPU GRU/LSTM without projection: the gates come
        with the states, so a penalty forms no gate GEMM of its own) rather than torch's fused op."""
        return xs.device.type == "cpu" and self.arch in ("gru", "lstm") and p.w_hr is None

    def _gated_layer(self, p: LayerParams, xs: Tensor, h0: Tensor, c0: Tensor | None):
        """One layer's ``(h, c)`` states ``(B, T+1, ·)`` (``c`` None for a GRU) and its gates."""
        if c0 is None:
            hs, gates = gru_layer(xs, h0, p)
            return (hs, None), gates
        hs, cs, gates = lstm_layer(xs, h0, c0, p)
        return (hs, cs), gates

    def _layer_states(self, p: LayerParams, xs: Tensor, h0: Tensor, c0: Tensor | None, out: Tensor):
        """One layer's ``[h; c]`` states ``(B, T+1, ·)`` from its outputs ``(B, T, H_out)``, and its gates."""
        hs = torch.cat([h0.unsqueeze(1), out], 1)
        if c0 is None:
            return hs, None
        pre, gates = self.cell.pre_and_gates(p, xs, hs[:, :-1])
        cs = self.cell.cell_sequence(p, xs, hs, c0, gates)
        states = torch.cat([hs, cs], -1)
        if p.w_hr is not None:
            return states, gates
        # as the gated layer's forward would have kept them (time-major views): the exact penalty reads the record
        act = torch.cat(gates, -1)
        return states, LayerRecord(*(t.transpose(0, 1) for t in (hs, cs, act, pre)), None)

    @staticmethod
    def remember_gates(states: Tensor, gates: list) -> None:
        """Keep ``gates`` (:meth:`fused_states_and_gates`) for :meth:`recall_gates` of this very ``states``. Not for
        an inference tensor (``torch.inference_mode``): it has no version counter to tell an in-place edit, so the
        penalty recomputes the gates instead."""
        if states.is_inference():
            return
        if any(g is not None for g in gates):
            _GATES[states] = (states._version, gates)

    @staticmethod
    def recall_gates(states: Tensor) -> list | None:
        """The gates remembered for ``states``, or None (none kept, or ``states`` changed in place since)."""
        kept = _GATES.get(states)
        return kept[1] if kept is not None and kept[0] == states._version else None

    def linearize_states(self, states: Tensor, xs: Tensor, steps: slice, gates=None, *, compile=False):
        """``J_t`` at the steps ``steps`` of a recorded trajectory ``states (B, T+1, D)``, ``xs (B, T, I)``, as a
        :class:`FactoredLinearization` over ``N = B * len(steps)`` points, equal to :meth:`linearize` at
        ``(s_{t-1}, x_t)`` but without recomputing what the trajectory holds: each layer's next state (the input
        of the layer above, and for tanh/relu/LSTM part of the coefficients) is read from ``s_t``, and an LSTM
        layer's gates come from ``gates`` (:meth:`fused_states_and_gates`) when given. ``compile=True`` runs the
        elementwise passes through ``torch.compile`` (:mod:`rnnjac._elementwise`)."""
        b = states.shape[0]
        start, stop, stride = steps.indices(states.shape[1] - 1)
        prev, nxt = states[:, start:stop:stride], states[:, start + 1 : stop + 1 : stride]  # one slice each
        n = b * prev.shape[1]
        s, x = prev.reshape(n, -1), _steps(xs, steps).reshape(n, -1)
        coefs, inp, last = [], x, self.num_layers - 1
        for li, (p, (h, c), (h1, c1)) in enumerate(zip(self.layers, self.split(s), self.split(nxt), strict=True)):
            g = (
                None
                if gates is None or gates[li] is None
                else tuple(_steps(t, steps).reshape(n, -1) for t in gates[li])
            )
            h1 = h1.reshape(n, -1) if li < last or self.cell.n_gates == 1 else None  # read only where needed
            c1 = None if c1 is None else c1.reshape(n, -1)
            coefs.append(self.cell.linearize_known(p, inp, h, c, h1, c1, g, compile))
            inp = h1
        return FactoredLinearization(self.cell, self.layers, self.layout, s, x, coefs, compile=compile)

    def frobenius_from_gates(self, states: Tensor, steps: slice, gates, state: str, compile=False):  # noqa: A002
        """``||J_t||_F^2`` ``(B, len(steps))`` at the steps ``steps`` of a recorded trajectory of a single CPU
        GRU/LSTM layer straight from what its forward kept (``gates[0]``, a :class:`rnnjac._recurrence.LayerRecord`:
        no coefficients, no copy of the gates; ``compile=True``: one compiled function, :mod:`rnnjac._elementwise`,
        else cache-sized eager blocks, :mod:`rnnjac._fused_rows`); None where that does not apply (other cells,
        stacks, projections, no record, CUDA), for the caller to linearise instead. The gradient reaches the
        weights through the record, that is through the layer's forward, not through ``states`` (the same
        values)."""
        record = None if gates is None else gates[0]
        usable = isinstance(record, LayerRecord) and states.device.type == "cpu"  # on a GPU: the linearisation
        if not usable or not frobenius_row_local(self.cell, self.layers, state):
            return None
        return self.cell.frobenius_from_record(self.layers[0], record, steps, compile).t()

    def _fused_layer(self, p: LayerParams, xs: Tensor, h0: Tensor, c0: Tensor | None, *, cudnn: bool) -> Tensor:
        """One layer's outputs ``(B, T, H_out)`` from torch's fused op (batch-first inputs ``(B, T, I)``); on CUDA
        cuDNN's kernel only with ``cudnn=True`` (and where torch's own flags allow it)."""
        bias = p.b_ih is not None
        weights = [p.w_ih, p.w_hh] + ([p.b_ih, p.b_hh] if bias else []) + ([p.w_hr] if p.w_hr is not None else [])
        op = getattr(torch._VF, self.arch)  # rnn_tanh, rnn_relu, gru, lstm: the names of the ops
        # slices of the flat state are strided views; cuDNN wants contiguous hx (the CPU kernel does not care)
        hx = (
            h0.unsqueeze(0).contiguous() if c0 is None else (h0.unsqueeze(0).contiguous(), c0.unsqueeze(0).contiguous())
        )
        # cuDNN's RNN backward is first-order only: unless asked for, use torch's own fused CUDA kernels
        # (differentiable twice) instead; no effect on the CPU
        if cudnn:
            _silence_compaction_warning()
        with contextlib.nullcontext() if cudnn else torch.backends.cudnn.flags(enabled=False):
            return op(xs.contiguous(), hx, weights, bias, 1, 0.0, True, False, True)[0]

    def _outputs(self, outputs, xs: Tensor, unbatched: bool) -> Tensor:
        """The caller's output sequence as ``(B, T, H_out)`` after checking it can stand for the states."""
        if not self.layered or self.num_layers != 1:
            raise ValueError(self._outputs_refused())
        if not isinstance(outputs, Tensor):
            raise TypeError(f"outputs must be the output tensor of model(inputs, h0); got {type(outputs).__name__}")
        out = outputs
        if unbatched:
            out = out.unsqueeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        want = (xs.shape[0], xs.shape[1], self.proj_size or self.hidden_size)
        if tuple(out.shape) != want:
            raise ValueError(
                f"outputs must be the model's output sequence, shape {want} (batch-first); got {tuple(outputs.shape)}"
            )
        return out


def _rnn_layers(module, num_layers: int, *, cell: bool = False) -> list[LayerParams]:
    out = []
    for li in range(num_layers):
        suffix = "" if cell else f"_l{li}"

        def get(base, suffix=suffix):
            return getattr(module, base + suffix, None)

        out.append(
            LayerParams(
                w_ih=get("weight_ih"),
                w_hh=get("weight_hh"),
                b_ih=get("bias_ih"),
                b_hh=get("bias_hh"),
                w_hr=get("weight_hr"),
            )
        )
    return out


def _arch_name(model, base: str) -> str:
    return f"rnn_{getattr(model, 'nonlinearity', 'tanh')}" if base == "rnn" else base


def builtin_system(model) -> BuiltinSystem | None:
    """The system of an ``nn.RNN``/``GRU``/``LSTM`` or one of their cells; None for anything else.

    Raises ``ValueError`` for a bidirectional module.

    Examples
    --------
    >>> builtin_system(torch.nn.LSTM(2, 3, num_layers=2)).parts
    [[('h', 3), ('c', 3)], [('h', 3), ('c', 3)]]
    """
    for cls, base in _MODULE_ARCH.items():
        if isinstance(model, cls):
            if model.bidirectional:
                raise ValueError(
                    f"{type(model).__name__}(bidirectional=True) is not one causal dynamical system: its "
                    "backward direction runs from t=T down to 1. Analyse each direction as its own model "
                    "(e.g. copy the *_reverse weights into a unidirectional module)."
                )
            return BuiltinSystem(
                _arch_name(model, base),
                _rnn_layers(model, model.num_layers),
                input_size=model.input_size,
                hidden_size=model.hidden_size,
                proj_size=getattr(model, "proj_size", 0),
                batch_first=model.batch_first,
                module=model,
            )
    for cell_cls, base in _CELL_ARCH.items():
        if isinstance(model, cell_cls):
            return BuiltinSystem(
                _arch_name(model, base),
                _rnn_layers(model, 1, cell=True),
                input_size=model.input_size,
                hidden_size=model.hidden_size,
                layered=False,
            )
    return None
