"""Adapters: every supported model as one discrete-time system ``s_t = F(s_{t-1}, x_t)``.

:class:`Dynamics` is the single interface the rest of the package talks to. It holds references to
the model's own weight tensors (so gradients flow to them) and knows the layout of the state vector:
layer-major, ``[h; c]`` inside an LSTM layer, ``[h]`` otherwise (README, "Conventions": "State vector").

Built from ``nn.RNN``/``nn.GRU``/``nn.LSTM`` (any ``num_layers``, ``bias``, ``batch_first``,
``proj_size``), from ``nn.RNNCell``/``GRUCell``/``LSTMCell``, or from a :class:`CustomCell`. Dropout
between layers is ignored (eval semantics); bidirectional modules are refused.

:class:`Linearization` is ``J_t`` for a batch of steps, kept in factored form for the built-in cells:
``apply`` computes ``J Q`` with shared GEMMs, ``materialize`` forms ``J``, ``frobenius_sq`` gives
``||J||_F^2``. For custom cells (or ``method="autograd"``) it holds the materialised Jacobian from
``torch.func.vmap(torch.func.jacrev(step))`` or the user's own closed form.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .cells import ARCHITECTURES, EYE, CellArch, LayerParams

__all__ = ["CustomCell", "Dynamics", "Linearization", "as_dynamics"]


@contextmanager
def grad_region():
    """Gradients on and inference mode off, whatever the caller's context (``torch.no_grad()`` or
    ``torch.inference_mode()``), for the parts that differentiate internally. Tensors created under the
    caller's inference mode must pass through :func:`normal` inside the region before entering autograd."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


def normal(t):
    """``t`` itself, or a normal clone of an inference tensor (which autograd cannot save); ``None`` stays."""
    return t.clone() if isinstance(t, Tensor) and t.is_inference() else t


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


_PARAM_NAMES = {"w_ih": "weight_ih", "w_hh": "weight_hh", "b_ih": "bias_ih", "b_hh": "bias_hh", "w_hr": "weight_hr"}
_MODULE_ARCH: dict[type[nn.RNNBase], str] = {nn.RNN: "rnn", nn.GRU: "gru", nn.LSTM: "lstm"}
_CELL_ARCH: dict[type[nn.RNNCellBase], str] = {nn.RNNCell: "rnn", nn.GRUCell: "gru", nn.LSTMCell: "lstm"}


class Dynamics:
    """One recurrent model seen as ``s_t = F(s_{t-1}, x_t)`` on a flat state of size ``D``.

    Use :func:`as_dynamics` to build one; the attributes describe the model.
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
        kind: str = "module",
        custom: CustomCell | None = None,
        state_size: int | None = None,
    ):
        self.arch = arch
        self.layers = layers
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.proj_size = proj_size
        self.batch_first = batch_first
        self.kind = kind  # "module", "cell" or "custom"
        self.custom = custom
        self.num_layers = max(len(layers), 1)
        self.module: nn.Module | None = None
        self._arch: CellArch | None = ARCHITECTURES.get(arch)
        if custom is not None:
            self.parts = [[("h", int(state_size or 0))]]
        else:
            h_out = proj_size or hidden_size
            per = [("h", h_out), ("c", hidden_size)] if self._cell.has_c else [("h", h_out)]
            self.parts = [list(per) for _ in layers]

    @property
    def _cell(self) -> CellArch:
        if self._arch is None:
            raise TypeError("a custom cell has no built-in closed form")
        return self._arch

    # ----------------------------------------------------------------------------- layout
    @property
    def state_size(self) -> int:
        return sum(n for layer in self.parts for _, n in layer)

    @property
    def h_size(self) -> int:
        return sum(n for layer in self.parts for p, n in layer if p == "h")

    @property
    def has_closed_form(self) -> bool:
        return self.custom is None or self.custom.jacobian is not None

    def size(self, state: str) -> int:
        return self.state_size if state == "full" else self.h_size

    def unit_coords(self, state: str = "full") -> dict[str, list]:
        """``layer``, ``part``, ``neuron`` labels of the state coordinates."""
        layer, part, neuron = [], [], []
        for li, parts in enumerate(self.parts):
            for name, n in parts:
                if state == "h" and name != "h":
                    continue
                layer += [li] * n
                part += [name] * n
                neuron += list(range(n))
        return {"layer": layer, "part": part, "neuron": neuron}

    def h_index(self, device=None) -> Tensor:
        """Positions of the h coordinates inside the full state."""
        idx: list[int] = []
        off = 0
        for parts in self.parts:
            for name, n in parts:
                if name == "h":
                    idx += range(off, off + n)
                off += n
        return torch.tensor(idx, dtype=torch.long, device=device)

    def split(self, s: Tensor) -> list[tuple[Tensor, Tensor | None]]:
        """Full state ``(..., D)`` -> per layer ``(h, c)`` (``c`` is None without a cell state)."""
        out, off = [], 0
        for parts in self.parts:
            vals = []
            for _, n in parts:
                vals.append(s[..., off : off + n])
                off += n
            out.append((vals[0], vals[1] if len(vals) > 1 else None))
        return out

    def join(self, layers: list[tuple[Tensor, Tensor | None]]) -> Tensor:
        return torch.cat([t for h, c in layers for t in ((h,) if c is None else (h, c))], -1)

    def with_h(self, h: Tensor, s: Tensor) -> Tensor:
        """Full state ``s`` with its h parts replaced by ``h`` (``(..., h_size)``)."""
        out, off = [], 0
        for hh, c in self.split(s):
            n = hh.shape[-1]
            out.append((h[..., off : off + n], c))
            off += n
        return self.join(out)

    # ----------------------------------------------------------------------------- parameters
    def tensors(self) -> list[Tensor]:
        return [t for _, t in self.named_tensors()]

    def named_tensors(self) -> list[tuple[str, Tensor]]:
        """``(name, tensor)`` for every weight, named as in the module's ``state_dict`` (``weight_hh_l0``,
        ``bias_ih``, ...); a custom cell's declared tensors are ``parameters[i]``."""
        if self.custom is not None:
            return [(f"parameters[{i}]", t) for i, t in enumerate(self.custom.parameters)]
        out = []
        for li, p in enumerate(self.layers):
            suffix = "" if self.kind == "cell" else f"_l{li}"
            for field, base in _PARAM_NAMES.items():
                t = getattr(p, field)
                if t is not None:
                    out.append((base + suffix, t))
        return out

    @property
    def dtype(self) -> torch.dtype | None:
        ts = self.tensors()
        return ts[0].dtype if ts else None

    @property
    def device(self) -> torch.device | None:
        ts = self.tensors()
        return ts[0].device if ts else None

    def _with_layers(self, layers: list[LayerParams]) -> Dynamics:
        return Dynamics(
            self.arch,
            layers,
            input_size=self.input_size,
            hidden_size=self.hidden_size,
            proj_size=self.proj_size,
            batch_first=self.batch_first,
            kind=self.kind,
        )

    def to(self, dtype=None, device=None) -> Dynamics:
        """A copy on another dtype/device (the model itself is untouched)."""
        if self.custom is not None:
            return self
        kw = {k: v for k, v in (("dtype", dtype), ("device", device)) if v is not None}
        return self._with_layers([p.to(**kw) for p in self.layers])

    def frobenius_closed_form(self, state: str) -> bool:
        """Whether ``||J||_F^2`` has the row-local (Gram) form: one layer, no projection, full state."""
        return (
            self.custom is None
            and self.num_layers == 1
            and (state == "full" or not self._cell.has_c)
            and self.layers[0].w_hr is None
        )

    def for_autograd(self) -> Dynamics:
        """``self``, or a copy whose inference-mode weights are cloned into normal tensors (call it inside
        :func:`grad_region`); a custom cell's closure is the caller's."""
        if self.custom is not None or not any(t.is_inference() for t in self.tensors()):
            return self
        return self._with_layers([p.map(normal) for p in self.layers])

    def detached(self) -> Dynamics:
        """A copy whose weights are detached from the autograd graph."""
        if self.custom is not None:
            return self
        return self._with_layers([p.map(Tensor.detach) for p in self.layers])

    def describe(self) -> dict:
        return {
            "architecture": self.custom.name if self.custom is not None else self.arch,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "input_size": self.input_size,
            "proj_size": self.proj_size,
        }

    # ----------------------------------------------------------------------------- stepping
    def step(self, s: Tensor, x: Tensor) -> Tensor:
        """One step of the full state: ``(N, D), (N, I) -> (N, D)``."""
        if self.custom is not None:
            return self.custom.step(s, x)
        out, inp = [], x
        for p, (h, c) in zip(self.layers, self.split(s), strict=False):
            h, c = self._cell.step(p, inp, h, c)
            out.append((h, c))
            inp = h
        return self.join(out)

    def run(self, s0: Tensor, xs: Tensor) -> Tensor:
        """States ``s_0..s_T`` as ``(B, T+1, D)`` from ``s0 (B, D)`` and inputs ``xs (B, T, I)``."""
        states = [s0]
        s = s0
        for t in range(xs.shape[1]):
            s = self.step(s, xs[:, t])
            states.append(s)
        return torch.stack(states, 1)

    def linearize(self, s: Tensor, x: Tensor, method: str = "analytic", chunk_size=None) -> Linearization:
        """The step Jacobians at a batch of (state, input) pairs ``(N, D), (N, I)``."""
        if method == "autograd":
            return Linearization(self, s, x, jac=_autograd_jacobian(self, s, x, chunk_size))
        if self.custom is not None:
            assert self.custom.jacobian is not None  # "analytic" for a custom cell needs its closed form
            return Linearization(self, s, x, jac=self.custom.jacobian(s, x))
        coefs, inp = [], x
        for p, (h, c) in zip(self.layers, self.split(s), strict=False):
            h, c, coef = self._cell.linearize(p, inp, h, c)
            coefs.append(coef)
            inp = h
        return Linearization(self, s, x, coefs=coefs)


def _autograd_jacobian(dyn: Dynamics, s: Tensor, x: Tensor, chunk_size=None) -> Tensor:
    """``vmap(jacrev(step))`` over the leading dim of ``s (N, D)`` and ``x (N, I)``; works under the caller's
    ``no_grad``/``inference_mode`` (then the result carries no graph)."""
    from torch.func import jacrev, vmap

    keep_graph = torch.is_grad_enabled()
    with grad_region():
        step = dyn.for_autograd().step

        def single(si, xi):
            return step(si.unsqueeze(0), xi.unsqueeze(0)).squeeze(0)

        jac = vmap(jacrev(single, argnums=0, chunk_size=chunk_size))(normal(s), normal(x))
    return jac if keep_graph else jac.detach()


def _any_inference(lin: Linearization) -> bool:
    coefs = [v for c in lin.coefs or [] for v in c.values()]
    return any(t.is_inference() for t in [*coefs, *lin.dyn.tensors()] + ([lin.jac] if lin.jac is not None else []))


class Linearization:
    """``J_t`` for ``N`` steps at once, factored (built-in cells) or materialised."""

    def __init__(self, dyn: Dynamics, s: Tensor, x: Tensor, *, coefs=None, jac: Tensor | None = None):
        self.dyn = dyn
        self.s = s
        self.x = x
        self.coefs = coefs
        self.jac = jac

    def for_autograd(self) -> Linearization:
        """``self``, or a copy with every inference-mode tensor cloned (call it inside :func:`grad_region`)."""
        coefs = None if self.coefs is None else [{k: normal(v) for k, v in c.items()} for c in self.coefs]
        return Linearization(self.dyn.for_autograd(), normal(self.s), normal(self.x), coefs=coefs, jac=normal(self.jac))

    def detached(self) -> Linearization:
        """The same linearisation cut from the autograd graph (weights and coefficients detached)."""
        coefs = None if self.coefs is None else [{k: v.detach() for k, v in c.items()} for c in self.coefs]
        jac = None if self.jac is None else self.jac.detach()
        return Linearization(self.dyn.detached(), self.s.detach(), self.x.detach(), coefs=coefs, jac=jac)

    def unbind(self, steps: int) -> list[Linearization]:
        """All steps of a linearisation laid out as ``(B, steps)``, as a list (one autograd op per tensor)."""

        def split(t):
            return t.reshape(-1, steps, *t.shape[1:]).unbind(1)

        s, x = split(self.s), split(self.x)
        if self.coefs is not None:
            per = [{k: split(v) for k, v in c.items()} for c in self.coefs]
            coefs = [[{k: v[j] for k, v in c.items()} for c in per] for j in range(steps)]
            return [Linearization(self.dyn, s[j], x[j], coefs=coefs[j]) for j in range(steps)]
        assert self.jac is not None
        jac = split(self.jac)
        return [Linearization(self.dyn, s[j], x[j], jac=jac[j]) for j in range(steps)]

    @property
    def factored(self) -> bool:
        return self.coefs is not None

    def _h_only(self, j: Tensor, rows: bool = True, cols: bool = True) -> Tensor:
        idx = self.dyn.h_index(j.device)
        if rows:
            j = j.index_select(-2, idx)
        if cols:
            j = j.index_select(-1, idx)
        return j

    def apply(self, q: Tensor, state: str = "full") -> Tensor:
        """``J @ Q`` for tangents ``Q`` of shape ``(N, D, k)`` (``D`` of the chosen ``state``)."""
        dyn = self.dyn
        if not self.factored:
            assert self.jac is not None
            j = self.jac if state == "full" or dyn.custom is not None else self._h_only(self.jac)
            return j @ q
        out, dx, off = [], None, 0
        for p, coef, parts in zip(dyn.layers, self.coefs, dyn.parts, strict=False):
            n_h = parts[0][1]
            dh = q[..., off : off + n_h, :]
            off += n_h
            dc = None
            if len(parts) > 1 and state == "full":
                dc = q[..., off : off + parts[1][1], :]
                off += parts[1][1]
            dh, dc = dyn._cell.tangent(p, coef, dx, dh, dc)
            out.append(dh)
            if dc is not None and state == "full":
                out.append(dc)
            dx = dh
        return torch.cat(out, -2)

    def apply_transpose(self, u: Tensor, state: str = "full") -> Tensor:
        """``J^T U``: the vjp of the linear map ``Q -> J Q`` (differentiable w.r.t. J's ingredients when grad
        mode is on; works under ``no_grad``/``inference_mode`` too)."""
        keep_graph = torch.is_grad_enabled()
        with grad_region():
            lin = self.for_autograd() if torch.is_inference(u) or _any_inference(self) else self
            u = normal(u)
            vjp = torch.func.vjp(lambda q: lin.apply(q, state), torch.zeros_like(u))[1]
            out = vjp(u)[0]
        return out if keep_graph else out.detach()

    def materialize(self, state: str = "full") -> Tensor:
        """``J`` as ``(N, D, D)``."""
        dyn = self.dyn
        if not self.factored:
            assert self.jac is not None
            return self.jac if state == "full" or dyn.custom is not None else self._h_only(self.jac)
        n = self.s.shape[0]
        cell = dyn._cell
        total = dyn.state_size
        j = self.s.new_empty(n, total, total)
        r0, below = 0, None  # below: h-rows of the previous layer's row block (a view of j)
        for p, coef, parts in zip(dyn.layers, self.coefs, dyn.parts, strict=False):
            n_h = parts[0][1]
            r1 = r0 + sum(m for _, m in parts)
            c0 = r0
            for dh, dc in [(EYE, None)] + ([(None, EYE)] if len(parts) > 1 else []):
                out_h, out_c = cell.tangent(p, coef, None, dh, dc)
                width = out_h.shape[-1]
                j[:, r0 : r0 + n_h, c0 : c0 + width] = out_h
                if out_c is not None:
                    j[:, r0 + n_h : r1, c0 : c0 + width] = out_c
                c0 += width
            if below is not None:
                low_h, low_c = cell.tangent(p, coef, below, None, None)
                j[:, r0 : r0 + n_h, :r0] = low_h
                if low_c is not None:
                    j[:, r0 + n_h : r1, :r0] = low_c
            if r1 < total:
                j[:, r0:r1, r1:] = 0
            below = j[:, r0 : r0 + n_h, :r1]
            r0 = r1
        return j if state == "full" else self._h_only(j)

    def frobenius_sq(self, state: str = "full") -> Tensor:
        """``||J||_F^2`` per step, ``(N,)``; O(N K^2 H) for single-layer built-in cells."""
        dyn = self.dyn
        if self.factored and dyn.frobenius_closed_form(state):
            return dyn._cell.frobenius_sq(dyn.layers[0], self.coefs[0])
        return self.materialize(state).pow(2).sum((-2, -1))


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


def as_dynamics(model, *, state_size: int | None = None) -> Dynamics:
    """Adapt a module, cell, :class:`CustomCell` or bare callable to :class:`Dynamics`.

    Raises ``ValueError`` for bidirectional modules and ``TypeError`` for anything unsupported.
    """
    if isinstance(model, Dynamics):
        return model
    if isinstance(model, CustomCell) or (callable(model) and not isinstance(model, nn.Module)):
        cell = model if isinstance(model, CustomCell) else CustomCell(model)
        return Dynamics("custom", [], input_size=-1, hidden_size=state_size or 0, custom=cell, state_size=state_size)
    for cls, base in _MODULE_ARCH.items():
        if isinstance(model, cls):
            if model.bidirectional:
                raise ValueError(
                    f"{type(model).__name__}(bidirectional=True) is not one causal dynamical system: its "
                    "backward direction runs from t=T down to 1. Analyse each direction as its own model "
                    "(e.g. copy the *_reverse weights into a unidirectional module)."
                )
            arch = f"rnn_{getattr(model, 'nonlinearity', 'tanh')}" if base == "rnn" else base
            layers = _rnn_layers(model, model.num_layers)
            dyn = Dynamics(
                arch,
                layers,
                input_size=model.input_size,
                hidden_size=model.hidden_size,
                proj_size=getattr(model, "proj_size", 0),
                batch_first=model.batch_first,
                kind="module",
            )
            dyn.module = model  # lets the penalties reuse the module's own (non-cuDNN) forward
            return dyn
    for cell_cls, base in _CELL_ARCH.items():
        if isinstance(model, cell_cls):
            arch = f"rnn_{getattr(model, 'nonlinearity', 'tanh')}" if base == "rnn" else base
            return Dynamics(
                arch,
                _rnn_layers(model, 1, cell=True),
                input_size=model.input_size,
                hidden_size=model.hidden_size,
                batch_first=True,
                kind="cell",
            )
    if isinstance(model, nn.Module):
        raise TypeError(
            f"expected nn.RNN, nn.GRU, nn.LSTM, one of their cells, a CustomCell or a callable step(s, x), "
            f"got {type(model).__name__}; for a larger model pass its recurrent submodule, or wrap your "
            "step in rnnjac.CustomCell"
        )
    raise TypeError(f"expected a recurrent module or a callable step(s, x), got {type(model).__name__}")
